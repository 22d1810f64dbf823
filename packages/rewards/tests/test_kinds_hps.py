"""The ``hps`` kind on a tiny random ViT: outputs, batch invariance, parity with hpsv2, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.hps import HPSReward
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.reward_checks import assert_batch_invariant, batch_of

PROMPTS = ["a red cube on a table", "a dog", "a red cube on a table", "sunset over the sea"] * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> clip_models.TinyClipFiles:
    return clip_models.write_tiny_clip_files(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def hps(files: clip_models.TinyClipFiles) -> HPSReward:
    reward = HPSReward("hps", {"checkpoint": str(files.hps_checkpoint), "arch": str(files.config)})
    reward.load()
    return reward


def test_registry_resolves_hps() -> None:
    assert reward_class("hps") is HPSReward


def test_hps_returns_one_cosine_per_sample(hps: HPSReward) -> None:
    out = hps.score(batch_of(clip_models.random_images(8), PROMPTS))
    assert hps.output_names == ("score",)
    assert set(out) == {"score"}
    assert out["score"].shape == (8,) and out["score"].dtype == np.float32
    assert np.all(np.abs(out["score"]) <= 1.0 + 1e-6)
    assert np.ptp(out["score"]) > 1e-3  # different images/prompts → different scores


def test_hps_batch_of_8_equals_one_by_one(hps: HPSReward) -> None:
    assert_batch_invariant(hps, batch_of(clip_models.random_images(8, seed=3), PROMPTS), atol=1e-5)


def test_hps_caches_text_features_per_prompt(files: clip_models.TinyClipFiles) -> None:
    reward = HPSReward(
        "hps",
        {"checkpoint": str(files.hps_checkpoint), "arch": str(files.config), "text_cache_size": 2},
    )
    images = clip_models.random_images(8, seed=4)
    first = reward.score(batch_of(images, PROMPTS))["score"]
    assert len(reward._text_cache) == 2  # 3 distinct prompts, LRU capacity 2
    np.testing.assert_allclose(reward.score(batch_of(images, PROMPTS))["score"], first, atol=1e-6)


def test_hps_accepts_bare_and_module_prefixed_checkpoints(
    files: clip_models.TinyClipFiles, hps: HPSReward, tmp_path: Path
) -> None:
    images = clip_models.random_images(3, seed=5)
    expected = hps.score(batch_of(images, PROMPTS[:3]))["score"]
    for name, kwargs in {"bare.pt": {"fmt": "bare"}, "ddp.pt": {"module_prefix": True}}.items():
        path = clip_models.write_open_clip_checkpoint(files.config, tmp_path / name, **kwargs)
        reward = HPSReward("hps", {"checkpoint": str(path), "arch": str(files.config)})
        np.testing.assert_allclose(
            reward.score(batch_of(images, PROMPTS[:3]))["score"], expected, atol=1e-6
        )


def test_hps_version_is_a_digest_of_checkpoint_and_options(
    files: clip_models.TinyClipFiles, hps: HPSReward
) -> None:
    same = HPSReward("h2", {"checkpoint": str(files.hps_checkpoint), "arch": str(files.config)})
    other_weights = HPSReward(
        "h3", {"checkpoint": str(files.bare_checkpoint), "arch": str(files.config)}
    )
    other_dtype = HPSReward(
        "h4", {"checkpoint": str(files.hps_checkpoint), "arch": str(files.config), "dtype": "bf16"}
    )
    assert hps.version.startswith("hps-") and hps.version == same.version
    assert len({hps.version, other_weights.version, other_dtype.version}) == 3


def test_hps_preprocessing_pads_the_short_side_to_a_centred_square() -> None:
    from dancegrpo_rewards.kinds.open_clip_common import OPENAI_MEAN, OPENAI_STD, hps_pixels

    white = np.full((16, 64, 3), 255, np.uint8)  # wide: resized to 8x32, padded 12 rows above/below
    pixels = hps_pixels([white], 32)[0]
    pad_value = -np.array(OPENAI_MEAN) / np.array(OPENAI_STD)
    np.testing.assert_allclose(pixels[:, :12, :].mean(dim=(1, 2)).numpy(), pad_value, atol=1e-6)
    np.testing.assert_allclose(pixels[:, -12:, :].mean(dim=(1, 2)).numpy(), pad_value, atol=1e-6)
    np.testing.assert_allclose(
        pixels[:, 14:18, :].mean(dim=(1, 2)).numpy(),
        (1 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD),
        atol=1e-4,
    )


def test_missing_checkpoint_error_names_path_format_and_docs(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    missing = tmp_path / "weights" / "HPS_v2.1_compressed.pt"
    with pytest.raises(CheckpointError) as err:
        HPSReward("hps", {"checkpoint": str(missing), "arch": str(files.config)})
    message = str(err.value)
    assert str(missing) in message and "not found" in message
    assert "'state_dict'" in message and "docs/rewards.md" in message and "'hps'" in message


def test_checkpoint_for_another_arch_fails_at_load_naming_the_path(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    other_cfg = clip_models.write_open_clip_config(tmp_path / "wider.json", width=64)
    wrong = clip_models.write_open_clip_checkpoint(other_cfg, tmp_path / "wider.pt")
    reward = HPSReward("hps", {"checkpoint": str(wrong), "arch": str(files.config)})
    with pytest.raises(CheckpointError, match="does not match arch") as err:
        reward.load()
    assert str(wrong) in str(err.value)


def test_corrupt_checkpoint_fails_at_load_naming_the_path(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    reward = HPSReward("hps", {"checkpoint": str(corrupt), "arch": str(files.config)})
    with pytest.raises(CheckpointError, match="could not be read") as err:
        reward.load()
    assert str(corrupt) in str(err.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "checkpoint"),
        ({"checkpoint": "x.pt", "dtype": "fp8"}, "dtype"),
        ({"checkpoint": "x.pt", "device": "gpu"}, "device"),
        ({"checkpoint": "x.pt", "text_cache_size": "big"}, "text_cache_size"),
        ({"checkpoint": "x.pt", "arch": "ViT-Nope-14"}, "arch"),
        ({"checkpoint": "x.pt", "chekpoint": "y.pt"}, "chekpoint"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        HPSReward("hps", options)


def test_hps_pads_images_whose_longest_side_is_already_the_model_size(hps: HPSReward) -> None:
    # hpsv2 itself would pass this 32x20 image to the ViT unpadded and fail.
    out = hps.score(batch_of([np.full((32, 20, 3), 200, np.uint8)], ["a dog"]))["score"]
    assert out.shape == (1,) and np.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.skipif(
    importlib.util.find_spec("hpsv2") is None, reason="hpsv2 not installed (make install)"
)
def test_hps_equals_hpsv2_reference_scorer(
    files: clip_models.TinyClipFiles, hps: HPSReward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same tiny checkpoint and images through ``hpsv2.img_score.score`` (its own vendored
    open_clip, preprocessing and tokenizer): the tiny config is put in the vendored config
    table (undone by monkeypatch) and its ViT-H-14 + hub-tag constructor pointed at it."""
    import json

    from PIL import Image

    vendored = pytest.importorskip("hpsv2.src.open_clip.factory")
    img_score = pytest.importorskip("hpsv2.img_score")

    monkeypatch.setitem(
        vendored._MODEL_CONFIGS, "dancegrpo-tiny", json.loads(files.config.read_text())
    )
    original = img_score.create_model_and_transforms

    def tiny_constructor(model_name: str, pretrained: str | None, **kwargs: object):
        assert model_name == "ViT-H-14"
        return original("dancegrpo-tiny", None, **kwargs)

    monkeypatch.setattr(img_score, "create_model_and_transforms", tiny_constructor)
    monkeypatch.setattr(img_score, "model_dict", {})
    monkeypatch.setattr(img_score, "device", "cpu")

    # Longest side != 32 for every image: hpsv2 skips padding when it equals the model
    # size and its ViT then fails on the non-square input (we pad; see hps_pixels).
    images = clip_models.random_images(6, seed=7) + [np.full((100, 20, 3), 200, np.uint8)]
    prompts = ["a red cube on a table", "sunset over the sea"]
    for prompt in prompts:
        reference = img_score.score(
            [Image.fromarray(i) for i in images],
            prompt,
            cp=str(files.hps_checkpoint),
            hps_version="v2.1",
        )
        ours = hps.score(batch_of(images, [prompt] * len(images)))["score"]
        np.testing.assert_allclose(ours, np.asarray(reference, dtype=np.float32), atol=1e-5, rtol=0)
