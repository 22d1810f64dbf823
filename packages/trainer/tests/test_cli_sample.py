"""``dancegrpo-train`` config errors and ``dancegrpo-sample`` Best-of-N against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dancegrpo_trainer.cli import sample_main, train_main

ROOT = Path(__file__).resolve().parents[3]


def test_train_cli_reports_config_errors_with_the_field(capsys) -> None:
    assert train_main(["--config", str(ROOT / "configs/demo_grpo.yaml"), "sampling.eta=0"]) == 2
    assert "sampling.eta" in capsys.readouterr().err


def test_sample_cli_keeps_the_best_of_n(tmp_path: Path) -> None:
    from dancegrpo_testing.servers import running_reward_server

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red image\na blue image\n")
    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        rc = sample_main(
            [
                "--config",
                str(ROOT / "configs/demo_grpo.yaml"),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "out"),
                "--n",
                "4",
                f"rewards.endpoints.0.target={server.target}",
                "sampling.num_steps=4",
            ]
        )
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["prompt"] for r in rows] == ["a red image", "a blue image"]
    for r in rows:
        assert len(r["scores"]) == 4
        assert r["best_score"] == pytest.approx(max(r["scores"]))
        assert (tmp_path / "out" / r["file"]).is_file()
