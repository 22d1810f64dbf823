"""End to end: a shortened CPU demo through a real reward-service process over gRPC.

``run_demo`` starts ``dancegrpo-rewards serve --config services/demo.yaml`` as a separate
process, pre-trains the tiny flow policy, runs the real Trainer with configs/demo.yaml
(200 instead of 400 steps) and evaluates on held-out phrasings with fixed seeds and
deterministic sampling (η = 0).

Margin: the held-out color_match reward must rise by >= 50 %. Measured at step 200:
seed 0 (the configured one, which this test runs) 0.502 -> 0.873 (+74 %); seeds 1 and 2
0.493 -> 0.821 (+67 %) and 0.500 -> 0.887 (+77 %). The full 400-step demo reaches
+82 % / +89 % / +89 %. The bar sits well below every observed value, and the previous
policy (random-init word embeddings, mean pooling) would fail it: +44 % at step 200.
About 30 s on 2 cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dancegrpo_trainer.data import load_prompts
from dancegrpo_trainer.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200
MIN_RELATIVE_GAIN = 0.50


def test_held_out_prompts_are_new_phrasings_of_the_trained_colours() -> None:
    train = [r.prompt for r in load_prompts(str(ROOT / "configs/prompts/demo_train.txt"), "t")]
    held_out = [r.prompt for r in load_prompts(str(ROOT / "configs/prompts/demo_eval.txt"), "e")]
    colours = {"red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple"}
    colours |= {"pink", "brown", "white", "black"}

    def words(prompts: list[str]) -> set[str]:
        return {w for p in prompts for w in re.findall(r"[a-z]+", p.lower())}

    assert not set(train) & set(held_out)
    assert words(held_out) & colours == words(train) & colours == colours
    assert words(held_out) - words(train), "held-out set should contain unseen words"


@pytest.mark.slow
def test_shortened_demo_improves_held_out_reward(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "demo"
    summary = run_demo(
        "configs/demo.yaml",
        [f"run.output_dir={out}", f"run.max_steps={STEPS}", "run.progress=false"],
        pretrain_steps=300,
    )
    assert summary["relative_change"] >= MIN_RELATIVE_GAIN, summary
    for name in (
        "metrics.jsonl",
        "reward_curve.png",
        "samples_before.png",
        "samples_after.png",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    # One optimizer step per rollout: the update is on-policy, so the ratio is exactly 1
    # and the tiny clip range never binds.
    assert max(r["clip_fraction"] for r in train) == 0.0
    for key in (
        "reward_mean",
        "reward/color_match/score_mean",
        "loss",
        "clip_fraction",
        "approx_kl",
        "learning_rate",
        "grad_norm",
        "sample_s",
        "reward_wait_s",
        "train_s",
    ):
        assert key in train[-1], key
