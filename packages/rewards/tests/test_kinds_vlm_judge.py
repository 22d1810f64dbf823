"""The ``vlm_judge`` kind against a local OpenAI-compatible server (tiny Qwen2-VL, no network)."""

from __future__ import annotations

import json
import socket

import grpc
import numpy as np
import pytest

from dancegrpo_proto.client import RewardServiceError
from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.vlm_judge import (
    FLOW_GRPO_UNIFIEDREWARD_TEMPLATE,
    JudgeError,
    VLMJudgeReward,
    parse_regex_scores,
    yes_probability,
)
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing.openai_judge import (
    RuleJudge,
    TinyVLMJudge,
    decode_data_url,
    serve_judge,
    write_tiny_vlm_judge,
)
from dancegrpo_testing.reward_checks import (
    assert_batch_invariant,
    assert_serves_like_local,
    batch_of,
    served_reward,
)

PROMPTS = ["a dog", "two cats", "a red cube on a table", "sunset over the sea"] * 2
YES_NO_TEMPLATE = "Does this image show {prompt}? Answer Yes or No."
#: UnifiedReward-2.0's pointwise image instruction and output format
#: (inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py).
UNIFIEDREWARD_2_PATTERNS = {
    "alignment": r"Alignment Score \(1-5\):\s*([0-9]+(?:\.[0-9]+)?)",
    "coherence": r"Coherence Score \(1-5\):\s*([0-9]+(?:\.[0-9]+)?)",
    "style": r"Style Score \(1-5\):\s*([0-9]+(?:\.[0-9]+)?)",
}


def images_of(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (28 + 8 * (i % 3), 56 - 4 * (i % 2), 3), dtype=np.uint8)
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> TinyVLMJudge:
    return TinyVLMJudge(write_tiny_vlm_judge(tmp_path_factory.mktemp("judge")))


def judge(base_url: str, **options) -> VLMJudgeReward:
    reward = VLMJudgeReward(
        "judge", {"base_url": base_url, "model": "tiny-judge", "backoff_initial_s": 0.01, **options}
    )
    reward.load()
    return reward


# -- a real (tiny) VLM behind the HTTP API ----------------------------------------------------


def test_yes_probability_equals_the_model_read_directly(tiny_judge: TinyVLMJudge) -> None:
    images = images_of(8)
    with serve_judge(tiny_judge) as server:
        reward = judge(
            server.base_url, mode="yes_no", prompt_template=YES_NO_TEMPLATE, top_logprobs=400
        )
        out = reward.score(batch_of(images, PROMPTS))["score"]
    reference = [
        tiny_judge.yes_probability([image], YES_NO_TEMPLATE.format(prompt=prompt))
        for image, prompt in zip(images, PROMPTS, strict=True)
    ]
    assert reward.output_names == ("score",) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(reference, np.float32), atol=1e-5, rtol=0)
    assert np.ptp(out) > 1e-3 and np.all((out > 0) & (out < 1))
    body = server.requests[0]
    assert (body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (1, True, 400)
    assert body["temperature"] == 0.0


def test_batch_of_8_equals_one_by_one(tiny_judge: TinyVLMJudge) -> None:
    images = images_of(8, seed=1)
    with serve_judge(tiny_judge) as server:
        reward = judge(
            server.base_url, mode="yes_no", prompt_template=YES_NO_TEMPLATE, top_logprobs=400
        )
        assert_batch_invariant(reward, batch_of(images, PROMPTS), atol=1e-6)


def test_regex_reply_without_a_score_is_an_error_not_zero(tiny_judge: TinyVLMJudge) -> None:
    with serve_judge(tiny_judge) as server:
        reward = judge(server.base_url, max_tokens=6)
        with pytest.raises(JudgeError, match="no match for 'score' pattern") as err:
            reward.score(batch_of(images_of(1), ["a dog"]))
    assert "batch sample 0" in str(err.value) and server.base_url in str(err.value)


def test_yes_and_no_missing_from_top_logprobs_is_an_error(tiny_judge: TinyVLMJudge) -> None:
    with serve_judge(tiny_judge) as server:
        reward = judge(server.base_url, mode="yes_no", top_logprobs=1)
        with pytest.raises(JudgeError, match="neither 'Yes' nor 'No'"):
            reward.score(batch_of(images_of(1), ["a dog"]))


# -- the request and the parsing (rule judge) -------------------------------------------------


def test_flow_grpo_unifiedreward_defaults() -> None:
    images = images_of(3, seed=2)
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, score_scale=0.2)
        out = reward.score(batch_of(images, PROMPTS[:3]))["score"]
    expected = [round(1 + 4 * float(image.mean()) / 255, 4) * 0.2 for image in images]
    np.testing.assert_allclose(out, np.asarray(expected, np.float32), rtol=1e-6)
    (body,) = [b for b in server.requests if "[a dog]" in json.dumps(b)]  # concurrent: any order
    assert body["model"] == "tiny-judge" and body["max_tokens"] == 512
    (message,) = body["messages"]
    image_part, text_part = message["content"]
    assert text_part["text"] == FLOW_GRPO_UNIFIEDREWARD_TEMPLATE.replace("{prompt}", "a dog")
    assert text_part["text"].endswith("Text Caption: [a dog]")
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    np.testing.assert_array_equal(decode_data_url(image_part["image_url"]["url"]), images[0])


def test_several_scores_from_one_reply() -> None:
    reply = "Alignment Score (1-5): 2.5\nCoherence Score (1-5): 3\nStyle Score (1-5): 4.25"
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, score_patterns=UNIFIEDREWARD_2_PATTERNS)
        server.faults.append(("content", reply))
        out = reward.score(batch_of(images_of(1), ["a dog"]))
    assert reward.output_names == ("alignment", "coherence", "style")
    assert {k: float(v[0]) for k, v in out.items()} == {
        "alignment": 2.5,
        "coherence": 3.0,
        "style": 4.25,
    }


def test_jpeg_resize_system_prompt_extra_body_and_condition_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JUDGE_TOKEN", "s3cret")
    images = images_of(2, seed=3)
    conditions = [np.zeros((40, 40, 3), np.uint8)] * 2  # black: tells the two images apart
    with serve_judge(RuleJudge()) as server:
        reward = judge(
            server.base_url,
            image_format="jpeg",
            resize_to=64,
            system_prompt="You are a strict judge.",
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
            send_condition_image=True,
            api_key_env="JUDGE_TOKEN",
        )
        reward.score(batch_of(images, PROMPTS[:2], conditions))
    assert reward.requires_condition_image
    assert set(server.authorization) == {"Bearer s3cret"}
    (body,) = [b for b in server.requests if "a dog" in json.dumps(b)]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are a strict judge."}
    first, second, _ = user["content"]
    assert first["image_url"]["url"].startswith("data:image/jpeg;base64,")
    condition_sent = decode_data_url(first["image_url"]["url"])
    sample_sent = decode_data_url(second["image_url"]["url"])
    assert condition_sent.shape == sample_sent.shape == (64, 64, 3)
    assert condition_sent.mean() < 5 < 60 < sample_sent.mean()  # the condition goes first


def test_pure_parsers() -> None:
    import re

    patterns = {"score": re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")}
    assert parse_regex_scores("x Final Score: 4.5 then Final Score: 2", patterns, 0.2) == {
        "score": pytest.approx(0.9)
    }
    assert "no match" in parse_regex_scores("Final Score: 7", patterns, 1.0)
    top = [{"token": " yes", "logprob": np.log(0.3)}, {"token": "NO", "logprob": np.log(0.1)}]
    assert yes_probability(top, "Yes", "No") == pytest.approx(0.75)
    assert yes_probability(top[:1], "Yes", "No") == 1.0
    assert "neither" in yes_probability([{"token": "maybe", "logprob": 0.0}], "Yes", "No")


# -- failures: retries, timeouts, HTTP errors, start-up checks --------------------------------


def test_retryable_statuses_are_retried_with_backoff() -> None:
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, max_retries=3)
        server.faults.extend([("status", 503), ("status", 429)])
        out = reward.score(batch_of(images_of(1), ["a dog"]))["score"]
    assert np.isfinite(out[0]) and len(server.requests) == 3


def test_retries_run_out_with_a_clear_error() -> None:
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, max_retries=1)
        server.faults.extend([("status", 502), ("status", 502)])
        with pytest.raises(JudgeError, match=r"HTTP 502 .*after 2 attempts"):
            reward.score(batch_of(images_of(1), ["a dog"]))


def test_client_errors_are_not_retried() -> None:
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, max_retries=3)
        server.faults.append(("status", 400))
        with pytest.raises(JudgeError, match="HTTP 400"):
            reward.score(batch_of(images_of(1), ["a dog"]))
    assert len(server.requests) == 1


def test_a_slow_judge_times_out() -> None:
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, timeout_s=0.2, max_retries=0)
        server.faults.append(("sleep", 1.0))
        with pytest.raises(JudgeError, match="too slow"):
            reward.score(batch_of(images_of(1), ["a dog"]))


def test_concurrency_is_bounded() -> None:
    with serve_judge(RuleJudge()) as server:
        reward = judge(server.base_url, max_concurrency=3)
        server.faults.extend([("sleep", 0.3)] * 8)
        reward.score(batch_of(images_of(8), PROMPTS))
    assert 1 < server.max_in_flight <= 3


def test_load_checks_the_endpoint_and_model() -> None:
    with (
        serve_judge(RuleJudge(), model="other-model") as server,
        pytest.raises(RewardConfigError, match="'model': 'tiny-judge' is not served"),
    ):
        judge(server.base_url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(RewardConfigError, match="'base_url'") as err:
        judge(closed, max_retries=0)
    assert closed in str(err.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"model": "m"}, "base_url"),
        ({"base_url": "judge:8000"}, "base_url"),
        ({"base_url": "http://x/v1"}, "model"),
        ({"mode": "logits"}, "mode"),
        ({"score_patterns": {"score": r"Final Score: \d"}}, "score_patterns.score"),
        ({"score_patterns": {"Score": r"(\d)"}}, "score_patterns.Score"),
        ({"score_patterns": {"score": "(["}}, "score_patterns.score"),
        ({"mode": "yes_no", "score_patterns": {"s": r"(\d)"}}, "score_patterns"),
        ({"top_logprobs": 0}, "top_logprobs"),
        ({"image_format": "webp"}, "image_format"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"no_token": "yes"}, "no_token"),
        ({"api_key_env": "DANCEGRPO_TEST_UNSET_VARIABLE"}, "api_key_env"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    full = {"base_url": "http://127.0.0.1:9/v1", "model": "m", **options}
    for name in ("base_url", "model"):
        if name == key and name not in options:
            del full[name]
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        VLMJudgeReward("judge", full)


def test_registry_and_version() -> None:
    assert reward_class("vlm_judge") is VLMJudgeReward
    base = {"base_url": "http://a:1/v1", "model": "m"}
    a = VLMJudgeReward("a", base)
    assert a.version.startswith("vlm_judge-")
    assert a.version == VLMJudgeReward("b", {**base, "base_url": "http://b:2/v1"}).version
    assert a.version != VLMJudgeReward("c", {**base, "prompt_template": "{prompt}?"}).version
    assert not VLMJudgeReward("d", {**base, "prompt_template": "Is it pretty?"}).requires_prompt


def test_vlm_judge_scores_through_a_real_server() -> None:
    images = np.random.default_rng(5).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    with serve_judge(RuleJudge()) as judge_server:
        options = {"base_url": judge_server.base_url, "model": "tiny-judge", "score_scale": 0.2}
        config = {"rewards": {"unifiedreward": {"kind": "vlm_judge", "options": options}}}
        local = VLMJudgeReward("unifiedreward", options)
        with served_reward(config) as client:
            batch = batch_of(list(images), PROMPTS[:3])
            assert_serves_like_local(client, "unifiedreward", local, batch, atol=0, rtol=1e-6)
            judge_server.faults.append(("content", "I cannot rate this."))
            with pytest.raises(RewardServiceError) as err:
                client.score("unifiedreward", images=images[:1], prompts=["a dog"])
            assert err.value.code == grpc.StatusCode.INTERNAL
            assert "JudgeError" in err.value.details and "no match" in err.value.details
