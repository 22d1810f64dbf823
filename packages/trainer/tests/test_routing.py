"""Routing prompt sources to rewards (``data.sources``) and group-wise scoring in the
trainer: config validation, which call gets which samples, routed advantages on hand
cases, the mixture sampler, and whole-group submission."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_trainer.config import ConfigError, RewardEndpoint, config_from_dict
from dancegrpo_trainer.core import multi_reward_advantages, routed_advantages
from dancegrpo_trainer.data import MixtureSampler, PromptRecord, PromptSampler, load_prompt_sets
from dancegrpo_trainer.routing import RewardRouting
from dancegrpo_trainer.scored_update import RewardAdvantages
from dancegrpo_trainer.scoring import ChunkSubmitter, RewardScorer, group_run_lengths

ENDPOINTS = [
    {"target": "t:1", "reward": "geneval", "output": "correct", "name": "geneval"},
    {"target": "t:2", "reward": "ocr", "output": "score", "name": "ocr", "weight": 2.0},
    {"target": "t:1", "reward": "pickscore", "output": "score", "name": "pick", "weight": 0.5},
]


def routed_config(**data: Any) -> Any:
    sources = [
        {"name": "geneval", "train_prompts": ["a cat"], "rewards": ["geneval", "pick"]},
        {"name": "ocr", "train_prompts": ['a sign "OPEN"'], "rewards": {"ocr": 1.0, "pick": 3.0}},
    ]
    return config_from_dict(
        {
            "rewards": {"endpoints": [dict(e) for e in ENDPOINTS]},
            "data": {"sources": sources, **data},
        }
    )


# ------------------------------------------------------------------ config


def test_routed_config_resolves_each_sources_labels_and_weights() -> None:
    cfg = routed_config()
    routing = RewardRouting(cfg.rewards.endpoints, cfg.data.sources)
    geneval = PromptRecord("a cat", source="geneval")
    ocr = PromptRecord('a sign "OPEN"', source="ocr")
    assert routing.route(geneval) == {"geneval": 1.0, "pick": 0.5}  # endpoint weights
    assert routing.route(ocr) == {"ocr": 1.0, "pick": 3.0}  # the source's own weights
    assert routing.sample_routes([geneval, ocr], 2) == [
        {"geneval": 1.0, "pick": 0.5},
        {"geneval": 1.0, "pick": 0.5},
        {"ocr": 1.0, "pick": 3.0},
        {"ocr": 1.0, "pick": 3.0},
    ]
    unrouted = RewardRouting(cfg.rewards.endpoints, [])
    assert unrouted.sample_routes([geneval], 2) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_prompts": ["x"]}, r"data.train_prompts: must be empty when data.sources"),
        ({"sources.0.rewards": ["nope"]}, r"data.sources\[0\].rewards: 'nope' is not a rewards"),
        ({"sources.0.rewards": []}, r"data.sources\[0\].rewards: is required"),
        ({"sources.1.rewards": {"ocr": 0}}, r"data.sources\[1\].rewards.ocr: weight must be"),
        ({"sources.1.name": "geneval"}, r"data.sources: names must be unique"),
        ({"sources.1.name": "a b"}, r"data.sources\[1\].name: is required: letters"),
        ({"sources.0.share": 2.0}, r"data.sources\[1\].share: set share on every source"),
        ({"sources.0.train_prompts": []}, r"data.sources\[0\].train_prompts: is required"),
        (
            {"sources.0.rewards": ["pick"], "sources.1.rewards": ["pick"]},
            r"rewards.endpoints\[0\]: 'geneval' scores no prompt source",
        ),
        (
            {"sources.0.rewards": ["geneval", "geneval"]},
            r"data.sources\[0\].rewards: lists a label twice",
        ),
    ],
)
def test_bad_routing_configs_fail_naming_the_field(change: dict, message: str) -> None:
    sources = [
        {"name": "geneval", "train_prompts": ["a cat"], "rewards": ["geneval", "pick"]},
        {"name": "ocr", "train_prompts": ["b"], "rewards": {"ocr": 1.0, "pick": 3.0}},
    ]
    data: dict[str, Any] = {"sources": sources}
    for key, value in change.items():
        parts = key.split(".")
        if parts[0] == "sources":
            sources[int(parts[1])][parts[2]] = value
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"rewards": {"endpoints": [dict(e) for e in ENDPOINTS]}, "data": data})


def test_metadata_endpoints_need_jsonl_only_in_the_sources_they_score(tmp_path: Path) -> None:
    rows = tmp_path / "geneval.jsonl"
    rows.write_text(
        json.dumps(
            {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}
        )
        + "\n"
    )
    endpoints = [dict(e) for e in ENDPOINTS]
    endpoints[0]["metadata"] = True
    ok = {
        "sources": [
            {"name": "geneval", "train_prompts": str(rows), "rewards": ["geneval", "pick"]},
            {"name": "ocr", "train_prompts": ["b"], "rewards": ["ocr", "pick"]},  # .txt-like: fine
        ]
    }
    cfg = config_from_dict({"rewards": {"endpoints": endpoints}, "data": ok})
    train, _ = load_prompt_sets(cfg.data)
    assert [(r.source, r.metadata is not None) for r in train] == [
        ("geneval", True),
        ("ocr", False),
    ]
    bad = {"sources": [dict(ok["sources"][0], train_prompts=["a cat"]), ok["sources"][1]]}
    with pytest.raises(
        ConfigError,
        match=r"rewards.endpoints\[0\].metadata: is true, so data.sources\[0\].train_prompts must be a .jsonl",
    ):
        config_from_dict({"rewards": {"endpoints": endpoints}, "data": bad})


# ------------------------------------------------------------------ advantages


def test_routed_advantages_equal_each_groups_own_rewards_by_hand() -> None:
    nan = float("nan")
    # Two groups of 3: group 0 scored by a (w 1) and b (w 0.5), group 1 by b only (w 2).
    a = torch.tensor([1.0, 0.0, 2.0, nan, nan, nan])
    b = torch.tensor([3.0, 3.0, 0.0, 1.0, 4.0, 1.0])
    wa = torch.tensor([1.0] * 3 + [0.0] * 3)
    wb = torch.tensor([0.5] * 3 + [2.0] * 3)
    adv = routed_advantages({"a": a, "b": b}, {"a": wa, "b": wb}, group_size=3)

    def z(x: list[float]) -> list[float]:  # (r - mean) / (unbiased std + 1e-8)
        t = torch.tensor(x, dtype=torch.float32)
        return ((t - t.mean()) / (t.std() + 1e-8)).tolist()

    expected = [1 * za + 0.5 * zb for za, zb in zip(z([1, 0, 2]), z([3, 3, 0]), strict=True)]
    expected += [2 * zb for zb in z([1, 4, 1])]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    # Every group routed to every reward at its constant weight: exactly the unrouted math.
    rewards = {"a": torch.rand(6), "b": torch.rand(6)}
    full = {"a": torch.full((6,), 1.0), "b": torch.full((6,), 0.5)}
    torch.testing.assert_close(
        routed_advantages(rewards, full, group_size=3),
        multi_reward_advantages(rewards, {"a": 1.0, "b": 0.5}, group_size=3),
        rtol=0,
        atol=0,
    )


def test_routed_advantages_refuse_nan_where_routed_and_weights_varying_in_a_group() -> None:
    nan = float("nan")
    with pytest.raises(ValueError, match="NaN for a sample routed"):
        routed_advantages({"a": torch.tensor([nan, 1.0])}, {"a": torch.ones(2)}, group_size=2)
    with pytest.raises(ValueError, match="constant within each group"):
        routed_advantages(
            {"a": torch.tensor([0.0, 1.0])}, {"a": torch.tensor([1.0, 2.0])}, group_size=2
        )


def test_routed_stats_average_each_sample_over_its_own_terms() -> None:
    cfg = routed_config()
    adv = RewardAdvantages(cfg.rewards, group_size=2)
    nan = np.nan
    terms = {
        "geneval": np.array([1, 0, nan, nan], np.float32),
        "ocr": np.array([nan, nan, 0.5, 0.25], np.float32),
        "pick": np.array([20, 22, 18, 18], np.float32),
    }
    weights = {
        "geneval": np.array([1, 1, 0, 0], np.float32),
        "ocr": np.array([0, 0, 1, 1], np.float32),
        "pick": np.array([0.5, 0.5, 3, 3], np.float32),
    }
    outputs = {"ocr/score": terms["ocr"]}
    stats = adv.stats(terms, outputs, weights, ["geneval", "geneval", "ocr", "ocr"])
    per_sample = [(1 + 10) / 1.5, (0 + 11) / 1.5, (0.5 + 54) / 4, (0.25 + 54) / 4]
    assert stats["reward_mean"] == pytest.approx(np.mean(per_sample))
    assert stats["reward/geneval_mean"] == pytest.approx(0.5)  # its two samples only
    assert stats["reward/ocr_mean"] == pytest.approx(0.375)
    assert stats["output/ocr/score_mean"] == pytest.approx(0.375)
    assert stats["source/geneval/reward_mean"] == pytest.approx(np.mean(per_sample[:2]))
    assert stats["source/ocr/reward_mean"] == pytest.approx(np.mean(per_sample[2:]))
    assert stats["source/ocr/samples"] == 2


def test_dropping_constant_groups_counts_only_the_terms_routed_to_each_group() -> None:
    cfg = routed_config()
    adv = RewardAdvantages(cfg.rewards, group_size=2, drop_constant_groups=True)
    nan = np.nan
    # Group 0 (geneval source): geneval constant, pick varies -> kept. Group 1 (ocr
    # source): ocr and pick constant, geneval NaN (not routed) -> dropped. Group 2 (ocr):
    # ocr varies -> kept.
    terms = {
        "geneval": np.array([1, 1, nan, nan, nan, nan], np.float32),
        "ocr": np.array([nan, nan, 0.5, 0.5, 0.2, 0.7], np.float32),
        "pick": np.array([20, 22, 18, 18, 19, 19], np.float32),
    }
    routed = {"geneval": [1, 0, 0], "ocr": [0, 1, 1], "pick": [0.5, 3, 3]}
    weights = {k: np.repeat(np.asarray(w, np.float32), 2) for k, w in routed.items()}
    np.testing.assert_array_equal(adv.constant_groups(terms, weights), [False, True, False])
    keep = adv.kept_rows(terms, 2, weights)
    assert keep is not None and keep.tolist() == [True, True, False, False, True, True]
    # The dropped group's advantage is exactly 0: dropping it changes no other sample's.
    assert adv.of_groups(terms, weights)[2:4].abs().max() == 0
    # Without the weights a NaN column never counts as constant: nothing would be dropped.
    assert not adv.constant_groups(terms).any()


# ------------------------------------------------------------------ scoring


class FakeClient:
    """Records ``score_async`` calls; answers ``score`` = 100·i for the i-th prompt of the
    call plus the sample's mean pixel, and hosts the rewards in ``group_wise`` group-wise."""

    def __init__(self, target: str, calls: list, group_wise: set[str]) -> None:
        self.target, self.calls, self.group_wise = target, calls, group_wise

    def list_rewards(self, timeout: float | None = None) -> list[pb.RewardInfo]:
        names = ("geneval", "ocr", "pickscore", "pref")
        scope = {True: pb.SCORING_SCOPE_GROUP, False: pb.SCORING_SCOPE_SAMPLE}
        return [pb.RewardInfo(name=n, scoring_scope=scope[n in self.group_wise]) for n in names]

    def score_async(self, reward: str, **kwargs: Any) -> concurrent.futures.Future:
        self.calls.append((self.target, reward, kwargs))
        images = kwargs["images"]
        values = np.asarray([img.mean() for img in images], np.float32)
        out = {"correct": values, "score": values, "win_rate": values}
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(out)
        return future


def fake_scorer(
    endpoints: list[dict], group_wise: set[str] = frozenset()
) -> tuple[RewardScorer, list]:
    calls: list = []
    eps = [RewardEndpoint(**e) for e in endpoints]
    scorer = RewardScorer(eps, client_factory=lambda t, ep: FakeClient(t, calls, set(group_wise)))
    return scorer, calls


def test_each_call_gets_exactly_the_samples_routed_to_it() -> None:
    scorer, calls = fake_scorer(ENDPOINTS)
    frames = np.stack([np.full((2, 2, 3), v, np.uint8) for v in range(6)])
    g, o = {"geneval": 1.0, "pick": 0.5}, {"ocr": 1.0, "pick": 3.0}
    routes = [g, g, o, o, g, g]
    scores = scorer.submit(frames, list("abcdef"), routes=routes).result()
    sent = {(t, r): kw["prompts"] for t, r, kw in calls}
    assert sent == {
        ("t:1", "geneval"): ["a", "b", "e", "f"],
        ("t:2", "ocr"): ["c", "d"],
        ("t:1", "pickscore"): list("abcdef"),
    }
    nan = np.nan
    np.testing.assert_array_equal(scores.terms["geneval"], [0, 1, nan, nan, 4, 5])
    np.testing.assert_array_equal(scores.terms["ocr"], [nan, nan, 2, 3, nan, nan])
    np.testing.assert_array_equal(scores.terms["pick"], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(scores.weights["pick"], [0.5, 0.5, 3, 3, 0.5, 0.5])
    np.testing.assert_array_equal(scores.weights["ocr"], [0, 0, 1, 1, 0, 0])
    # No sample for ocr in this batch: no call to it at all, and NaN / weight 0.
    calls.clear()
    scores = scorer.submit(frames[:2], ["a", "b"], routes=[g, g]).result()
    assert sorted(r for _, r, _ in calls) == ["geneval", "pickscore"]
    assert np.isnan(scores.terms["ocr"]).all() and (scores.weights["ocr"] == 0).all()


def test_group_wise_calls_carry_group_sizes_of_their_own_samples() -> None:
    endpoints = [
        {"target": "t:1", "reward": "pref", "output": "win_rate", "name": "pref"},
        {"target": "t:1", "reward": "pickscore", "output": "score", "name": "pick"},
    ]
    scorer, calls = fake_scorer(endpoints, group_wise={"pref"})
    assert scorer.needs_whole_groups and scorer.group_wise_labels() == {"pref"}
    frames = np.zeros((6, 2, 2, 3), np.uint8)
    routes = [{"pick": 1.0}] * 2 + [{"pref": 1.0, "pick": 1.0}] * 4
    scorer.submit(frames, list("abcdef"), routes=routes, groups=[0, 0, 1, 1, 2, 2]).result()
    sent = {r: kw for _, r, kw in calls}
    assert sent["pref"]["group_sizes"] == [2, 2] and sent["pref"]["prompts"] == list("cdef")
    assert "group_sizes" not in sent["pickscore"]  # per-sample rewards get no groups
    with pytest.raises(ValueError, match=r"rewards.endpoints\[0\]: reward 'pref' is group-wise"):
        scorer.submit(frames, list("abcdef"))
    assert group_run_lengths([3, 3, 0, 0, 0, 7]) == [2, 3, 1]


def test_an_endpoint_the_service_does_not_host_fails_naming_it() -> None:
    scorer, _ = fake_scorer([{"target": "t:1", "reward": "nope", "output": "score"}])
    with pytest.raises(
        Exception, match=r"rewards.endpoints\[0\].reward: 'nope' is not hosted at t:1"
    ):
        assert scorer.needs_whole_groups


@pytest.mark.parametrize(
    ("group_wise", "chunk", "submitted"),
    [
        (set(), 3, [(0, 3), (3, 6), (6, 8)]),  # per-sample: as chunks finish
        ({"pref"}, 3, [(0, 8)]),  # 3, 6 end inside groups of 4: wait for 8
        ({"pref"}, 2, [(0, 4), (4, 8)]),
        ({"pref"}, 5, [(0, 8)]),
    ],
)
def test_chunks_are_submitted_at_group_boundaries_when_a_reward_is_group_wise(
    group_wise: set[str], chunk: int, submitted: list[tuple[int, int]]
) -> None:
    endpoints = [{"target": "t:1", "reward": "pref", "output": "win_rate"}]
    scorer, calls = fake_scorer(endpoints, group_wise=group_wise)
    frames = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 2, 2, 3).contiguous()
    submit = ChunkSubmitter(scorer, 4, [f"p{i // 4}" for i in range(8)])
    for start in range(0, 8, chunk):
        rows = slice(start, min(start + chunk, 8))
        submit(rows, frames[rows])
    assert [(r.start, r.stop) for r, _ in submit.chunks] == submitted
    for (rows, pending), (_, _, kwargs) in zip(submit.chunks, calls, strict=True):
        values = pending.result().terms["pref/win_rate"]
        np.testing.assert_array_equal(values, np.arange(rows.start, rows.stop))  # in order
        if group_wise:
            assert kwargs["group_sizes"] == [4] * ((rows.stop - rows.start) // 4)


# ------------------------------------------------------------------ sampling


def test_mixture_sampler_follows_shares_and_resumes_exactly() -> None:
    sampler = MixtureSampler([5, 20], [3.0, 1.0], seed=3)
    draws = sampler.next_indices(4000)
    from_first = np.mean(np.asarray(draws) < 5)
    assert from_first == pytest.approx(0.75, abs=0.03)  # 3 : 1 whatever the sizes
    # Each source is walked in seeded epochs: every prompt of source 0 once per 5 draws.
    first = [d for d in draws if d < 5]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    # Same seed, same sequence; a sampler restored from a state continues it exactly.
    again = MixtureSampler([5, 20], [3.0, 1.0], seed=3)
    head = again.next_indices(1234)
    assert head == draws[:1234]
    resumed = MixtureSampler([5, 20], [3.0, 1.0], seed=3)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert resumed.next_indices(4000 - 1234) == draws[1234:]
    with pytest.raises(ValueError, match="sources of"):
        MixtureSampler([5, 21], [3.0, 1.0], seed=3).load_state_dict(again.state_dict())


def test_pooled_sources_sample_like_one_prompt_list() -> None:
    pooled = PromptSampler(7, seed=1)
    assert sorted(pooled.next_indices(7)) == list(range(7))


def test_per_prompt_trackers_see_only_the_prompts_their_reward_scores() -> None:
    cfg = config_from_dict(
        {
            "rewards": {
                "endpoints": [dict(e) for e in ENDPOINTS],
                "advantage": "per_prompt",
                "tracker_buffer_size": 4,
                "tracker_min_count": 1,
            },
            "data": routed_config().to_dict()["data"],
        }
    )
    adv = RewardAdvantages(cfg.rewards, group_size=2)
    nan = np.nan
    terms = {
        "geneval": np.array([1, 0, nan, nan], np.float32),
        "ocr": np.array([nan, nan, 0.5, 0.25], np.float32),
        "pick": np.array([20, 22, 18, 19], np.float32),
    }
    weights = {
        "geneval": np.array([1, 1, 0, 0], np.float32),
        "ocr": np.array([0, 0, 1, 1], np.float32),
        "pick": np.array([0.5, 0.5, 3, 3], np.float32),
    }
    prompts = ["g", "g", "o", "o"]
    out = adv.of_batch(terms, prompts, weights)
    assert adv.trackers["geneval"].state_dict()["buffers"] == {"g": [1.0, 0.0]}
    assert adv.trackers["ocr"].state_dict()["buffers"] == {"o": [0.5, 0.25]}
    assert set(adv.trackers["pick"].state_dict()["buffers"]) == {"g", "o"}
    # (r - mean) / (biased std + 1e-6) per prompt, each weighted by its source's weight.
    expected = [1 * 1 + 0.5 * -1, 1 * -1 + 0.5 * 1, 1 * 1 + 3 * -1, 1 * -1 + 3 * 1]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)
