"""The CPU demo: RL fine-tuning through a real reward service, no downloads, ~15 s on 2 cores.

    python -m dancegrpo_trainer.demo [--config configs/demo.yaml] [--pretrain-steps N]
                                     [--stop-at-gap F] [key=value overrides ...]

1. starts ``dancegrpo-rewards serve --config services/demo.yaml`` as a separate process
   on a free localhost port;
2. pre-trains the tiny rectified-flow policy by unconditional flow matching on
   random-colour images (the base model draws diverse colours and ignores the prompt);
3. trains it with the method of ``configs/demo.yaml`` (GRPO on a Flow-GRPO-Fast window:
   of the methods tuned in ``benchmarks/bench_t2t.py``, the fastest to this target on
   every seed) against the ``color_match``
   reward over gRPC, through the same :class:`Trainer` and config code path as the real
   recipes;
4. evaluates on held-out phrasings (deterministic, fixed seeds) every
   ``eval.every_steps`` and stops once the held-out reward is ``--stop-at-gap`` (default
   0.9) of the way from its initial value to the maximum 1.0, or at ``run.max_steps``;
   prints the time that took, writes ``runs/demo/`` (metrics.jsonl, reward_curve.png,
   samples_before.png, samples_after.png, config.yaml, tb/, checkpoints/) and stops the
   service.

One torch thread: the tiny policy's operations are too small to share out, and two
threads contending for the two cores made every step ~4x slower here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dancegrpo_trainer.config import GRPOConfig, load_config
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy, pretrain_flow_matching
from dancegrpo_trainer.policy_factory import build_policy
from dancegrpo_trainer.reward_process import reward_service
from dancegrpo_trainer.run_logging import logger, read_metrics, setup_logging
from dancegrpo_trainer.trainer import Trainer, run_summary

#: Stop once the held-out reward is 90 % of the way from its initial value to 1.0.
DEFAULT_STOP_AT_GAP = 0.9


def gap_target(before: float, stop_at_gap: float) -> float:
    """The held-out reward ``stop_at_gap`` of the way from ``before`` to the maximum 1.0."""
    return before + stop_at_gap * (1.0 - before)


def _repo_file(relative: str) -> Path:
    """``relative`` under the current directory, else under the source checkout."""
    here = Path(relative)
    if here.exists():
        return here
    checkout = Path(__file__).resolve().parents[4] / relative
    return checkout if checkout.exists() else here


def run_demo(
    config: str | Path = "configs/demo.yaml",
    overrides: Sequence[str] = (),
    *,
    service_config: str | Path = "services/demo.yaml",
    pretrain_steps: int = 300,
    target: str | None = None,
    stop_at_gap: float | None = DEFAULT_STOP_AT_GAP,
) -> dict[str, Any]:
    """Runs the demo; returns ``{eval_reward_before, eval_reward_after, relative_change,
    gap_closed, target_reward, reached, steps, train_s, wall_s}``.

    ``gap_closed`` is ``(after − before) / (1 − before)``: the share of the achievable
    improvement (``color_match`` is at most 1) that training realised. With
    ``stop_at_gap`` the run ends at the first eval whose reward is at least
    ``target_reward = before + stop_at_gap · (1 − before)`` (``reached``); ``None``: it
    runs ``run.max_steps``. ``steps`` is the last step, ``train_s`` the training time to it
    (rollouts, reward waits and updates; no evals) and ``wall_s`` the time since the call
    started (reward service start-up, pre-training and evals included). With ``target``
    set, uses that running service instead of starting one. Runs on one torch thread
    (restored on return)."""
    if stop_at_gap is not None and not 0.0 < stop_at_gap <= 1.0:
        raise ValueError(f"stop_at_gap must be in (0, 1] or None (no stop), got {stop_at_gap}")
    start = time.perf_counter()
    cfg = load_config(_repo_file(str(config)), list(overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if target is not None:
            return _train(cfg, target, pretrain_steps, start, stop_at_gap)
        with reward_service(_repo_file(str(service_config))) as launched:
            return _train(cfg, launched, pretrain_steps, start, stop_at_gap)
    finally:
        torch.set_num_threads(threads)


def pretrained_base_policy(cfg: GRPOConfig, pretrain_steps: int, path: Path) -> TinyFlowPolicy:
    """The demo's initial policy for ``cfg.run.seed``: ``cfg.model`` built under that seed,
    then ``pretrain_steps`` of unconditional flow matching (none: the random init).

    With pre-training the weights are written to ``path`` and ``cfg.model.init_checkpoint``
    points there, so a :class:`Trainer` built from ``cfg`` alone starts from them too.
    """
    torch.manual_seed(cfg.run.seed)
    policy = build_policy(cfg.model, torch.device("cpu"))
    assert isinstance(policy, TinyFlowPolicy), "the demo trains model.kind=tiny_flow"
    if pretrain_steps > 0:
        t0 = time.perf_counter()
        losses = pretrain_flow_matching(policy, steps=pretrain_steps, seed=cfg.run.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in policy.net.state_dict().items()}, str(path))
        cfg.model.init_checkpoint = str(path)
        logger.info(
            f"pretrain steps={pretrain_steps} loss_first={losses[0]:.3f} "
            f"loss_last={losses[-1]:.3f} s={time.perf_counter() - t0:.1f}"
        )
    return policy


def _train(
    cfg: GRPOConfig, target: str, pretrain_steps: int, start: float, stop_at_gap: float | None
) -> dict[str, Any]:
    for ep in cfg.rewards.endpoints:
        ep.target = target
    run_dir = Path(cfg.run.output_dir)
    if cfg.run.resume == "auto" and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir)  # the demo always starts fresh
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    policy = pretrained_base_policy(cfg, pretrain_steps, run_dir / "base_policy.safetensors")
    trainer = Trainer(cfg, policy=policy)

    def reached(evals: list[dict[str, Any]]) -> bool:
        return evals[-1]["reward_mean"] >= gap_target(evals[0]["reward_mean"], stop_at_gap)

    try:
        evals = trainer.train(until=reached if stop_at_gap is not None else None)
    finally:
        trainer.close()
    samples = run_dir / "samples"
    shutil.copyfile(samples / f"eval_{0:06d}.png", run_dir / "samples_before.png")
    shutil.copyfile(samples / f"eval_{trainer.step:06d}.png", run_dir / "samples_after.png")
    summary: dict[str, Any] = dict(run_summary(evals))
    before, after = summary["eval_reward_before"], summary["eval_reward_after"]
    summary["gap_closed"] = (after - before) / (1.0 - before)
    summary["target_reward"] = gap_target(before, stop_at_gap) if stop_at_gap is not None else None
    summary["reached"] = stop_at_gap is not None and reached(evals)
    summary["steps"] = trainer.step
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    summary["train_s"] = sum(r["sample_s"] + r["reward_wait_s"] + r["train_s"] for r in train)
    summary["wall_s"] = time.perf_counter() - start
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dancegrpo_trainer.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--service-config", default="services/demo.yaml")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument(
        "--stop-at-gap",
        type=float,
        default=DEFAULT_STOP_AT_GAP,
        help="stop once the held-out reward is this share of the way from its initial value "
        "to 1.0 (default %(default)s); 0 or less: run run.max_steps",
    )
    parser.add_argument("--target", help="use this running reward service instead of starting one")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.stop_at_gap > 1.0:
        parser.error(
            f"--stop-at-gap must be at most 1.0 (the maximum reward), got {args.stop_at_gap}"
        )
    setup_logging(0)
    s = run_demo(
        args.config,
        args.overrides,
        service_config=args.service_config,
        pretrain_steps=args.pretrain_steps,
        target=args.target,
        stop_at_gap=args.stop_at_gap if args.stop_at_gap > 0 else None,
    )
    print(
        f"\nheld-out color_match reward: before {s['eval_reward_before']:.4f} -> "
        f"after {s['eval_reward_after']:.4f} at step {s['steps']} "
        f"({s['relative_change'] * 100:+.1f}%; {s['gap_closed'] * 100:.0f}% of the way to the "
        f"maximum 1.0)"
    )
    if s["target_reward"] is not None:
        how = "reached" if s["reached"] else "NOT reached by run.max_steps"
        print(
            f"target {s['target_reward']:.4f} ({args.stop_at_gap * 100:.0f}% of the way) {how}: "
            f"{s['train_s']:.1f} s of training, {s['wall_s']:.1f} s since start (reward "
            "service, pre-training and evals included)"
        )
    else:
        print(f"{s['train_s']:.1f} s of training, {s['wall_s']:.1f} s since start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
