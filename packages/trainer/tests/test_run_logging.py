"""metrics.jsonl survives a process killed mid-write (a preempted job), on resume and plots;
the console is one run bar plus occasional short log lines."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from dancegrpo_trainer.run_logging import (
    MetricsLogger,
    RunProgress,
    plot_reward_curve,
    read_metrics,
)

TORN = '{"step": 3, "split": "train", "rew'


def _write(path: Path) -> None:
    lines = [json.dumps({"step": s, "split": "train", "reward_mean": 0.1 * s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n" + TORN)


def test_read_metrics_skips_blank_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_resume_truncation_drops_later_steps_and_the_torn_line(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    _write(logger.path)
    logger.truncate_after(2)
    assert [json.loads(line)["step"] for line in logger.path.read_text().splitlines()] == [1, 2]
    logger.log({"step": 3, "split": "train", "reward_mean": 0.5})
    assert [r["step"] for r in read_metrics(logger.path)] == [1, 2, 3]
    logger.close()


def test_reward_curve_plots_a_file_with_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path)
    plot_reward_curve(path, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


# ------------------------------------------------------------------ console


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _train_record(step: int, reward: float) -> dict:
    return {
        "step": step,
        "split": "train",
        "reward_mean": reward,
        "reward_std": 0.1,
        "loss": 0.01,
        "grad_norm": 0.5,
        "learning_rate": 1e-3,
        "reward/color_match_mean": reward,
        "sample_s": 0.1,
    }


def test_console_is_one_run_bar_with_rewards_and_seconds_per_step(monkeypatch, caplog) -> None:
    import dancegrpo_trainer.run_logging as run_logging

    clock = FakeClock()
    monkeypatch.setattr(run_logging.time, "perf_counter", clock)
    term = FakeTerminal()
    caplog.set_level(logging.INFO, logger="dancegrpo_trainer")
    console = RunProgress(8, log_every=4, inner_bar_min_s=5.0, stream=term)
    assert console.inner_bars  # nothing timed yet: a first slow step gets its bars
    console.begin(0)
    console.eval({"step": 0, "split": "eval", "reward_mean": 0.25, "samples": 8})
    for step in range(1, 9):
        clock.now += 2.0
        console.train(_train_record(step, 0.5 + step / 100))
        if step == 8:
            console.eval({"step": 8, "split": "eval", "reward_mean": 0.75, "samples": 8})
            console.checkpoint(8, Path("ckpt/step_000008"))
    console.close()

    screen = term.getvalue().replace("\r", "\n")
    bars = [line for line in screen.splitlines() if line.strip()]
    assert all(line.startswith("train ") for line in bars), bars  # one bar, no other output
    assert "train 8/8" in bars[-1]
    assert "held_out=0.75" in bars[-1] and "train=0.58" in bars[-1] and "s/step=2" in bars[-1]
    assert not console.inner_bars  # 2 s steps are under inner_bar_min_s
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split()[0] for m in lines] == [
        "eval",
        "step=4/8",
        "step=8/8",
        "eval",
        "checkpoint",
    ]
    assert "reward_mean=0.54" in lines[1] and "s_per_step=2" in lines[1]
    assert all(len(m) < 160 for m in lines), lines  # no 300-character record dumps
    assert not any("reward/" in m for m in lines)  # per-reward columns stay in the files


def test_console_shows_inner_bars_only_for_slow_steps_and_only_on_a_terminal(
    monkeypatch,
) -> None:
    import dancegrpo_trainer.run_logging as run_logging

    clock = FakeClock()
    monkeypatch.setattr(run_logging.time, "perf_counter", clock)
    console = RunProgress(4, inner_bar_min_s=5.0, stream=FakeTerminal())
    console.begin(0)
    clock.now += 30.0
    console.train(_train_record(1, 0.5))
    assert console.inner_bars
    for step in range(2, 12):
        clock.now += 0.5
        console.train(_train_record(step, 0.5))
    assert not console.inner_bars
    console.close()

    piped = io.StringIO()  # a log file or `kubectl logs`: lines only, no bar
    quiet = RunProgress(4, stream=piped)
    quiet.begin(0)
    quiet.train(_train_record(1, 0.5))
    quiet.close()
    assert not quiet.inner_bars and piped.getvalue() == ""
    assert not RunProgress(4, bar=False, stream=FakeTerminal()).inner_bars
