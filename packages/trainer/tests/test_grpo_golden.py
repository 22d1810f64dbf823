"""DanceGRPO's GRPO (``train.algorithm: grpo``, the default) pinned bit for bit to a stored run.

The fixture ``fixtures/grpo_golden.json`` was recorded on the trainer *before* the
algorithm was made pluggable (issue 15): tiny_flow policy, a weight-free in-process
reward, fixed seeds, three train steps per case. Every logged number (as ``float.hex``),
a SHA-256 of the final trainable weights and of a rollout sampled from them must come out
identical. Cases cover the pipelined update (chunks cutting groups, micro-batches
straddling them), the wait-for-all path with Best-of-N and per-prompt advantages, the KL
penalty with EMA, and LoRA.

Regenerate (only when a change is *meant* to alter GRPO's numbers, and say so in the
commit): ``DANCEGRPO_REGENERATE_GOLDEN=1 pytest packages/trainer/tests/test_grpo_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from dancegrpo_testing.scorers import RednessScorer

# Bit-exact numbers need a fixed reduction order: one intra-op thread.
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import config_from_dict
from dancegrpo_trainer.rollout import sample_rollout, seeded_generators
from dancegrpo_trainer.trainer import Trainer

FIXTURE = Path(__file__).parent / "fixtures" / "grpo_golden.json"
PROMPTS = ["a red square", "a blue square", "a green square", "a yellow square"]
TIMING_KEYS = {"sample_s", "reward_wait_s", "train_s"}

CASES: dict[str, dict[str, Any]] = {
    # 12 samples in chunks of 5 (chunks cut groups), micro-batches of 3 straddling them.
    "pipelined": {},
    "wait_best_of_n_per_prompt": {
        "rewards": {
            "best_of_n": {"top_k": 1, "bottom_k": 2},
            "advantage": "per_prompt",
            "tracker_min_count": 2,
        },
        "train": {"pipeline_update": False},
    },
    "kl_ema_skip_last": {
        "train": {"kl_coef": 0.1, "ema_decay": 0.9, "skip_last_timestep": True},
    },
    "lora": {"train": {"lora": {"rank": 2}, "learning_rate": 1e-2}},
}


def _config(out: Path, case: dict[str, Any]):
    sections: dict[str, dict[str, Any]] = {
        "model": {
            "kind": "tiny_flow",
            "options": {"latent_size": 4, "channels": 16, "embed_dim": 32, "num_blocks": 2},
        },
        "rewards": {"endpoints": [{"target": "unused:1", "reward": "redness", "output": "score"}]},
        "sampling": {
            "num_steps": 4,
            "eta": 0.7,
            "group_size": 4,
            "prompts_per_step": 3,
            "rollout_batch_size": 5,
        },
        "train": {
            "learning_rate": 1e-3,
            "micro_batch_size": 3,
            "timestep_fraction": 0.5,
            "skip_grad_norm_factor": 0,
        },
        "data": {"train_prompts": PROMPTS},
        "run": {
            "output_dir": str(out),
            "progress": False,
            "sample_grid_every": 0,
            "resume": "never",
            "seed": 7,
        },
    }
    for section, values in case.items():
        sections[section] = {**sections[section], **values}
    return config_from_dict(sections)


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(out: Path, case: dict[str, Any]) -> dict[str, Any]:
    trainer = Trainer(_config(out, case), scorer=RednessScorer(label="redness/score"))
    try:
        records = [trainer.train_step() for _ in range(3)]
        module = trainer.policy.trainable_module()
        weights = {k: v for k, v in module.state_dict().items()}
        ema = trainer.ema.state_dict() if trainer.ema is not None else {}
        # A rollout from the trained policy through the public API: pins the sampler too.
        policy = trainer.policy
        cond = policy.encode_prompts(PROMPTS[:2] * 3)
        noise = policy.initial_noise(6, generator=torch.Generator().manual_seed(11))
        module.eval()
        rollout = sample_rollout(
            policy,
            cond,
            noise,
            num_steps=4,
            eta=0.7,
            row_generators=seeded_generators(range(6), 11, "golden"),
            chunk_size=4,
        )
    finally:
        trainer.close()
    logged = [
        {k: float(v).hex() for k, v in r.items() if k not in TIMING_KEYS and k != "split"}
        for r in records
    ]
    return {
        "records": logged,
        "weights_sha256": _sha256(weights),
        "ema_sha256": _sha256(ema),
        "rollout_latents_sha256": _sha256({"latents": rollout.latents}),
        "rollout_log_probs_sha256": _sha256({"log_probs": rollout.log_probs}),
        "rollout_frames_sha256": _sha256({"frames": rollout.frames}),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_grpo_reproduces_the_stored_run_bit_for_bit(name: str, tmp_path: Path) -> None:
    got = _run(tmp_path, CASES[name])
    if os.environ.get("DANCEGRPO_REGENERATE_GOLDEN"):
        stored = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
        stored[name] = got
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        pytest.skip("regenerated")
    expected = json.loads(FIXTURE.read_text())[name]
    assert len(got["records"]) == len(expected["records"]) == 3
    for step, (g, e) in enumerate(zip(got["records"], expected["records"], strict=True)):
        assert g == e, f"step {step + 1}: " + ", ".join(
            f"{k}: {float.fromhex(g.get(k, 'nan'))} != {float.fromhex(v)}"
            for k, v in e.items()
            if g.get(k) != v
        )
    for key in expected:
        if key != "records":
            assert got[key] == expected[key], key
    # The stored run trained: a fixture of a run that did nothing would pin nothing.
    assert float.fromhex(expected["records"][-1]["grad_norm"]) > 0
