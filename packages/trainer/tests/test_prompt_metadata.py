"""Per-prompt metadata (GenEval specs): prompt files carry it, endpoints with
``metadata: true`` receive it sample by sample in frame order, and a config that asks for
metadata its prompts cannot carry fails at start-up naming both fields."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dancegrpo_trainer.config import ConfigError, RewardEndpoint, load_config
from dancegrpo_trainer.data import load_prompts, repeat_metadata
from dancegrpo_trainer.scoring import RewardScorer
from dancegrpo_trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]

#: GenEval's own rows (``evaluation_metadata.jsonl``) and the metadata each becomes.
CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}
CAT_META = {
    "geneval": {
        "tag": "single_object",
        "include": [{"class_name": "cat", "count": 1}],
        "exclude": [],
    }
}
DOGS = {
    "tag": "counting",
    "include": [{"class": "dog", "count": 3}],
    "exclude": [{"class": "dog", "count": 4}],
    "prompt": "a photo of three dogs",
}
DOGS_META = {
    "geneval": {
        "tag": "counting",
        "include": [{"class_name": "dog", "count": 3}],
        "exclude": [{"class_name": "dog", "count": 4}],
    }
}
POSITION = {
    "tag": "position",
    "include": [
        {"class": "bench", "count": 1},
        {"class": "bird", "count": 1, "color": "red", "position": ["above", 0]},
    ],
    "prompt": "a photo of a red bird above a bench",
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------ prompt files


def test_geneval_rows_become_prompt_metadata_and_plain_rows_stay_metadata_free(
    tmp_path: Path,
) -> None:
    rows = [CAT, {"prompt": "a plain prompt"}, DOGS, POSITION]
    records = load_prompts(str(write_jsonl(tmp_path / "train.jsonl", rows)), "data.train_prompts")
    assert [r.prompt for r in records] == [row["prompt"] for row in rows]
    assert records[0].metadata == CAT_META
    assert records[1].metadata is None
    assert records[2].metadata == DOGS_META
    assert records[3].metadata["geneval"]["include"][1] == {
        "class_name": "bird",
        "count": 1,
        "color": "red",
        "position_relation": "above",
        "position_reference": 0,
    }
    assert all(r.condition_image is None for r in records)
    (tmp_path / "p.txt").write_text("a cat\n")
    assert load_prompts(str(tmp_path / "p.txt"), "f")[0].metadata is None
    assert load_prompts(["a cat"], "f")[0].metadata is None


def test_a_malformed_geneval_row_names_the_field_and_line(tmp_path: Path) -> None:
    bad = dict(POSITION, include=[{"class": "bird", "position": ["above", 2]}])
    path = write_jsonl(tmp_path / "train.jsonl", [CAT, bad])
    with pytest.raises(ValueError, match=r"data.train_prompts: .*train.jsonl:2: malformed GenEval"):
        load_prompts(str(path), "data.train_prompts")


def test_metadata_repeats_prompt_major_like_the_samples(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [CAT, DOGS])
    records = load_prompts(str(path), "f")
    assert repeat_metadata(records, 2) == [CAT_META, CAT_META, DOGS_META, DOGS_META]
    assert repeat_metadata(load_prompts(["a", "b"], "f"), 3) is None


# ------------------------------------------------------------------------------ scoring


class FakeClient:
    """The ``RewardClient`` interface: records each ``score_async`` call and answers with
    one output per reward, ``value`` = the sample's include count (-1 without metadata)."""

    def __init__(self, calls: list[tuple[str, dict[str, Any]]]) -> None:
        self.calls = calls

    def score_async(self, reward: str, **kwargs: Any) -> concurrent.futures.Future:
        self.calls.append((reward, kwargs))
        metadata = kwargs.get("metadata") or [None] * len(kwargs["prompts"])
        values = [_include_count(m) for m in metadata]
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result({"value": np.asarray(values, np.float32), "other": np.zeros(len(values))})
        return future


def _include_count(metadata: Mapping[str, Any] | None) -> float:
    return -1.0 if metadata is None else float(metadata["geneval"]["include"][0]["count"])


def fake_scorer(endpoints: list[RewardEndpoint]) -> tuple[RewardScorer, list]:
    calls: list[tuple[str, dict[str, Any]]] = []
    return RewardScorer(endpoints, client_factory=lambda target, ep: FakeClient(calls)), calls


def test_scorer_sends_metadata_in_frame_order_only_to_calls_that_ask() -> None:
    endpoints = [
        RewardEndpoint(target="t:1", reward="geneval", output="value", metadata=True),
        RewardEndpoint(target="t:1", reward="hps", output="value"),
        # One call per (target, reward): these two disagree, so the call carries metadata.
        RewardEndpoint(target="t:1", reward="both", output="value", name="a"),
        RewardEndpoint(target="t:1", reward="both", output="other", name="b", metadata=True),
    ]
    scorer, calls = fake_scorer(endpoints)
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    metadata = [DOGS_META, CAT_META, DOGS_META]
    scores = scorer.submit(frames, ["three dogs", "a cat", "three dogs"], None, metadata).result()
    sent = {reward: kwargs for reward, kwargs in calls}
    assert [reward for reward, _ in calls] == ["geneval", "hps", "both"]
    assert sent["geneval"]["metadata"] == metadata
    assert sent["both"]["metadata"] == metadata
    assert "metadata" not in sent["hps"]
    np.testing.assert_array_equal(scores.terms["geneval/value"], [3, 1, 3])
    np.testing.assert_array_equal(scores.terms["hps/value"], [-1, -1, -1])
    np.testing.assert_array_equal(scores.terms["a"], [3, 1, 3])


def test_scorer_refuses_samples_without_metadata_when_an_endpoint_asks() -> None:
    endpoints = [
        RewardEndpoint(target="t:1", reward="hps", output="value"),
        RewardEndpoint(target="t:1", reward="geneval", output="value", metadata=True),
    ]
    scorer, _ = fake_scorer(endpoints)
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"rewards.endpoints\[1\].metadata is true"):
        scorer.submit(frames, ["a", "b"])
    with pytest.raises(ValueError, match="1 metadata entries for 2 samples"):
        scorer.submit(frames, ["a", "b"], None, [CAT_META])
    # Without an endpoint asking, metadata given is simply not sent.
    scorer, calls = fake_scorer(endpoints[:1])
    scorer.submit(frames, ["a", "b"], None, [CAT_META, CAT_META]).result()
    assert "metadata" not in calls[0][1]


# ------------------------------------------------------------------------------ config / loop


def demo_config(tmp_path: Path, *overrides: str):
    return load_config(
        ROOT / "configs/demo_grpo.yaml",
        [
            "rewards.endpoints.0.target=t:1",
            "rewards.endpoints.0.reward=geneval",
            "rewards.endpoints.0.output=value",
            "rewards.endpoints.0.metadata=true",
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.sample_grid_every=0",
            "sampling.num_steps=2",
            "sampling.group_size=3",
            "sampling.prompts_per_step=2",
            "sampling.rollout_batch_size=4",
            "train.micro_batch_size=3",
            "eval.samples_per_prompt=2",
            *overrides,
        ],
    )


def test_metadata_endpoint_with_prompts_that_cannot_carry_it_fails_naming_both_fields(
    tmp_path: Path,
) -> None:
    field = r"^rewards\.endpoints\[0\]\.metadata: "
    with pytest.raises(ConfigError, match=field + r".*data\.train_prompts must be a \.jsonl"):
        demo_config(tmp_path, "data.train_prompts=[a cat]", "data.eval_prompts=[]")
    eval_jsonl = str(write_jsonl(tmp_path / "e.jsonl", [CAT]))
    with pytest.raises(ConfigError, match=field + r".*data\.eval_prompts must be a \.jsonl"):
        demo_config(tmp_path, f"data.train_prompts={eval_jsonl}")  # eval: demo's .txt
    # A .jsonl whose rows carry no GenEval spec passes the config, fails at start-up.
    plain = write_jsonl(tmp_path / "plain.jsonl", [CAT, {"prompt": "a dog"}])
    cfg = demo_config(tmp_path, f"data.train_prompts={plain}", "data.eval_prompts=[]")
    scorer, _ = fake_scorer(cfg.rewards.endpoints)
    with pytest.raises(
        ConfigError, match=field + r"is true, but 1 of the 2 prompts of data\.train_prompts.*a dog"
    ):
        Trainer(cfg, scorer=scorer)


def test_training_and_eval_send_each_sample_its_own_prompts_metadata(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [CAT, DOGS])
    evals = write_jsonl(tmp_path / "eval.jsonl", [DOGS, POSITION, CAT])
    cfg = demo_config(tmp_path, f"data.train_prompts={train}", f"data.eval_prompts={evals}")
    scorer, calls = fake_scorer(cfg.rewards.endpoints)
    trainer = Trainer(cfg, scorer=scorer)
    try:
        record = trainer.train_step()
        calls_in_training = len(calls)
        evaluation = trainer.evaluate()
    finally:
        trainer.close()
    counts = {"a cat": 1, "a photo of three dogs": 3, POSITION["prompt"]: 1}
    for reward, kwargs in calls:  # every chunk: each sample's metadata is its prompt's
        assert reward == "geneval"
        sent = [_include_count(m) for m in kwargs["metadata"]]
        assert sent == [counts[p] for p in kwargs["prompts"]]
    train_prompts = [p for _, kw in calls[:calls_in_training] for p in kw["prompts"]]
    assert sorted(train_prompts) == ["a cat"] * 3 + ["a photo of three dogs"] * 3
    assert record["reward/geneval/value_mean"] == pytest.approx(2.0)  # (3·1 + 3·3) / 6
    eval_prompts = [p for _, kw in calls[calls_in_training:] for p in kw["prompts"]]
    assert eval_prompts == [r["prompt"] for r in (DOGS, POSITION, CAT) for _ in range(2)]
    assert evaluation["reward/geneval/value_mean"] == pytest.approx((3 + 1 + 1) / 3)
