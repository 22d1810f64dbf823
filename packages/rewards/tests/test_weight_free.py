"""Weight-free rewards: exact formulas, prompt parsing, options, batch invariance."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from dancegrpo_rewards.base import RewardBatch, RewardConfigError, SampleError
from dancegrpo_rewards.kinds.weight_free import (
    COLOR_TABLE,
    Brightness,
    ColorMatch,
    JpegCompressibility,
    mean_rgb,
    prompt_color,
)
from dancegrpo_rewards.registry import reward_class


def _batch(media, prompts=None):
    n = len(media)
    return RewardBatch(prompts or [""] * n, list(media), [None] * n, [None] * n)


def _solid(rgb, size=8):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (size, size, 3)).copy()


def test_registry_resolves_weight_free_kinds():
    assert reward_class("color_match") is ColorMatch
    assert reward_class("brightness") is Brightness
    assert reward_class("jpeg_compressibility") is JpegCompressibility
    with pytest.raises(KeyError, match="known kinds"):
        reward_class("nope")
    with pytest.raises(KeyError, match="not a Reward subclass"):
        reward_class("numpy:ndarray")


@pytest.mark.parametrize(
    ("prompt", "color"),
    [("a red square", "red"), ("BLUE", "blue"), ("grey cat, blue sky", "grey"), ("a dog", None)],
)
def test_prompt_color_takes_first_colour_word(prompt, color):
    assert prompt_color(prompt) == color


def test_color_match_formula_exact():
    reward = ColorMatch("c", {})
    image = _solid((255, 0, 0))
    image[:4] = (0, 0, 0)  # mean colour (127.5, 0, 0)
    out = reward.score(_batch([_solid((255, 0, 0)), image, _solid((0, 255, 255))], ["red"] * 3))
    expected_half = 1 - (0.5 / math.sqrt(3))
    np.testing.assert_allclose(out["score"], [1.0, expected_half, 0.0], atol=1e-6)
    assert out["score"].dtype == np.float32


def test_color_match_is_smooth_in_the_pixels():
    reward = ColorMatch("c", {})
    scores = [
        reward.score(_batch([_solid((v, 0, 0))], ["red"]))["score"][0] for v in range(0, 256, 15)
    ]
    assert np.all(np.diff(scores) > 0)  # strictly increasing as the image gets redder


def test_color_match_rejects_prompts_without_colour():
    reward = ColorMatch("c", {})
    with pytest.raises(SampleError) as info:
        reward.validate_sample(3, "a photo of a dog", _solid((0, 0, 0)), None)
    assert info.value.index == 3 and info.value.field == "prompt"
    assert set(COLOR_TABLE) >= {"red", "green", "blue"}


def test_brightness_is_rec601_luma():
    out = Brightness("b", {}).score(
        _batch([_solid((255, 0, 0)), _solid((0, 255, 0)), _solid((255, 255, 255))])
    )
    np.testing.assert_allclose(out["score"], [0.299, 0.587, 1.0], atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 5, 3), (3, 16, 9, 3), (1, 1, 3)])
def test_mean_rgb_equals_the_float_mean(shape):
    frames = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    expected = frames.reshape(-1, 3).astype(np.float64).mean(axis=0) / 255.0
    np.testing.assert_allclose(mean_rgb(frames), expected, rtol=1e-12)
    strided = frames[..., ::-1]  # a non-contiguous view sums the same
    np.testing.assert_allclose(mean_rgb(strided), expected[::-1], rtol=1e-12)


def test_jpeg_compressibility_is_negative_jpeg_kilobytes():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reward = JpegCompressibility("j", {"quality": 90})
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    out = reward.score(_batch([noise, _solid((50, 50, 50), 32)]))
    assert out["score"][0] == pytest.approx(-len(buffer.getvalue()) / 1000.0)
    assert out["score"][1] > out["score"][0]  # a flat image compresses better than noise


def test_video_scores_average_over_frames():
    frames = np.stack([_solid((255, 255, 255)), _solid((0, 0, 0))])
    out = Brightness("b", {"modality": "video"}).score(_batch([frames]))
    assert out["score"][0] == pytest.approx(0.5)
    jpeg = JpegCompressibility("j", {"modality": "video"})
    per_frame = [jpeg.score(_batch([f]))["score"][0] for f in frames]
    assert jpeg.score(_batch([frames]))["score"][0] == pytest.approx(np.mean(per_frame))


def test_batch_invariance_and_determinism():
    rng = np.random.default_rng(1)
    media = [rng.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8) for i in range(5)]
    prompts = ["red", "a blue car", "green", "pink", "black"]
    for reward in (ColorMatch("c", {}), Brightness("b", {}), JpegCompressibility("j", {})):
        together = reward.score(_batch(media, prompts))["score"]
        alone = [
            reward.score(_batch([m], [p]))["score"][0] for m, p in zip(media, prompts, strict=True)
        ]
        np.testing.assert_array_equal(together, np.asarray(alone, np.float32))
        np.testing.assert_array_equal(together, reward.score(_batch(media, prompts))["score"])


@pytest.mark.parametrize(
    ("cls", "options", "key"),
    [
        (JpegCompressibility, {"quality": 0}, "quality"),
        (JpegCompressibility, {"quality": "high"}, "quality"),
        (Brightness, {"gamma": 2}, "gamma"),
        (ColorMatch, {"modality": "audio"}, "modality"),
    ],
)
def test_bad_options_name_the_key(cls, options, key):
    with pytest.raises(RewardConfigError, match=rf"rewards\.r\.options\.{key}"):
        cls("r", options)


def test_versions_digest_the_options_and_warmup_runs():
    assert JpegCompressibility("a", {}).version != JpegCompressibility("a", {"quality": 80}).version
    assert JpegCompressibility("a", {}).version == JpegCompressibility("b", {}).version
    for reward in (ColorMatch("c", {}), Brightness("b", {"modality": "video"})):
        reward.warmup()
