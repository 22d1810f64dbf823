"""``pairwise_preference``: Pref-GRPO's pairwise win rate within each group.

The reference is Pref-GRPO's ``_pairwise_win_rate`` (``fastvideo/rewards/
unifiedreward_think.py``), which cannot be imported here (it needs their repository,
OpenCV and a vLLM client): :func:`pref_grpo_reference` restates its semantics from reading
it (every pair ``i < j`` once with ``i`` as Image 1; the winner by ``<answer>`` text, else
½ each; rate = wins / comparisons) and the tests feed it the judge's recorded replies.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import defaultdict
from typing import Any

import grpc
import numpy as np
import pytest

from dancegrpo_proto import RewardClient, RewardServiceError
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc
from dancegrpo_rewards.base import RewardBatch, RewardConfigError
from dancegrpo_rewards.cli import main as cli_main
from dancegrpo_rewards.kinds.pairwise import PairwisePreferenceReward, pair_schedule, win_rates
from dancegrpo_rewards.kinds.pairwise_judges import (
    UNIFIEDREWARD_THINK_IMAGE_TEMPLATE,
    VLMPairwiseOptions,
    parse_pairwise_answer,
)
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing.openai_judge import ChatInput, serve_judge
from dancegrpo_testing.servers import running_reward_server

#: SHA-256 of Pref-GRPO's ``get_unifiedreward_think_image_template()`` return value
#: (commit 3e787f6 of github.com/CodeGoat24/Pref-GRPO).
UR_THINK_SHA256 = "a8a0d80818246406b783d5cca630336c5fdf1264fef13f09d09bd94d61a139d5"


def pref_grpo_reference(num_items: int, responses: list[tuple[int, int, str]]) -> list[float]:
    """Pref-GRPO's win rate from ``(first_index, second_index, model_output)`` replies."""
    wins: dict[int, float] = defaultdict(float)
    compared: dict[int, int] = defaultdict(int)
    for first, second, output in responses:
        compared[first] += 1
        compared[second] += 1
        match = re.search(r"<answer>(.*?)</answer>", output, re.DOTALL)
        answer = match.group(1).strip() if match else None
        if answer and "Image 1 is better" in answer:
            wins[first] += 1
        elif answer and "Image 2 is better" in answer:
            wins[second] += 1
        else:
            wins[first] += 0.5
            wins[second] += 0.5
    return [wins[i] / compared[i] if compared[i] else 0.0 for i in range(num_items)]


def _images(levels: list[int]) -> list[np.ndarray]:
    return [np.full((8, 8, 3), v, np.uint8) for v in levels]


def _batch(levels: list[int], groups: tuple[int, ...] | None = None) -> RewardBatch:
    n = len(levels)
    return RewardBatch(["a photo"] * n, _images(levels), [None] * n, [None] * n, groups or (n,))


def _score_reward(**judge: Any) -> PairwisePreferenceReward:
    return PairwisePreferenceReward(
        "pref", {"judge": {"type": "score", "reward": {"kind": "brightness"}, **judge}}
    )


# ------------------------------------------------------------------ the win-rate math


def test_win_rates_on_hand_cases() -> None:
    def rates(scores: list[float]) -> list[float]:
        pairs = pair_schedule([len(scores)], both_orders=False)
        first = [
            1.0 if scores[i] > scores[j] else 0.0 if scores[i] < scores[j] else 0.5
            for i, j in pairs
        ]
        return win_rates(len(scores), pairs, first).tolist()

    assert rates([3, 1, 2]) == [1.0, 0.0, 0.5]  # strict order: k wins of G - 1 = 2
    assert rates([1, 1, 0]) == [0.75, 0.75, 0.0]  # a tie gives each ½
    assert rates([5, 5, 5, 5]) == [0.5] * 4  # all equal: every pair a tie
    assert rates([2, 1]) == [1.0, 0.0]  # G = 2: one comparison
    assert rates([1, 1]) == [0.5, 0.5]
    for scores in ([3, 1, 2], [1, 1, 0], [4, 4, 1, 7, 2]):  # a group's rates average ½
        assert np.mean(rates(scores)) == pytest.approx(0.5)


def test_pair_schedule_covers_each_group_only() -> None:
    assert pair_schedule([3, 2], both_orders=False) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    assert pair_schedule([2], both_orders=True) == [(0, 1), (1, 0)]


def test_win_rates_reject_uncompared_items_and_bad_shares() -> None:
    with pytest.raises(ValueError, match="never compared"):
        win_rates(3, [(0, 1)], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rates(2, [(0, 1)], [1.5])


# ------------------------------------------------------------------ the score judge


def test_score_judge_ranks_by_the_inner_reward_with_ties_and_margin() -> None:
    reward = _score_reward()
    out = reward.score(_batch([200, 10, 100, 100]))["win_rate"]
    # brightness 200 beats all (3/3), 10 loses all (0/3), the two 100s beat 10 and tie.
    np.testing.assert_allclose(out, [1.0, 0.0, 1.5 / 3, 1.5 / 3])
    # margin 0.5: 200 vs 10 (0.75 apart in brightness) is decided, the pairs with 100
    # (0.39 and 0.35 apart) are ties.
    out = _score_reward(margin=0.5).score(_batch([200, 10, 100]))["win_rate"]
    np.testing.assert_allclose(out, [0.75, 0.25, 0.5])


def test_groups_are_judged_separately_so_batching_changes_nothing() -> None:
    reward = _score_reward()
    levels, groups = [50, 60, 70, 70, 0, 255, 128, 5, 6], (3, 2, 4)
    together = reward.score(_batch(levels, groups))["win_rate"]
    alone, start = [], 0
    for size in groups:
        alone.append(reward.score(_batch(levels[start : start + size]))["win_rate"])
        start += size
    np.testing.assert_array_equal(together, np.concatenate(alone))
    # Judged within its group only: 70 beats 0; 255 > 128 > 6 > 5.
    np.testing.assert_allclose(together[3:], [1.0, 0.0, 1.0, 2 / 3, 0.0, 1 / 3])


def test_options_fail_at_construction_naming_the_key() -> None:
    with pytest.raises(RewardConfigError, match="'judge': required"):
        PairwisePreferenceReward("pref", {})
    with pytest.raises(RewardConfigError, match="judge.type"):
        PairwisePreferenceReward("pref", {"judge": {"type": "elo"}})
    with pytest.raises(RewardConfigError, match="'output'.*not an output"):
        _score_reward(output="nope")
    with pytest.raises(RewardConfigError, match="group-wise"):
        PairwisePreferenceReward(
            "pref",
            {
                "judge": {
                    "type": "score",
                    "reward": {
                        "kind": "pairwise_preference",
                        "judge": {"type": "score", "reward": {"kind": "brightness"}},
                    },
                }
            },
        )
    inner = {
        "kind": "pairwise_preference",
        "judge": {"type": "score", "reward": {"kind": "brightness"}},
    }
    for wrapper, extra in (("threshold", {"threshold": 0.5}), ("video_frames", {})):
        with pytest.raises(RewardConfigError, match=f"group-wise; {wrapper} needs a per-sample"):
            reward_class(wrapper)("w", {"reward": inner, **extra})
    with pytest.raises(RewardConfigError, match="'mode'"):
        PairwisePreferenceReward(
            "pref",
            {"judge": {"type": "vlm", "base_url": "http://x/v1", "model": "m", "mode": "yes_no"}},
        )
    with pytest.raises(RewardConfigError, match="answer_pattern"):
        PairwisePreferenceReward(
            "pref",
            {
                "judge": {
                    "type": "vlm",
                    "base_url": "http://x/v1",
                    "model": "m",
                    "answer_pattern": "x",
                }
            },
        )


# ------------------------------------------------------------------ the VLM judge


def test_unifiedreward_think_template_is_pref_grpos_byte_for_byte() -> None:
    digest = hashlib.sha256(UNIFIEDREWARD_THINK_IMAGE_TEMPLATE.encode()).hexdigest()
    assert digest == UR_THINK_SHA256
    assert UNIFIEDREWARD_THINK_IMAGE_TEMPLATE.count("{prompt}") == 1


def test_answer_parsing_follows_pref_grpo() -> None:
    options = VLMPairwiseOptions()
    assert (
        parse_pairwise_answer("<think>..</think>\n<answer>Image 1 is better</answer>", options)
        == 1.0
    )
    assert parse_pairwise_answer("<answer> Image 2 is better </answer>", options) == 0.0
    assert parse_pairwise_answer("<answer>They are equal</answer>", options) == 0.5
    assert parse_pairwise_answer("Image 1 is better", options) is None  # no answer tag


def _marked(quality: list[int]) -> list[np.ndarray]:
    """16x16 images: the left 8 columns at the sample's "quality", the right 8 at 40 x its
    index (the judge reads both back; flat 8x8 JPEG blocks keep them to within 1)."""
    images = []
    for i, q in enumerate(quality):
        image = np.empty((16, 16, 3), np.uint8)
        image[:, :8], image[:, 8:] = q, 40 * i
        images.append(image)
    return images


class PairJudge:
    """Answers like UnifiedReward-Think: the image of higher quality (left half) wins; equal
    quality gets a reply without an ``<answer>`` (Pref-GRPO: a tie); quality 77 in either
    image an answer naming neither (a tie too). Records ``(index 1, index 2, reply, text)``."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, int, str, str]] = []

    def __call__(self, chat: ChatInput) -> tuple[str, None]:
        (qa, ia), (qb, ib) = (
            (round(float(image[:, :8].mean())), round(float(image[:, 8:].mean()) / 40))
            for image in chat.images[-2:]
        )
        if 77 in (qa, qb):
            reply = "<think>hmm</think>\n<answer>Both are fine</answer>"
        elif qa == qb:
            reply = "<think>Total score: equal</think>"
        else:
            reply = f"<think>scores</think>\n<answer>Image {1 if qa > qb else 2} is better</answer>"
        self.replies.append((ia, ib, reply, chat.text))
        return reply, None


def test_vlm_judge_equals_pref_grpos_win_rate_on_the_same_replies() -> None:
    backend = PairJudge()
    quality = [90, 30, 30, 200, 77]
    with serve_judge(backend, model="UnifiedReward") as judge:
        reward = PairwisePreferenceReward(
            "pref",
            {"judge": {"type": "vlm", "base_url": judge.base_url, "model": "UnifiedReward"}},
        )
        reward.load()
        batch = RewardBatch(["a cat"] * 5, _marked(quality), [None] * 5, [None] * 5, (5,))
        out = reward.score(batch)["win_rate"]
        bodies = list(judge.requests)
    # Every pair i < j asked once, with sample i as Image 1 (Pref-GRPO's schedule).
    responses = [(first, second, reply) for first, second, reply, _ in backend.replies]
    assert sorted((f, s) for f, s, _ in responses) == list(itertools.combinations(range(5), 2))
    np.testing.assert_allclose(out, pref_grpo_reference(5, responses), rtol=0, atol=1e-7)
    # 200 beats all but 77 (3.5/4); 90 beats the 30s, loses to 200, ties 77 (2.5/4); the
    # two 30s tie each other and 77, lose to 90 and 200 (1/4); 77 ties everyone (2/4).
    np.testing.assert_allclose(out, [2.5 / 4, 1 / 4, 1 / 4, 3.5 / 4, 0.5], atol=1e-7)
    # The request: two JPEG images then UnifiedReward-Think's instruction with the caption.
    text = UNIFIEDREWARD_THINK_IMAGE_TEMPLATE.replace("{prompt}", "a cat")
    assert {t for *_, t in backend.replies} == {text}
    body = bodies[0]
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert body["max_tokens"] == 4096 and body["temperature"] == 0.0


def test_both_orders_cancels_a_judge_that_always_prefers_image_1() -> None:
    def biased(chat: ChatInput) -> tuple[str, None]:
        return "<answer>Image 1 is better</answer>", None

    with serve_judge(biased, model="m") as judge:
        options = {"type": "vlm", "base_url": judge.base_url, "model": "m"}
        once = PairwisePreferenceReward("a", {"judge": options})
        twice = PairwisePreferenceReward("b", {"judge": options, "both_orders": True})
        batch = _batch([1, 2, 3])
        np.testing.assert_allclose(once.score(batch)["win_rate"], [1.0, 0.5, 0.0])
        np.testing.assert_allclose(twice.score(batch)["win_rate"], [0.5, 0.5, 0.5])


def test_unparsed_error_fails_instead_of_a_tie() -> None:
    def silent(chat: ChatInput) -> tuple[str, None]:
        return "I cannot decide.", None

    with serve_judge(silent, model="m") as judge:
        judge_options = {"type": "vlm", "base_url": judge.base_url, "model": "m"}
        tie = PairwisePreferenceReward("a", {"judge": judge_options})
        np.testing.assert_allclose(tie.score(_batch([1, 2]))["win_rate"], [0.5, 0.5])
        strict = PairwisePreferenceReward("b", {"judge": {**judge_options, "unparsed": "error"}})
        with pytest.raises(RuntimeError, match="no answer matching"):
            strict.score(_batch([1, 2]))


# ------------------------------------------------------------------ a real server


def _config() -> dict[str, Any]:
    return {
        "rewards": {
            "pref": {
                "kind": "pairwise_preference",
                "max_batch_size": 6,
                "max_queue_delay_ms": 20,
                "options": {"judge": {"type": "score", "reward": {"kind": "brightness"}}},
            },
            "bright": {"kind": "brightness"},
        }
    }


def _details(info: pytest.ExceptionInfo[RewardServiceError]) -> tuple[grpc.StatusCode, str]:
    return info.value.code, info.value.details


def test_served_group_wise_reward_declares_itself_and_validates_groups(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = np.random.default_rng(0)
    sizes = [3, 2, 4, 6, 2]
    n = sum(sizes)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    with running_reward_server(_config(), metrics=False) as (target, _, _):
        with RewardClient(target, chunk_size=5) as client:
            infos = {info.name: info for info in client.list_rewards()}
            pref, bright = infos["pref"], infos["bright"]
            assert pref.scoring_scope == pb.SCORING_SCOPE_GROUP
            assert (pref.min_group_size, pref.max_group_size) == (2, 6)
            assert pref.output_names == ["win_rate"]
            assert bright.scoring_scope == pb.SCORING_SCOPE_SAMPLE
            assert (bright.min_group_size, bright.max_group_size) == (0, 0)
            assert cli_main(["list", "--target", target]) == 0
            lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
            assert lines["pref"].endswith("\tgroup-wise groups=2..6")
            assert "group-wise" not in lines["bright"]

            # Chunks of whole groups (chunk_size 5 < 17 samples): each group judged whole.
            out = client.score("pref", images=images, group_sizes=sizes)["win_rate"]
            brightness = client.score("bright", images=images)["score"]
            start = 0
            for size in sizes:
                b = brightness[start : start + size]
                want = [
                    (np.sum(b[i] > b) + 0.5 * (np.sum(b[i] == b) - 1)) / (size - 1)
                    for i in range(size)
                ]
                np.testing.assert_allclose(out[start : start + size], want, rtol=1e-6)
                start += size
            # Per-sample rewards accept group_sizes and ignore them.
            again = client.score("bright", images=images, group_sizes=sizes)["score"]
            np.testing.assert_array_equal(again, brightness)

            bad = [
                ({}, "group_sizes: required by group-wise reward 'pref'"),
                (
                    {"group_sizes": [2, 1]},
                    r"group_sizes\[1\]: a group of 1 is below the min_group_size 2",
                ),
                ({"group_sizes": [3]}, None),  # fits
            ]
            for kwargs, message in bad:
                if message is None:
                    client.score("pref", images=images[:3], **kwargs)
                    continue
                with pytest.raises(RewardServiceError) as info:
                    client.score("pref", images=images[:3], **kwargs)
                code, details = _details(info)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert re.match(message, details), details
            with pytest.raises(RewardServiceError) as info:
                client.score("pref", images=images[:7], group_sizes=[7])
            code, details = _details(info)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details.startswith("group_sizes[0]: a group of 7 exceeds max_batch_size=6")
        # A hand-built request whose sizes do not add up (the client refuses to send one).
        with grpc.insecure_channel(target) as channel:
            request = pb.ScoreRequest(reward="bright", group_sizes=[2, 2])
            for image in images[:3]:
                sample = request.samples.add()
                sample.media.raw.data = image.tobytes()
                sample.media.raw.shape.extend(image.shape)
            with pytest.raises(grpc.RpcError) as rpc:
                rewards_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=10)
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert rpc.value.details().startswith("group_sizes: sum to 4 but the request has 3")
