"""metrics.jsonl survives a process killed mid-write (a preempted job), on resume and plots."""

from __future__ import annotations

import json
from pathlib import Path

from dancegrpo_trainer.run_logging import MetricsLogger, plot_reward_curve, read_metrics

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
