"""The ``clip`` kind (open_clip and Hugging Face backbones): outputs, invariance, torchmetrics parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.clip_score import CLIPScoreReward
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.reward_checks import assert_batch_invariant, batch_of

PROMPTS = [
    "a red cube on a table",
    "a dog",
    "sunset over the sea",
    "an astronaut riding a horse",
    "photo",
    "a bowl of fruit",
    "x",
    "two cats",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> clip_models.TinyClipFiles:
    return clip_models.write_tiny_clip_files(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def clip(request: pytest.FixtureRequest, files: clip_models.TinyClipFiles) -> CLIPScoreReward:
    if request.param == "hf":
        options = {"hf_path": str(files.hf_folder)}
    else:
        options = {"checkpoint": str(files.bare_checkpoint), "arch": str(files.config)}
    reward = CLIPScoreReward(f"clip_{request.param}", options)
    reward.load()
    return reward


def test_registry_resolves_clip() -> None:
    assert reward_class("clip") is CLIPScoreReward


def test_clip_returns_cosine_and_clip_score(clip: CLIPScoreReward) -> None:
    out = clip.score(batch_of(clip_models.random_images(8, seed=2), PROMPTS))
    assert clip.output_names == ("score", "clip_score")
    assert set(out) == {"score", "clip_score"}
    for values in out.values():
        assert values.shape == (8,) and values.dtype == np.float32
    assert np.all(np.abs(out["score"]) <= 1 + 1e-6) and np.ptp(out["score"]) > 1e-3
    np.testing.assert_allclose(out["clip_score"], 100 * np.maximum(out["score"], 0), atol=1e-4)


def test_clip_batch_of_8_equals_one_by_one(clip: CLIPScoreReward) -> None:
    batch = batch_of(clip_models.random_images(8, seed=9), PROMPTS)
    assert_batch_invariant(clip, batch, atol={"score": 1e-5, "clip_score": 1e-3})


def test_clip_hf_equals_torchmetrics_clip_score(files: clip_models.TinyClipFiles) -> None:
    """torchmetrics' CLIPScore on the same folder: its CLIPProcessor call, normalisation and
    ``max(100·cos, 0)``. torchmetrics 1.9 predates transformers 5, whose
    ``get_*_features`` return a model output rather than a tensor, so the model handed
    to it unwraps ``pooler_output`` (the projected features) and nothing else."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class TensorFeatures(torch.nn.Module):
        def __init__(self, model: CLIPModel) -> None:
            super().__init__()
            self.model = model
            self.config = model.config

        def get_image_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.model.get_text_features(*args, **kwargs).pooler_output

    def model_and_processor() -> tuple[TensorFeatures, CLIPProcessor]:
        model = CLIPModel.from_pretrained(str(files.hf_folder), local_files_only=True).eval()
        return TensorFeatures(model), CLIPProcessor.from_pretrained(
            str(files.hf_folder), local_files_only=True
        )

    metric = CLIPScore(model_name_or_path=model_and_processor)
    images = clip_models.random_images(8, seed=2)
    reference = []
    for image, prompt in zip(images, PROMPTS, strict=True):
        metric.reset()
        metric.update(torch.from_numpy(image).permute(2, 0, 1), prompt)
        reference.append(float(metric.compute()))
    reward = CLIPScoreReward("clip", {"hf_path": str(files.hf_folder)})
    ours = reward.score(batch_of(images, PROMPTS))["clip_score"]
    assert 0 < np.count_nonzero(ours) < len(ours)  # both sides of max(·, 0) are compared
    np.testing.assert_allclose(ours, np.asarray(reference, np.float32), atol=1e-4, rtol=0)


def test_clip_versions_differ_by_backbone(files: clip_models.TinyClipFiles) -> None:
    hf = CLIPScoreReward("a", {"hf_path": str(files.hf_folder)})
    oc = CLIPScoreReward("b", {"checkpoint": str(files.bare_checkpoint), "arch": str(files.config)})
    assert (
        hf.version.startswith("clip-")
        and oc.version.startswith("clip-")
        and hf.version != oc.version
    )
    assert hf.version == CLIPScoreReward("c", {"hf_path": str(files.hf_folder)}).version


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "checkpoint"),
        ({"checkpoint": "a.pt"}, "arch"),
        ({"checkpoint": "a.pt", "hf_path": "b"}, "hf_path"),
        ({"hf_path": "b", "arch": "ViT-L-14"}, "arch"),
        ({"hf_path": "b", "quick_gelu": "yes"}, "quick_gelu"),
    ],
)
def test_bad_clip_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        CLIPScoreReward("clip", options)


def test_missing_hf_folder_and_checkpoint_name_the_path(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    with pytest.raises(CheckpointError, match="folder not found") as err:
        CLIPScoreReward("clip", {"hf_path": str(tmp_path / "clip-vit-large-patch14")})
    assert str(tmp_path / "clip-vit-large-patch14") in str(err.value) and "'clip'" in str(err.value)
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(CheckpointError, match="not found") as err:
        CLIPScoreReward("clip", {"checkpoint": str(missing), "arch": str(files.config)})
    assert str(missing) in str(err.value)


def test_hf_folder_without_weights_is_rejected(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((files.hf_folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model weights"):
        CLIPScoreReward("clip", {"hf_path": str(folder)})
