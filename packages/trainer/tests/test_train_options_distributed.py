"""GRPO-Guard and dropped constant groups under two gloo ranks reproduce one process.

Like ``test_trainer_distributed.py`` (same tolerances and reasons), with an in-process
reward (redness; prompts with "blue" score a constant 0.5) instead of a server. Prompts
are taken in file order, so step 1 drops one group on rank 0 and none on rank 1, and step
2 drops both of rank 0's groups and none of rank 1's: the ranks keep different numbers of
samples (rank 0 none at all), which the gradient normalisation and the metric reduction
must get right. The ``guard_drop_fsdp`` case shards the two ranks (``train.fsdp``) and
compares them with the same unsharded process: rank 0 runs the micro-batches it drops whole
with a zero weight, since every sharded pass is a collective that both ranks must join.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_trainer.distributed import shutdown

ATOL = 1e-5
STEPS = 2
PROMPTS = [
    "a red square",
    "a blue square",
    "a green square",
    "a yellow square",
    "a blue circle",
    "a blue star",
    "a white square",
    "a black square",
]
CASES = {
    "grpo_guard": {"train": {"algorithm": "grpo_guard", "kl_coef": 0.01}},
    "drop_pipelined": {"train": {"drop_constant_groups": True}},
    "guard_drop_wait_velocity_kl": {
        "train": {
            "algorithm": "grpo_guard",
            "drop_constant_groups": True,
            "pipeline_update": False,
            "kl_coef": 0.01,
            "kl_type": "velocity",
        }
    },
    "guard_drop_fsdp": {
        "train": {
            "algorithm": "grpo_guard",
            "drop_constant_groups": True,
            "micro_batch_size": 2,  # train.fsdp: must divide the group size
            "kl_coef": 0.01,
        },
        "fsdp": True,  # in the two-rank run (train.fsdp needs more than one process)
    },
}


def _sections(out: Path, case: str, prompts_per_step: int, fsdp: bool = False) -> dict:
    train = {
        "learning_rate": 1e-3,
        "micro_batch_size": 3,
        "timestep_fraction": 0.5,
        "skip_grad_norm_factor": 0,
        "clip_range": 1e-3,
        **CASES[case]["train"],
        "fsdp": fsdp,
    }
    return {
        "model": {
            "kind": "tiny_flow",
            "options": {"latent_size": 4, "channels": 8, "embed_dim": 16, "num_blocks": 1},
        },
        "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
        "sampling": {
            "num_steps": 4,
            "eta": 0.7,
            "group_size": 4,
            "prompts_per_step": prompts_per_step,
            "rollout_batch_size": 3,
        },
        "train": train,
        "data": {"train_prompts": PROMPTS, "shuffle": False},
        "run": {
            "output_dir": str(out),
            "progress": False,
            "sample_grid_every": 0,
            "max_steps": STEPS,
            "checkpoint_every": 0,
            "resume": "never",
        },
    }


class _Scorer:
    def submit(self, frames, prompts, condition_images=None, metadata=None):  # noqa: ANN001
        from dancegrpo_trainer.scoring import Scores

        x = np.asarray(frames, dtype=np.float32) / 255.0
        score = (x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2))).astype(np.float32)
        score[["blue" in p for p in prompts]] = 0.5
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(Scores({"r/score": score}, {"r/score": score}))
        return future

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_match_one_process(tmp_path: Path, case: str) -> None:
    script = str(Path(__file__).resolve())
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, script, str(one), case, "4"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    _run([*torchrun, script, str(two), case, "2"])
    rank0 = torch.load(two / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(two / "params_rank1.pt", weights_only=True)
    single = torch.load(one / "params_rank0.pt", weights_only=True)
    initial = torch.load(one / "params_initial.pt", weights_only=True)
    for key, value in rank0.items():
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(value, single[key], rtol=0, atol=ATOL, msg=key)
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 100 * ATOL, "training barely moved the parameters: the comparison is vacuous"
    a, b = _records(two), _records(one)
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in ("reward_mean", "loss", "grad_norm", "clip_fraction", "kl", "mean_shift"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
        if "groups_dropped_frac" in y:
            assert x["groups_dropped_frac"] == y["groups_dropped_frac"]
    if "drop" in case:
        assert [r["groups_dropped_frac"] for r in b] == [0.25, 0.5]


def _worker(out: Path, case: str, prompts_per_step: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dancegrpo_trainer import distributed as dist_utils
    from dancegrpo_trainer.config import config_from_dict
    from dancegrpo_trainer.trainer import Trainer

    fsdp = bool(CASES[case].get("fsdp")) and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cfg = config_from_dict(_sections(out, case, prompts_per_step, fsdp))
    trainer = Trainer(cfg, scorer=_Scorer())
    rank = dist_utils.rank()

    def state() -> dict[str, torch.Tensor]:
        module = trainer.policy.trainable_module()
        if fsdp:  # the full tensors on every rank (a collective)
            opts = StateDictOptions(full_state_dict=True)
            return {
                k: v.detach().clone() for k, v in get_model_state_dict(module, options=opts).items()
            }
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    initial = state()  # every rank: a collective under FSDP
    if rank == 0:
        torch.save(initial, out / "params_initial.pt")
    try:
        trainer.train()
    finally:
        trainer.close()
    torch.save(state(), out / f"params_rank{rank}.pt")
    shutdown()  # every rank: tear the process group down before exiting


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
