"""The CPU demo: GRPO through a real reward service, no downloads, a few minutes on 2 cores.

    python -m dancegrpo_trainer.demo [--config configs/demo.yaml] [--pretrain-steps N]
                                     [key=value overrides ...]

1. starts ``dancegrpo-rewards serve --config services/demo.yaml`` as a separate process
   on a free localhost port;
2. pre-trains the tiny rectified-flow policy by unconditional flow matching on
   random-colour images (the base model draws diverse colours and ignores the prompt);
3. trains it with GRPO against the ``color_match`` reward over gRPC, through the same
   :class:`Trainer` and config code path as the real recipes (``configs/demo.yaml``);
4. evaluates on held-out phrasings (deterministic, fixed seeds) before and after, writes
   ``runs/demo/`` (metrics.jsonl, reward_curve.png, samples_before.png,
   samples_after.png, config.yaml, tb/, checkpoints/) and stops the service.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from dancegrpo_trainer.config import GRPOConfig, load_config
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy, pretrain_flow_matching
from dancegrpo_trainer.policy_factory import build_policy
from dancegrpo_trainer.reward_process import reward_service
from dancegrpo_trainer.run_logging import logger, setup_logging
from dancegrpo_trainer.trainer import Trainer, run_summary


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
) -> dict[str, float]:
    """Runs the demo; returns ``{eval_reward_before, eval_reward_after, relative_change,
    gap_closed, wall_s}``. ``gap_closed`` is ``(after − before) / (1 − before)``: the share
    of the achievable improvement (``color_match`` is at most 1) that training realised.
    With ``target`` set, uses that running service instead of starting one."""
    start = time.perf_counter()
    cfg = load_config(_repo_file(str(config)), list(overrides))
    if target is not None:
        return _train(cfg, target, pretrain_steps, start)
    with reward_service(_repo_file(str(service_config))) as launched:
        return _train(cfg, launched, pretrain_steps, start)


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


def _train(cfg: GRPOConfig, target: str, pretrain_steps: int, start: float) -> dict[str, float]:
    for ep in cfg.rewards.endpoints:
        ep.target = target
    run_dir = Path(cfg.run.output_dir)
    if cfg.run.resume == "auto" and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir)  # the demo always starts fresh
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    policy = pretrained_base_policy(cfg, pretrain_steps, run_dir / "base_policy.safetensors")
    trainer = Trainer(cfg, policy=policy)
    try:
        evals = trainer.train()
    finally:
        trainer.close()
    samples = run_dir / "samples"
    shutil.copyfile(samples / f"eval_{0:06d}.png", run_dir / "samples_before.png")
    shutil.copyfile(samples / f"eval_{trainer.step:06d}.png", run_dir / "samples_after.png")
    summary = run_summary(evals)
    before, after = summary["eval_reward_before"], summary["eval_reward_after"]
    summary["gap_closed"] = (after - before) / (1.0 - before)
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
    parser.add_argument("--target", help="use this running reward service instead of starting one")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    setup_logging(0)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    summary = run_demo(
        args.config,
        args.overrides,
        service_config=args.service_config,
        pretrain_steps=args.pretrain_steps,
        target=args.target,
    )
    print(
        f"\nheld-out color_match reward: before {summary['eval_reward_before']:.4f} -> "
        f"after {summary['eval_reward_after']:.4f} "
        f"({summary['relative_change'] * 100:+.1f}%; {summary['gap_closed'] * 100:.0f}% of the "
        f"way to the maximum 1.0), wall time {summary['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
