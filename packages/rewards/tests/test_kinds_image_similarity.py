"""The ``image_similarity`` kind (CLIP open_clip / Hugging Face and DINOv2 backbones): the
reference computations of each model's own library, invariances, option and file checks,
and a real server."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo_proto.client import RewardServiceError
from dancegrpo_rewards.base import RewardBatch, RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.composite import VideoFramesReward
from dancegrpo_rewards.kinds.image_similarity import ImageSimilarityReward
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.dinov2_models import write_hf_dinov2_folder
from dancegrpo_testing.reward_checks import assert_serves_like_local, served_reward
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse

BACKBONES = ("open_clip", "hf_clip", "dinov2")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_similarity")
    clip = clip_models.write_tiny_clip_files(root / "clip")
    return {
        "config": clip.config,
        "checkpoint": clip.bare_checkpoint,
        "hf_clip": clip.hf_folder,
        "dinov2": write_hf_dinov2_folder(root / "dinov2-tiny"),
    }


def _options(files: dict[str, Path], backbone: str) -> dict[str, str]:
    if backbone == "open_clip":
        return {"checkpoint": str(files["checkpoint"]), "arch": str(files["config"])}
    if backbone == "hf_clip":
        return {"hf_path": str(files["hf_clip"])}
    return {"backbone": "dinov2", "hf_path": str(files["dinov2"])}


@pytest.fixture(scope="module", params=BACKBONES)
def reward(request: pytest.FixtureRequest, files: dict[str, Path]) -> ImageSimilarityReward:
    loaded = ImageSimilarityReward(f"sim_{request.param}", _options(files, request.param))
    loaded.load()
    return loaded


def batch_of(images: list[np.ndarray], references: list[np.ndarray]) -> RewardBatch:
    n = len(images)
    return RewardBatch([""] * n, images, references, [None] * n)


def test_registry_resolves_image_similarity() -> None:
    assert reward_class("image_similarity") is ImageSimilarityReward


def test_scores_are_cosines_and_an_image_is_most_similar_to_itself(
    reward: ImageSimilarityReward,
) -> None:
    images = clip_models.random_images(6, seed=1)
    references = clip_models.random_images(6, seed=2)
    out = reward.score(batch_of(images, references))
    assert reward.output_names == ("score",) and set(out) == {"score"}
    assert out["score"].shape == (6,) and out["score"].dtype == np.float32
    assert np.all(np.abs(out["score"]) <= 1 + 1e-6) and np.ptp(out["score"]) > 1e-4
    same = reward.score(batch_of(images, images))["score"]
    np.testing.assert_allclose(same, np.ones(6), atol=1e-5)
    assert np.all(same > out["score"])


def test_score_is_symmetric_and_batch_invariant(reward: ImageSimilarityReward) -> None:
    images = clip_models.random_images(8, seed=3)
    references = clip_models.random_images(8, seed=4)
    together = reward.score(batch_of(images, references))["score"]
    alone = [
        reward.score(batch_of([i], [r]))["score"] for i, r in zip(images, references, strict=True)
    ]
    np.testing.assert_allclose(together, np.concatenate(alone), atol=1e-5, rtol=0)
    swapped = reward.score(batch_of(references, images))["score"]
    np.testing.assert_allclose(swapped, together, atol=1e-6, rtol=0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1).numpy()


def test_hf_clip_equals_transformers_clip_image_features(files: dict[str, Path]) -> None:
    """``CLIPProcessor`` on PIL images and ``CLIPModel.get_image_features``, as the model
    card's own example, for both images of each pair."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(files["hf_clip"]), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(files["hf_clip"]), local_files_only=True)
    images, references = clip_models.random_images(4, seed=5), clip_models.random_images(4, seed=6)

    def features(arrays: list[np.ndarray]) -> torch.Tensor:
        pixels = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
        with torch.no_grad():
            return model.get_image_features(**pixels).pooler_output

    expected = _cosine(features(images), features(references))
    reward = ImageSimilarityReward("sim", _options(files, "hf_clip"))
    np.testing.assert_allclose(
        reward.score(batch_of(images, references))["score"], expected, atol=1e-5, rtol=0
    )


def test_open_clip_equals_open_clips_own_transform_and_encoder(files: dict[str, Path]) -> None:
    """open_clip's eval transform (``image_transform(..., is_train=False)``) and
    ``encode_image`` on the same weights."""
    import open_clip

    model = clip_models.build_open_clip_model(files["config"], seed=1)
    transform = open_clip.image_transform(model.visual.image_size[0], is_train=False)
    images, references = clip_models.random_images(4, seed=7), clip_models.random_images(4, seed=8)

    def features(arrays: list[np.ndarray]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in arrays]))

    expected = _cosine(features(images), features(references))
    reward = ImageSimilarityReward("sim", _options(files, "open_clip"))
    np.testing.assert_allclose(
        reward.score(batch_of(images, references))["score"], expected, atol=1e-5, rtol=0
    )


def test_dinov2_equals_the_class_token_of_transformers_dinov2(files: dict[str, Path]) -> None:
    """The folder's ``AutoImageProcessor`` on PIL images and ``Dinov2Model``'s
    ``pooler_output`` (the normed class token, the official backbone's ``x_norm_clstoken``)."""
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(str(files["dinov2"]), local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(str(files["dinov2"]), local_files_only=True)
    images, references = clip_models.random_images(4, seed=9), clip_models.random_images(4, seed=10)

    def features(arrays: list[np.ndarray]) -> torch.Tensor:
        pixels = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
        with torch.no_grad():
            out = model(**pixels)
        # last_hidden_state is already the final layer norm's output: the class token.
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
        return out.pooler_output

    expected = _cosine(features(images), features(references))
    reward = ImageSimilarityReward("sim", _options(files, "dinov2"))
    np.testing.assert_allclose(
        reward.score(batch_of(images, references))["score"], expected, atol=1e-5, rtol=0
    )


def test_video_frames_compare_each_sampled_frame_with_the_first_frame_image(
    files: dict[str, Path],
) -> None:
    """Image-to-video: ``video_frames`` around this kind averages the similarity of the
    sampled frames to the conditioning image."""
    inner = {"kind": "image_similarity", **_options(files, "hf_clip")}
    video = VideoFramesReward("video_sim", {"reward": inner, "num_frames": 3})
    assert video.requires_condition_image
    rng = np.random.default_rng(11)
    videos = [rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8) for _ in range(2)]
    first = [v[0] for v in videos]
    got = video.score(RewardBatch(["", ""], videos, first, [None, None]))["score"]
    image = ImageSimilarityReward("sim", _options(files, "hf_clip"))
    frames = [v[i] for v in videos for i in (0, 2, 4)]
    per_frame = image.score(batch_of(frames, [f for f in first for _ in range(3)]))["score"]
    np.testing.assert_allclose(got, per_frame.reshape(2, 3).mean(1), atol=1e-5, rtol=0)


def test_versions_differ_by_backbone_and_are_stable(files: dict[str, Path]) -> None:
    versions = {b: ImageSimilarityReward("s", _options(files, b)).version for b in BACKBONES}
    assert len(set(versions.values())) == 3
    assert all(v.startswith("image_similarity-") for v in versions.values())
    assert versions["dinov2"] == ImageSimilarityReward("t", _options(files, "dinov2")).version


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "checkpoint"),
        ({"backbone": "dino"}, "backbone"),
        ({"backbone": "dinov2"}, "hf_path"),
        ({"backbone": "dinov2", "hf_path": "d", "arch": "ViT-L-14"}, "arch"),
        ({"backbone": "dinov2", "hf_path": "d", "quick_gelu": True}, "quick_gelu"),
        ({"hf_path": "d", "device": "gpu"}, "device"),
        ({"hf_path": "d", "text_cache_size": 4}, "text_cache_size"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        ImageSimilarityReward("sim", options)


def test_bad_folders_name_the_path(tmp_path: Path, files: dict[str, Path]) -> None:
    missing = tmp_path / "dinov2-base"
    with pytest.raises(CheckpointError, match="folder not found") as err:
        ImageSimilarityReward("sim", {"backbone": "dinov2", "hf_path": str(missing)})
    assert str(missing) in str(err.value) and "'sim'" in str(err.value)
    with pytest.raises(CheckpointError, match="model_type is 'clip'") as err:
        ImageSimilarityReward("sim", {"backbone": "dinov2", "hf_path": str(files["hf_clip"])})
    assert str(files["hf_clip"]) in str(err.value)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(CheckpointError, match="no model weights"):
        ImageSimilarityReward("sim", {"backbone": "dinov2", "hf_path": str(no_weights)})
    with pytest.raises(CheckpointError, match="folder not found"):
        ImageSimilarityReward("sim", {"hf_path": str(missing)})


@pytest.mark.slow
def test_serves_through_a_real_server_and_rejects_a_sample_without_reference(
    files: dict[str, Path],
) -> None:
    config = {
        "server": {"host": "127.0.0.1"},
        "rewards": {
            name: {"kind": "image_similarity", "options": _options(files, backbone)}
            for name, backbone in (("sim_clip", "hf_clip"), ("sim_dino", "dinov2"))
        },
    }
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    references = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with served_reward(config) as client:
        for name, backbone in (("sim_clip", "hf_clip"), ("sim_dino", "dinov2")):
            local = ImageSimilarityReward(name, _options(files, backbone))
            batch = batch_of(list(images), list(references))
            assert_serves_like_local(client, name, local, batch, atol=1e-5)
        with pytest.raises(RewardServiceError) as err:
            client.score("sim_clip", images=images, condition_images=[references[0], None, None])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "samples[1].condition_image" in err.value.details
        # The service keeps serving after the bad request.
        again = client.score("sim_dino", images=images[:1], condition_images=references[:1])
        assert again["score"].shape == (1,)
