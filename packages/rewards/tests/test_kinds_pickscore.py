"""The ``pickscore`` kind against PickScore's official inference code on a tiny CLIP."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.pickscore import PickScoreReward
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.reward_checks import (
    assert_batch_invariant,
    assert_serves_like_local,
    batch_of,
    served_reward,
)

PROMPTS = [
    "a red cube on a table",
    "a dog",
    "sunset over the sea, highly detailed, 8k, trending on artstation " * 6,  # > 77 tokens
    "an astronaut riding a horse",
    "photo",
    "a bowl of fruit",
    "x",
    "two cats",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> clip_models.TinyPickScoreFiles:
    return clip_models.write_pickscore_folders(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def pickscore(files: clip_models.TinyPickScoreFiles) -> PickScoreReward:
    reward = PickScoreReward(
        "pickscore", {"path": str(files.model), "processor_path": str(files.processor)}
    )
    reward.load()
    return reward


def official_pickscore(
    files: clip_models.TinyPickScoreFiles, prompts: list[str], images: list, backend: str
) -> np.ndarray:
    """PickScore's README inference (github.com/yuvalkirstain/PickScore, "Inference with
    PickScore"), one (prompt, image) pair at a time as Flow-GRPO's PickScoreScorer takes the
    diagonal. PickScore pins transformers 4.27, whose only CLIP image processor is the PIL
    one: ``backend="pil"`` selects it in transformers 5 (whose default is torchvision)."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(files.processor), backend=backend)
    model = AutoModel.from_pretrained(str(files.model)).eval()

    def features(output):  # transformers 5 wraps get_*_features in a model output
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    scores = []
    for prompt, array in zip(prompts, images, strict=True):
        image_inputs = processor(
            images=[Image.fromarray(array)],
            padding=True,
            truncation=True,
            max_length=77,
            return_tensors="pt",
        )
        text_inputs = processor(
            text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        with torch.no_grad():
            image_embs = features(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = features(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(float(model.logit_scale.exp() * (text_embs @ image_embs.T)[0][0]))
    return np.asarray(scores, np.float32)


def test_registry_resolves_pickscore() -> None:
    assert reward_class("pickscore") is PickScoreReward


def test_pickscore_equals_the_official_code(
    pickscore: PickScoreReward, files: clip_models.TinyPickScoreFiles
) -> None:
    images = clip_models.random_images(8, seed=4, min_size=20, max_size=90)
    ours = pickscore.score(batch_of(images, PROMPTS))["score"]
    reference = official_pickscore(files, PROMPTS, images, backend="pil")
    assert ours.shape == (8,) and ours.dtype == np.float32
    assert np.ptp(ours) > 1.0  # logit scale 100: scores spread over several units
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)
    # transformers 5's default torchvision processor resizes differently: close, not equal.
    torchvision = official_pickscore(files, PROMPTS, images, backend="torchvision")
    assert 0 < np.abs(torchvision - ours).max() < 1.0


def test_score_is_logit_scale_times_cosine(pickscore: PickScoreReward) -> None:
    model = pickscore.model
    assert model.logit_scale == pytest.approx(100.0, rel=1e-5)
    images = clip_models.random_images(3, seed=5)
    with torch.no_grad():
        cosine = (model.encode_images(images) * model.encode_text(PROMPTS[:3])).sum(-1)
    ours = pickscore.score(batch_of(images, PROMPTS[:3]))["score"]
    np.testing.assert_allclose(ours, 100.0 * cosine.numpy(), atol=1e-4, rtol=0)


def test_batch_of_8_equals_one_by_one(files: clip_models.TinyPickScoreFiles) -> None:
    reward = PickScoreReward(
        "p",
        {"path": str(files.model), "processor_path": str(files.processor), "text_cache_size": 0},
    )
    assert_batch_invariant(
        reward, batch_of(clip_models.random_images(8, seed=6), PROMPTS), atol=1e-4
    )


def test_edge_images_are_scored(pickscore: PickScoreReward) -> None:
    images = [
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 400, 3), 255, np.uint8),
        np.full((300, 2, 3), 7, np.uint8),
    ]
    out = pickscore.score(batch_of(images, ["a", "b", ""]))["score"]
    assert out.shape == (3,) and np.all(np.isfinite(out))


def test_processor_files_may_sit_in_the_model_folder(
    tmp_path: Path, files: clip_models.TinyPickScoreFiles, pickscore: PickScoreReward
) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(files.model, merged)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files.processor / name, merged / name)
    reward = PickScoreReward("p", {"path": str(merged)})
    images = clip_models.random_images(2, seed=7)
    np.testing.assert_allclose(
        reward.score(batch_of(images, PROMPTS[:2]))["score"],
        pickscore.score(batch_of(images, PROMPTS[:2]))["score"],
        atol=1e-4,
    )


def test_missing_processor_names_the_option(
    tmp_path: Path, files: clip_models.TinyPickScoreFiles
) -> None:
    with pytest.raises(CheckpointError, match="processor_path") as err:
        PickScoreReward("p", {"path": str(files.model)})
    assert "preprocessor_config.json" in str(err.value) and str(files.model) in str(err.value)
    missing = tmp_path / "PickScore_v1"
    with pytest.raises(CheckpointError, match="folder not found") as err:
        PickScoreReward("p", {"path": str(missing), "processor_path": str(files.processor)})
    assert str(missing) in str(err.value) and "'path'" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        PickScoreReward("p", {"path": str(empty), "processor_path": str(files.processor)})


def test_unloadable_model_fails_at_load(
    tmp_path: Path, files: clip_models.TinyPickScoreFiles
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(files.model, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    reward = PickScoreReward("p", {"path": str(broken), "processor_path": str(files.processor)})
    with pytest.raises(CheckpointError, match="could not be loaded") as err:
        reward.load()
    assert str(broken) in str(err.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "path"),
        ({"path": "x", "dtype": "int8"}, "dtype"),
        ({"path": "x", "device": "gpu"}, "device"),
        ({"path": "x", "text_cache_size": -1}, "text_cache_size"),
        ({"path": "x", "hf_path": "y"}, "hf_path"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        PickScoreReward("p", options)


def test_version_tracks_weights_and_dtype(files: clip_models.TinyPickScoreFiles) -> None:
    base = {"path": str(files.model), "processor_path": str(files.processor)}
    a = PickScoreReward("a", base)
    assert a.version.startswith("pickscore-")
    assert a.version == PickScoreReward("b", {**base, "device": "cpu"}).version
    assert a.version != PickScoreReward("c", {**base, "dtype": "bf16"}).version


def test_pickscore_scores_through_a_real_server(files: clip_models.TinyPickScoreFiles) -> None:
    options = {"path": str(files.model), "processor_path": str(files.processor)}
    config = {"rewards": {"pickscore": {"kind": "pickscore", "options": options}}}
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    local = PickScoreReward("pickscore", options)
    with served_reward(config, startup_timeout_s=120) as client:
        batch = batch_of(list(images), PROMPTS[:3])
        assert_serves_like_local(client, "pickscore", local, batch, atol=1e-4)
