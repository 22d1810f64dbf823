"""A Wan adapter across ranks: 2 gloo ranks train like 1 process, with and without FSDP.

The policy is the tiny Wan2.2 T2V-A14B (two experts, both trained: the trainable module is
``WanExperts``; CFG on both experts, 4 steps of which 2 per expert). The test launches this
file as a script against one real reward server (video ``color_match``):

- ``one``: 1 process × 2 prompts per step, full fine-tune;
- ``two``: ``torchrun`` 2 ranks × 1 prompt, full fine-tune (DDP-style gradient average);
- ``lora_one``: 1 process, LoRA rank 4 on both experts + the KL penalty (reference: LoRA off);
- ``lora_fsdp``: ``torchrun`` 2 ranks, the same with ``train.fsdp`` (every
  ``WanTransformerBlock`` of both experts a unit, the rest in the ``WanExperts`` root unit;
  frozen base and adapters sharded), a checkpoint after each step;
- ``lora_resumed``: as ``lora_fsdp``, resumed from its step-1 checkpoint.

Each pair must agree within ``ATOL = 1e-5`` (float32 sums in another order, see
test_trainer_distributed) while training moves the weights by far more; ``grad_norm``, loss,
KL and rewards agree to 1e-4 relative. The sharded LoRA checkpoint holds the adapters only,
and its optimiser state (gathered from the shards) equals the unsharded run's; resuming
from it reproduces the uninterrupted second step exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dancegrpo_trainer.checkpoint_format import OPTIMIZER_FILE, load_optimizer_state
from dancegrpo_trainer.distributed import shutdown

ATOL = 1e-5
STEPS = 2


def _config(model: Path, target: str) -> dict:
    from dancegrpo_testing.wan_models import TINY_WAN_MAX_LENGTH

    return {
        "model": {
            "kind": "wan_t2v",
            "path": str(model),
            "height": 16,
            "width": 16,
            "num_frames": 5,
            "guidance_scale": 3.0,
            "options": {
                "shift": 3.0,
                "guidance_scale_2": 2.0,
                "max_sequence_length": TINY_WAN_MAX_LENGTH,
            },
        },
        "rewards": {"endpoints": [{"target": target, "reward": "color_video"}]},
        "sampling": {"num_steps": 4, "eta": 0.7, "group_size": 4, "rollout_batch_size": 3},
        "train": {
            "learning_rate": 1e-3,
            "micro_batch_size": 2,
            "timestep_fraction": 0.5,
            "max_grad_norm": 1.0,
            "clip_range": 0.2,
        },
        "data": {"train_prompts": ["a red car", "a blue bird", "a green house", "a white cat"]},
        "eval": {"every_steps": STEPS, "samples_per_prompt": 1, "eta": 0.5},
        "run": {"max_steps": STEPS, "checkpoint_every": 1, "keep_checkpoints": 3},
    }


def _overrides(out: Path, prompts_per_step: int, *extra: str) -> list[str]:
    return [
        f"run.output_dir={out}",
        "run.progress=false",
        "run.sample_grid_every=0",
        f"sampling.prompts_per_step={prompts_per_step}",
        "data.eval_prompts=[a red square, a blue square, a green square]",
        *extra,
    ]


def _run(args: list[str], ranks: int) -> None:
    if ranks == 1:
        cmd = [sys.executable, str(Path(__file__))]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def _assert_same_training(a: Path, b: Path) -> None:
    """Final parameters of run ``a`` within ``ATOL`` of run ``b``'s, both far from the start,
    and the same logged metrics."""
    initial = torch.load(b / "params_initial.pt", weights_only=True)
    final_a, final_b = (
        torch.load(a / "params_final.pt", weights_only=True),
        torch.load(b / "params_final.pt", weights_only=True),
    )
    assert final_a.keys() == final_b.keys() == initial.keys()
    for key, value in final_b.items():
        torch.testing.assert_close(final_a[key], value, rtol=0, atol=ATOL, msg=key)
    moved = max(float((final_b[k] - initial[k]).abs().max()) for k in final_b)
    assert moved > 100 * ATOL, "training barely moved the parameters: the comparison is vacuous"
    records_a, records_b = _records(a), _records(b)
    assert [(r["split"], r["step"]) for r in records_a] == [
        (r["split"], r["step"]) for r in records_b
    ]
    for x, y in zip(records_a, records_b, strict=True):
        assert x["samples"] == y["samples"]
        for key in ("reward_mean", "loss", "kl", "grad_norm", "clip_fraction"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), (y["step"], key)


@pytest.mark.slow
def test_wan_two_ranks_train_like_one_with_and_without_fsdp(tmp_path: Path) -> None:
    from dancegrpo_testing.diffusion_models import save_pipeline
    from dancegrpo_testing.servers import running_reward_server
    from dancegrpo_testing.wan_models import tiny_wan22_t2v_pipeline

    model = save_pipeline(tiny_wan22_t2v_pipeline(), tmp_path / "wan22")
    server_config = {
        "rewards": {"color_video": {"kind": "color_match", "options": {"modality": "video"}}}
    }
    lora = ["train.lora.rank=4", "train.kl_coef=0.5"]
    runs = {
        name: tmp_path / name for name in ("one", "two", "lora_one", "lora_fsdp", "lora_resumed")
    }
    with running_reward_server(server_config, metrics=False) as server:
        config = tmp_path / "wan.yaml"
        config.write_text(yaml.safe_dump(_config(model, server.target)))
        _run([str(config), *_overrides(runs["one"], 2)], ranks=1)
        _run([str(config), *_overrides(runs["two"], 1)], ranks=2)
        _run([str(config), *_overrides(runs["lora_one"], 2, *lora)], ranks=1)
        fsdp = [*lora, "train.fsdp=true"]
        _run([str(config), *_overrides(runs["lora_fsdp"], 1, *fsdp)], ranks=2)
        resume = f"run.resume={_checkpoint(runs['lora_fsdp'], 1)}"
        _run([str(config), *_overrides(runs["lora_resumed"], 1, *fsdp, resume)], ranks=2)

    _assert_same_training(runs["two"], runs["one"])
    _assert_same_training(runs["lora_fsdp"], runs["lora_one"])
    train = [r for r in _records(runs["lora_fsdp"]) if r["split"] == "train"]
    assert [r["kl"] > 0 for r in train] == [False, True]  # step 2: moved from the reference

    # Both experts trained, each on its own steps; LoRA only in the sharded checkpoint.
    final = torch.load(runs["lora_fsdp"] / "params_final.pt", weights_only=True)
    initial = torch.load(runs["lora_one"] / "params_initial.pt", weights_only=True)
    for expert in ("transformer.", "transformer_2."):
        assert any(
            not torch.equal(v, initial[k]) for k, v in final.items() if k.startswith(expert)
        ), expert
    saved = load_file(str(_checkpoint(runs["lora_fsdp"], STEPS) / "model.safetensors"))
    assert saved.keys() == final.keys() and all("lora_" in k for k in saved)
    plain = load_file(str(_checkpoint(runs["lora_one"], STEPS) / "model.safetensors"))
    assert saved.keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=ATOL, msg=key)
    # The adapters' optimiser state, gathered from the shards, in the unsharded layout.
    opt_fsdp = load_optimizer_state(_checkpoint(runs["lora_fsdp"], STEPS) / OPTIMIZER_FILE)
    opt_plain = load_optimizer_state(_checkpoint(runs["lora_one"], STEPS) / OPTIMIZER_FILE)
    assert opt_fsdp["state"].keys() == opt_plain["state"].keys() and opt_plain["state"]
    for i, state in opt_plain["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_fsdp["state"][i][name], state[name], atol=ATOL, rtol=0)
    again = torch.load(runs["lora_resumed"] / "params_final.pt", weights_only=True)
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def _worker(config: Path, overrides: list[str]) -> None:
    """Trains ``config`` + ``overrides``; rank 0 saves the trained parameters (full tensors;
    LoRA: the adapters) before and after."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.trainer import Trainer

    trainer = Trainer(load_config(config, overrides))
    assert trainer.world == int(os.environ.get("WORLD_SIZE", "1"))
    module = trainer.policy.trainable_module()
    if trainer.cfg.train.fsdp:
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        from torch.distributed.fsdp import FSDPModule

        blocks = [m for m in module.modules() if isinstance(m, WanTransformerBlock)]
        assert len(blocks) == 4 and all(isinstance(m, FSDPModule) for m in [*blocks, module])

    def state() -> dict[str, torch.Tensor]:
        if trainer.world > 1:  # rank 0 receives the full tensors of a sharded module
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(module, options=opts)
        else:
            full = module.state_dict()
        trained = {n for n, p in module.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in full.items() if k in trained}

    out = Path(trainer.cfg.run.output_dir)
    initial = state()
    if trainer.rank == 0:
        torch.save(initial, out / "params_initial.pt")
    try:
        trainer.train()
    finally:
        trainer.close()
    final = state()
    if trainer.rank == 0:
        torch.save(final, out / "params_final.pt")
    shutdown()  # every rank: tear the process group down before exiting


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
