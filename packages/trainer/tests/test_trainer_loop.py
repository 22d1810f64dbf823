"""The GRPO loop against a real reward-service process: resume exactness, LoRA vs full
fine-tuning, Best-of-N, and a reward outage past its budget that fails loudly naming the
endpoint (test_scoring_outage.py: outages within it)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from dancegrpo_testing.trainer_runs import records
from dancegrpo_trainer.config import load_config
from dancegrpo_trainer.scoring import RewardScoringError
from dancegrpo_trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def reward_target() -> str:
    from dancegrpo_testing.servers import running_reward_server

    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        yield server.target


def small_config(target: str, out: Path, *extra: str):
    return load_config(
        ROOT / "configs/demo_grpo.yaml",
        [
            f"rewards.endpoints.0.target={target}",
            f"run.output_dir={out}",
            "run.progress=false",
            "run.checkpoint_every=2",
            "run.keep_checkpoints=5",
            "run.sample_grid_every=0",
            "run.max_steps=4",
            "sampling.prompts_per_step=2",
            "sampling.group_size=4",
            "sampling.num_steps=4",
            "sampling.rollout_batch_size=4",
            "train.micro_batch_size=4",
            "data.eval_prompts=[]",
            *extra,
        ],
    )


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in trainer.policy.trainable_module().state_dict().items()
    }


def test_resume_continues_exactly_like_an_uninterrupted_run(reward_target: str, tmp_path: Path):
    full = Trainer(small_config(reward_target, tmp_path / "full"))
    full.train()
    full.close()

    part = Trainer(small_config(reward_target, tmp_path / "resumed", "run.max_steps=2"))
    part.train()
    part.close()
    resumed = Trainer(small_config(reward_target, tmp_path / "resumed"))
    assert resumed.step == 2
    resumed.train()
    resumed.close()

    for key, value in params(full).items():
        torch.testing.assert_close(params(resumed)[key], value, rtol=0, atol=0)
    a, b = records(tmp_path / "full"), records(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward_mean"] == rb["reward_mean"]
        assert ra["loss"] == rb["loss"]
        assert ra["grad_norm"] == rb["grad_norm"]
    assert (tmp_path / "full" / "config.yaml").is_file()
    assert any((tmp_path / "full" / "tb").iterdir())
    ckpt = tmp_path / "full" / "checkpoints" / "step_000004"
    for name in ("model.safetensors", "optimizer.safetensors", "scheduler.json", "manifest.json"):
        assert (ckpt / name).is_file()


def test_train_until_stops_after_the_eval_that_satisfies_it_and_resumes(
    reward_target: str, tmp_path: Path
):
    """``train(until=...)`` ends the run at the first eval where ``until`` holds, with a
    checkpoint of that step (even off the ``checkpoint_every`` grid); a later
    ``train()`` resumes there and ends bit-identical to a run that never stopped."""
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("a red picture\na blue picture\n")
    extra = (
        f"data.eval_prompts={eval_file}",
        "eval.every_steps=1",
        "eval.samples_per_prompt=1",
        "run.checkpoint_every=0",
        "run.max_steps=5",
    )
    full = Trainer(small_config(reward_target, tmp_path / "full", *extra))
    full_evals = full.train()
    full.close()

    seen: list[list[int]] = []

    def at_step_3(evals: list[dict]) -> bool:
        seen.append([e["step"] for e in evals])
        return evals[-1]["step"] == 3

    part = Trainer(small_config(reward_target, tmp_path / "stopped", *extra))
    evals = part.train(until=at_step_3)
    part.close()
    # Asked after every eval but the step-0 one; the run ends right after the one that held.
    assert seen == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert [e["step"] for e in evals] == [0, 1, 2, 3]
    assert part.step == 3
    assert [r["step"] for r in records(tmp_path / "stopped")] == [1, 2, 3]
    checkpoints = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir())
    assert checkpoints == ["step_000003"]
    # The evals up to the stop are those of the uninterrupted run.
    for a, b in zip(full_evals[:4], evals, strict=True):
        assert a["reward_mean"] == b["reward_mean"]

    resumed = Trainer(small_config(reward_target, tmp_path / "stopped", *extra))
    assert resumed.step == 3
    rest = resumed.train()
    resumed.close()
    assert [e["step"] for e in rest] == [4, 5]
    for key, value in params(full).items():
        torch.testing.assert_close(params(resumed)[key], value, rtol=0, atol=0)
    assert [r["step"] for r in records(tmp_path / "stopped")] == [1, 2, 3, 4, 5]
    assert rest[-1]["reward_mean"] == full_evals[-1]["reward_mean"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_full_fine_tune_and_lora_both_update_only_trainable_weights(
    reward_target: str, tmp_path: Path, lora: bool
):
    extra = ["train.lora.rank=4", "train.learning_rate=1e-2"] if lora else []
    trainer = Trainer(small_config(reward_target, tmp_path, "run.max_steps=2", *extra))
    before = params(trainer)
    trainer.train()
    after = params(trainer)
    trainer.close()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if lora:
        assert changed and all("lora_" in k for k in changed)
        assert any("lora_B" in k for k in changed)
    else:
        assert "prompt_rgb.weight" in changed and len(changed) > len(before) // 2
    rec = records(tmp_path)[-1]
    assert rec["grad_norm"] > 0 and rec["skipped"] == 0


def test_best_of_n_and_per_prompt_advantages_train(reward_target: str, tmp_path: Path):
    trainer = Trainer(
        small_config(
            reward_target,
            tmp_path,
            "run.max_steps=1",
            "rewards.best_of_n={top_k: 1, bottom_k: 1}",
            "rewards.advantage=per_prompt",
            "rewards.tracker_min_count=2",
        )
    )
    record = trainer.train_step()
    trainer.close()
    assert record["samples"] == 8
    for key in ("reward_mean", "loss", "clip_fraction", "approx_kl", "learning_rate"):
        assert key in record


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reward_outage_raises_naming_the_endpoint(tmp_path: Path):
    target = f"127.0.0.1:{_closed_port()}"
    cfg = small_config(
        target, tmp_path, "rewards.endpoints.0.timeout_s=2", "rewards.outage_budget_s=1"
    )
    trainer = Trainer(cfg)
    with pytest.raises(
        RewardScoringError, match=f"'color_match' at {target}.*rewards.outage_budget_s = 1"
    ):
        trainer.train_step()
    trainer.close()


def test_scorer_authenticates_with_the_endpoint_token(tmp_path: Path, monkeypatch):
    import numpy as np

    from dancegrpo_testing.servers import running_reward_server
    from dancegrpo_trainer.scoring import RewardScorer

    server_config = {
        "server": {"auth": {"token_env": "TEST_REWARD_TOKEN"}},
        "rewards": {"color_match": {"kind": "color_match"}},
    }
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[..., 0] = 255
    prompts = ["a red square", "a blue square"]
    with running_reward_server(
        server_config, env={"TEST_REWARD_TOKEN": "s3cret"}, metrics=False
    ) as server:
        monkeypatch.setenv("TRAINER_REWARD_TOKEN", "s3cret")
        cfg = small_config(
            server.target, tmp_path, "rewards.endpoints.0.token_env=TRAINER_REWARD_TOKEN"
        )
        scorer = RewardScorer(cfg.rewards.endpoints)
        try:
            scorer.wait_until_ready(30)
            scores = scorer.submit(frames, prompts).result()
        finally:
            scorer.close()
        np.testing.assert_allclose(
            scores.terms["color_match/score"], [1.0, 1 - np.sqrt(2 / 3)], rtol=1e-5
        )

        cfg = small_config(server.target, tmp_path)  # no token_env
        scorer = RewardScorer(cfg.rewards.endpoints)
        try:
            with pytest.raises(
                RewardScoringError,
                match=f"'color_match' at {server.target}.*UNAUTHENTICATED.*set the endpoint's token_env",
            ):
                scorer.submit(frames, prompts).result()
        finally:
            scorer.close()


def test_console_shows_one_run_bar_and_short_lines(
    reward_target: str, tmp_path: Path, monkeypatch, caplog
):
    """What `make demo` prints: one bar for the run (not two per step at 0 %), and the
    per-step bars only while the steps are slow (here: never after the untimed first)."""
    import io
    import logging
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    caplog.set_level(logging.INFO, logger="dancegrpo_trainer")
    cfg = small_config(reward_target, tmp_path, "run.progress=true", "run.log_every=2")
    trainer = Trainer(cfg)
    trainer.console.inner_bar_min_s = float("inf")
    trainer.train()
    trainer.close()
    frames = [f.strip() for f in screen.getvalue().replace("\r", "\n").splitlines() if f.strip()]
    run_bars = [f for f in frames if f.startswith("train ") and "/4 |" in f]
    assert run_bars and run_bars[-1].startswith("train 4/4")
    assert "train=" in run_bars[-1] and "s/step=" in run_bars[-1]
    assert not any(f.startswith(("rollout 2", "rollout 3", "rollout 4")) for f in frames)
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split()[0] for m in lines if m.startswith("step=")] == ["step=2/4", "step=4/4"]
    assert sum(m.startswith("checkpoint") for m in lines) == 2
    assert max(len(m) for m in lines) < 200
