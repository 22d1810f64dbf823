"""The ``ocr`` kind: Flow-GRPO's text rule, and real PP-OCRv4 weights on rendered text."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import numpy as np
import pytest

from dancegrpo_proto.client import RewardServiceError
from dancegrpo_rewards.base import RewardConfigError, SampleError
from dancegrpo_rewards.kinds import ocr as ocr_module
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.ocr import OcrReward
from dancegrpo_rewards.kinds.ocr_text import levenshtein, normalize_ocr_text, ocr_match, ocr_target
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing.reward_checks import (
    assert_batch_invariant,
    assert_serves_like_local,
    batch_of,
    served_reward,
)
from dancegrpo_testing.text_images import available_fonts, render_text

pytest.importorskip("rapidocr_onnxruntime", reason="needs dancegrpo-rewards[ocr]")
Levenshtein = pytest.importorskip("Levenshtein", reason="Flow-GRPO's edit-distance library")


def flow_grpo_reward(recognized_text: str, prompt: str) -> float:
    """Flow-GRPO's ``OcrScorer.__call__`` after its PaddleOCR call (flow_grpo/ocr.py, commit
    ac4c86e), statement by statement on one recognised string; PaddleOCR itself cannot be
    installed here, so the recognised text is handed in. Same edit-distance library."""
    prompt = prompt.split('"')[1]
    recognized_text = recognized_text.replace(" ", "").lower()
    prompt = prompt.replace(" ", "").lower()
    if prompt in recognized_text:
        dist = 0
    else:
        dist = Levenshtein.distance(recognized_text, prompt)
    if dist > len(prompt):
        dist = len(prompt)
    return 1 - dist / (len(prompt))


@pytest.fixture(scope="module")
def ocr() -> OcrReward:
    reward = OcrReward("ocr", {"num_threads": 1})
    reward.load()
    return reward


# -- the text rule (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ('A sign that says "Hello World"', "Hello World"),
        ('a "first" and a "second"', "first"),
        ('an unclosed "quote at the end', "quote at the end"),
        ('"OPEN"', "OPEN"),
        ("no quotes at all", None),
        ('empty ""', None),
        ('only spaces "   "', None),
        ("curly \u201cquotes\u201d are not quotes", None),
    ],
)
def test_target_is_the_text_after_the_first_double_quote(prompt: str, target: str | None) -> None:
    assert ocr_target(prompt) == target
    if target is not None:
        assert target == prompt.split('"')[1]  # Flow-GRPO's expression


def test_normalisation_drops_ascii_spaces_and_case_only() -> None:
    assert normalize_ocr_text(" Hello  World ") == "helloworld"
    assert normalize_ocr_text("A\tB\nC") == "a\tb\nc"


def test_levenshtein_equals_the_levenshtein_library() -> None:
    rng = random.Random(0)
    alphabet = "abcde XY"
    for _ in range(300):
        a = "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        b = "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        assert levenshtein(a, b) == Levenshtein.distance(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3


@pytest.mark.parametrize(
    ("recognized", "prompt", "reward"),
    [
        ("Hello World", 'a sign "Hello World"', 1.0),
        ("HELLOWORLD", 'a sign "hello world"', 1.0),
        ("Big sale: Hello World today", 'a sign "Hello World"', 1.0),  # substring: distance 0
        ("HelloWorle", 'a sign "Hello World"', 0.9),
        ("", 'a sign "Hello World"', 0.0),
        ("completely different and much longer text", 'a "cat"', 0.0),  # capped at len
        ("cta", 'a "cat"', 1 / 3),
    ],
)
def test_match_follows_flow_grpo(recognized: str, prompt: str, reward: float) -> None:
    target = ocr_target(prompt)
    assert target is not None
    match = ocr_match(recognized, target)
    assert match.reward == pytest.approx(reward)
    assert match.reward == flow_grpo_reward(recognized, prompt)
    assert 0 <= match.distance <= len(normalize_ocr_text(target))


def test_match_equals_flow_grpo_on_random_strings() -> None:
    rng = random.Random(1)
    alphabet = "abAB 12"
    for _ in range(300):
        target = "".join(rng.choices(alphabet, k=rng.randint(1, 8)))
        if not normalize_ocr_text(target):
            continue
        recognized = "".join(rng.choices(alphabet, k=rng.randint(0, 14)))
        prompt = f'text "{target}" here'
        assert ocr_match(recognized, target).reward == flow_grpo_reward(recognized, prompt)


# -- real PP-OCRv4 weights on rendered text --------------------------------------------------

WORDS = ["OPEN", "Hello World", "Coffee 24h", "DANCE GRPO"]
SENTENCES = ["The quick brown fox jumps", "Welcome to the reward hub"]


def rendered_cases() -> list[tuple[str, str, int]]:
    cases = [(text, font, 48) for text in WORDS for font in ("pil_default", "DejaVuSans")]
    cases += [
        (text, font, 32) for text in SENTENCES for font in ("pil_default", "DejaVuSerif-Bold")
    ]
    cases += [("Hello World", "DejaVuSansMono", 24), ("OPEN", "pil_default", 96)]
    return cases


@pytest.mark.parametrize(("text", "font_name", "size"), rendered_cases())
def test_rendered_text_scores_near_one_and_other_text_low(
    ocr: OcrReward, text: str, font_name: str, size: int
) -> None:
    fonts = available_fonts(size)
    if font_name not in fonts:
        pytest.skip(f"font {font_name} not installed")
    image = render_text(text, fonts[font_name])
    right = f'a poster with the words "{text}" on it'
    wrong = 'a poster with the words "zebra quilt mango" on it'
    out = ocr.score(batch_of([image, image], [right, wrong]))
    recognized = ocr.recognize(image)
    assert out["score"][0] >= 0.9, (text, recognized)
    assert out["score"][1] <= 0.4, (text, recognized)
    for value, prompt in zip(out["score"], (right, wrong), strict=True):
        assert value == pytest.approx(flow_grpo_reward(recognized, prompt), abs=1e-6)


def test_two_lines_are_read_in_order(ocr: OcrReward) -> None:
    image = render_text("SALE\nTODAY", available_fonts(56)["pil_default"])
    assert normalize_ocr_text(ocr.recognize(image)) == "saletoday"
    out = ocr.score(batch_of([image], ['a shop window "SALE TODAY"']))
    assert out["score"][0] == 1.0 and out["edit_distance"][0] == 0


def test_text_running_off_the_image_scores_what_is_visible(ocr: OcrReward) -> None:
    sentence = "The quick brown fox jumps"
    for font in available_fonts(48).values():
        image = render_text(sentence, font, size=(400, 120))
        score = ocr.score(batch_of([image], [f'a banner "{sentence}"']))["score"][0]
        assert 0.3 < score < 0.95  # the middle of the sentence is read, its ends are cut off


def test_coloured_text_on_colour_is_read(ocr: OcrReward) -> None:
    image = render_text(
        "Fresh Bread", available_fonts(48)["pil_default"], background=(20, 40, 120),
        color=(250, 220, 60),
    )  # fmt: skip
    assert ocr.score(batch_of([image], ['a banner "Fresh Bread"']))["score"][0] >= 0.9


def test_images_without_text_score_zero(ocr: OcrReward) -> None:
    rng = np.random.default_rng(0)
    images = [
        np.full((256, 256, 3), 255, np.uint8),
        np.zeros((64, 64, 3), np.uint8),
        rng.integers(0, 256, (128, 200, 3), dtype=np.uint8),
    ]
    out = ocr.score(batch_of(images, ['a sign "OPEN"'] * 3))
    np.testing.assert_array_equal(out["score"], np.zeros(3, np.float32))
    np.testing.assert_array_equal(out["edit_distance"], np.full(3, 4, np.float32))


def test_batch_of_8_equals_one_by_one(ocr: OcrReward) -> None:
    fonts = available_fonts(40)
    texts = ["OPEN", "Hello", "Cafe 24", "GRPO", "Reward", "Sale", "STOP", "Tea"]
    images = [
        render_text(t, fonts["pil_default"], size=(200 + 24 * i, 120)) for i, t in enumerate(texts)
    ]
    prompts = [f'a sign "{t}"' for t in reversed(texts)]  # mostly wrong: scores in (0, 1)
    together = assert_batch_invariant(ocr, batch_of(images, prompts), atol=0)
    assert len(set(together["score"].tolist())) > 2


def test_edge_sizes_are_scored(ocr: OcrReward) -> None:
    images = [np.zeros((1, 1, 3), np.uint8), np.full((1, 900, 3), 255, np.uint8)]
    images.append(np.full((900, 2, 3), 128, np.uint8))
    out = ocr.score(batch_of(images, ['"A"'] * 3))
    assert out["score"].shape == (3,) and np.all((out["score"] >= 0) & (out["score"] <= 1))


# -- options, start-up checks, validation -----------------------------------------------------


def test_registry_resolves_ocr() -> None:
    assert reward_class("ocr") is OcrReward


def test_prompt_without_quotes_is_a_sample_error(ocr: OcrReward) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(SampleError, match=r"samples\[3\]\.prompt: needs the text"):
        ocr.validate_sample(3, "a sign that says hello", image, None)
    with pytest.raises(SampleError, match="prompt"):
        ocr.score(batch_of([image], ['empty ""']))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"device": "cuda:0"}, "device"),
        ({"num_threads": -1}, "num_threads"),
        ({"det_limit_type": "mean"}, "det_limit_type"),
        ({"det_box_thresh": 1.5}, "det_box_thresh"),
        ({"text_score": "high"}, "text_score"),
        ({"det_unclip_ratio": 0}, "det_unclip_ratio"),
        ({"language": "en"}, "language"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        OcrReward("ocr", options)


def test_missing_model_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "en_PP-OCRv4_rec_infer.onnx"
    with pytest.raises(CheckpointError, match="not found") as err:
        OcrReward("ocr", {"rec_model_path": str(missing)})
    assert str(missing) in str(err.value) and "'rec_model_path'" in str(err.value)


def test_unreadable_model_file_fails_at_load(tmp_path: Path) -> None:
    bad = tmp_path / "det.onnx"
    bad.write_bytes(b"not an onnx model")
    reward = OcrReward("ocr", {"det_model_path": str(bad)})
    with pytest.raises(RewardConfigError, match="could not be loaded") as err:
        reward.load()
    assert str(bad) in str(err.value)


def test_missing_extra_is_named_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RewardConfigError, match=r"dancegrpo-rewards\[ocr\]"):
        OcrReward("ocr", {})


def test_version_tracks_models_and_options(tmp_path: Path) -> None:
    default = OcrReward("a", {})
    assert default.version.startswith("ocr-")
    assert default.version == OcrReward("b", {"num_threads": 2}).version
    assert default.version != OcrReward("c", {"text_score": 0.6}).version
    copied = tmp_path / "det.onnx"
    copied.write_bytes(b"0" * 64)
    assert default.version != OcrReward("d", {"det_model_path": str(copied)}).version


def test_ocr_scores_through_a_real_server() -> None:
    fonts = available_fonts(48)
    images = [render_text(t, fonts["pil_default"]) for t in ("OPEN", "Hello World", "Tea")]
    prompts = ['a sign "OPEN"', 'a card "Hello World"', 'a mug "Coffee"']
    config = {"rewards": {"ocr": {"kind": "ocr", "options": {"num_threads": 1}}}}
    local = OcrReward("ocr", {"num_threads": 1})
    with served_reward(config) as client:
        remote = assert_serves_like_local(client, "ocr", local, batch_of(images, prompts), atol=0)
        assert remote["score"][0] == 1.0 and remote["score"][1] == 1.0 and remote["score"][2] < 0.5
        with pytest.raises(RewardServiceError) as err:
            client.score("ocr", images=images[:2], prompts=['a sign "OPEN"', "no quotes"])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "samples[1].prompt" in err.value.details
