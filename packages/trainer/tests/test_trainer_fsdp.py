"""``train.fsdp``: two gloo ranks with a sharded policy train like two unsharded ranks.

The slow test launches this file under ``torchrun`` (2 ranks × 2 prompts, against one real
weight-free reward server) three times with the same settings:

- ``plain``: ``train.fsdp=false``, 2 steps (the layout ``test_trainer_distributed`` checks
  against one process);
- ``fsdp``: ``train.fsdp=true``, 3 steps, a checkpoint after every step;
- ``resumed``: ``train.fsdp=true``, resumed from the ``fsdp`` run's step-2 checkpoint and
  trained to step 3.

Micro-batches of 2 split each rank's 8 samples evenly (``train.fsdp`` requires it) and
rollout chunks of 3 do not align with groups. Eval has 3 rows, so rank 1 samples a padding
row that must not reach the metrics. FSDP reduce-scatters the gradient after every
micro-batch instead of all-reducing the accumulated sum once, so float32 sums run in
another order: the parameters after 2 steps must agree with the plain run within
``ATOL = 1e-5`` (the bound ``test_trainer_distributed`` uses for a reordered sum; the
largest weights are ~5, float32 spacing 4.8e-7; observed 7.5e-8) while training moves
them by 2e-3, more than 100 × that. Logged ``grad_norm`` (which catches a gradient off by a constant factor, to
which Adam is blind), losses and train/eval rewards agree to 1e-4 relative. The
checkpoint holds the full, unsharded tensors; resuming from it reproduces the
uninterrupted third step exactly (same shards, same optimiser state, same RNG).
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
from safetensors.torch import load_file

from dancegrpo_trainer.checkpoint_format import load_optimizer_state
from dancegrpo_trainer.config import ConfigError, load_config
from dancegrpo_trainer.distributed import shutdown

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "configs/demo_grpo.yaml"
ATOL = 1e-5


def _overrides(target: str, out: Path, *, fsdp: bool, steps: int) -> list[str]:
    return [
        f"rewards.endpoints.0.target={target}",
        f"run.output_dir={out}",
        "run.progress=false",
        f"run.max_steps={steps}",
        "run.checkpoint_every=1",
        "run.keep_checkpoints=3",
        "run.sample_grid_every=0",
        "sampling.prompts_per_step=2",
        "sampling.group_size=4",
        "sampling.num_steps=4",
        "sampling.eta=0.7",
        "sampling.rollout_batch_size=3",
        "train.micro_batch_size=2",
        "train.learning_rate=1e-3",
        "train.max_grad_norm=1.0",
        "train.timestep_fraction=0.5",
        "train.skip_grad_norm_factor=0",
        f"train.fsdp={str(fsdp).lower()}",
        "data.eval_prompts=[a red square, a blue square, a green square]",
        "eval.samples_per_prompt=1",
        "eval.eta=0.5",
        "eval.every_steps=2",
    ]


def _torchrun(args: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__)), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


@pytest.mark.slow
def test_fsdp_trains_like_unsharded_ranks_and_resumes_exactly(tmp_path: Path) -> None:
    from dancegrpo_testing.servers import running_reward_server

    plain, fsdp, resumed = tmp_path / "plain", tmp_path / "fsdp", tmp_path / "resumed"
    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        t = server.target
        _torchrun([str(plain), *_overrides(t, plain, fsdp=False, steps=2), "run.resume=never"])
        _torchrun([str(fsdp), *_overrides(t, fsdp, fsdp=True, steps=3), "run.resume=never"])
        resume_from = f"run.resume={_checkpoint(fsdp, 2)}"
        _torchrun([str(resumed), *_overrides(t, resumed, fsdp=True, steps=3), resume_from])

    # The sharded run's step-2 checkpoint (full tensors) matches the unsharded run.
    initial = torch.load(plain / "params_initial.pt", weights_only=True)
    unsharded = torch.load(plain / "params_final.pt", weights_only=True)
    sharded = load_file(str(_checkpoint(fsdp, 2) / "model.safetensors"))
    assert sharded.keys() == unsharded.keys()
    for key, value in unsharded.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=ATOL, msg=key)
    moved = max(float((unsharded[k] - initial[k]).abs().max()) for k in unsharded)
    assert moved > 100 * ATOL, "training barely moved the parameters: the comparison is vacuous"
    # Same optimiser-state layout as an unsharded checkpoint, and the same moments.
    opt_plain = load_optimizer_state(_checkpoint(plain, 2) / "optimizer.safetensors")
    opt_fsdp = load_optimizer_state(_checkpoint(fsdp, 2) / "optimizer.safetensors")
    assert opt_fsdp["state"].keys() == opt_plain["state"].keys()
    for i, state in opt_plain["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_fsdp["state"][i][name], state[name], atol=ATOL, rtol=0)

    records_plain, records_fsdp = _records(plain), _records(fsdp)
    order = [(r["split"], r["step"]) for r in records_fsdp]
    assert order == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3)] + [
        ("eval", 3)
    ]
    assert [(r["split"], r["step"]) for r in records_plain] == order[:4]
    for a, b in zip(records_fsdp, records_plain, strict=False):
        assert a["samples"] == b["samples"]
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "clip_fraction"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert records_fsdp[0]["samples"] == 3  # eval: the padding row is not counted

    # Resuming the sharded run at step 2 reproduces its third step exactly.
    continued = torch.load(fsdp / "params_final.pt", weights_only=True)
    again = torch.load(resumed / "params_final.pt", weights_only=True)
    for key, value in continued.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(continued["conv_out.weight"], sharded["conv_out.weight"])
    third = [r for r in _records(resumed) if r["split"] == "train"]
    assert [r["step"] for r in third] == [3]
    assert third[0]["grad_norm"] == records_fsdp[4]["grad_norm"]


def _config(*overrides: str) -> None:
    load_config(DEMO, ["train.fsdp=true", "train.micro_batch_size=2", *overrides])


def test_fsdp_config_accepts_micro_batches_that_split_groups_evenly() -> None:
    _config("sampling.group_size=4")
    _config(
        "sampling.group_size=8",
        "train.micro_batch_size=3",
        "rewards.best_of_n.top_k=2",
        "rewards.best_of_n.bottom_k=1",
    )


def test_fsdp_config_rejects_micro_batches_that_split_ranks_unevenly():
    with pytest.raises(ConfigError, match="train.micro_batch_size") as info:
        _config("sampling.group_size=3")
    assert "same number of forward" in str(info.value)


def test_fsdp_config_accepts_lora_ema_and_kl():
    _config("train.lora.rank=4", "train.kl_coef=0.01")
    _config("train.ema_decay=0.99", "train.kl_coef=0.01")


@pytest.mark.slow
def test_fsdp_with_ema_and_kl_trains_like_unsharded_ranks(tmp_path: Path) -> None:
    """A full fine-tune with EMA and the KL penalty: both swap other weights into the
    sharded parameters (in place, see ``weights.swapped_weights``). After 2 steps the
    sharded run's parameters and EMA shadow match the unsharded run's, and the logged KL
    (non-zero from step 2 on) and eval rewards (sampled with the EMA weights) agree."""
    from dancegrpo_testing.servers import running_reward_server

    extra = ["train.kl_coef=0.5", "train.ema_decay=0.9", "eval.every_steps=1"]
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp"
    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        t = server.target
        for out, sharded in ((plain, False), (fsdp, True)):
            overrides = _overrides(t, out, fsdp=sharded, steps=2)
            _torchrun([str(out), *overrides, *extra, "run.resume=never"])
    a = load_file(str(_checkpoint(fsdp, 2) / "model.safetensors"))
    b = load_file(str(_checkpoint(plain, 2) / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=0, atol=ATOL, msg=key)
    initial = torch.load(plain / "params_initial.pt", weights_only=True)
    ema_moved = max(float((b[f"ema.{k}"] - v).abs().max()) for k, v in initial.items())
    assert ema_moved > 10 * ATOL  # observed 2.9e-4: the shadow moved 10% of the weights' way
    records_plain, records_fsdp = _records(plain), _records(fsdp)
    assert [(r["split"], r["step"]) for r in records_fsdp] == [
        (r["split"], r["step"]) for r in records_plain
    ]
    assert [r["kl"] > 0 for r in records_plain if r["split"] == "train"] == [False, True]
    for x, y in zip(records_fsdp, records_plain, strict=True):
        for key in ("reward_mean", "loss", "kl", "grad_norm"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), (y["step"], key)


def test_fsdp_needs_more_than_one_process(tmp_path: Path) -> None:
    from dancegrpo_trainer.trainer import Trainer

    cfg = load_config(
        DEMO, ["train.fsdp=true", "train.micro_batch_size=2", f"run.output_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="train.fsdp: needs a distributed launch"):
        Trainer(cfg)


def _worker(out: Path, overrides: list[str]) -> None:
    """Trains ``configs/demo_grpo.yaml`` + ``overrides``; rank 0 saves the full parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dancegrpo_trainer.trainer import Trainer

    trainer = Trainer(load_config(DEMO, overrides))
    assert trainer.world == 2
    if trainer.cfg.train.fsdp:  # each residual block, then the rest, sharded in place
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        net = trainer.policy.trainable_module()
        assert all(isinstance(m, FSDPModule) for m in [*net.blocks, net])
        assert all(isinstance(p, DTensor) for p in trainer.params)

    def full_state() -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(trainer.policy.trainable_module(), options=opts)

    initial = full_state()
    if trainer.rank == 0:
        torch.save(initial, out / "params_initial.pt")
    try:
        trainer.train()
    finally:
        trainer.close()
    final = full_state()
    if trainer.rank == 0:
        torch.save(final, out / "params_final.pt")
    shutdown()  # every rank: tear the process group down before exiting


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
