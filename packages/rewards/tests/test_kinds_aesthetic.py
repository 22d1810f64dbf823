"""The ``aesthetic`` kind: the LAION v2 head on both CLIP backbones, checked against a by-hand MLP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.aesthetic import AestheticReward
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.reward_checks import assert_batch_invariant, batch_of


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> clip_models.TinyClipFiles:
    return clip_models.write_tiny_clip_files(tmp_path_factory.mktemp("tiny_clip"))


def options_for(backbone: str, files: clip_models.TinyClipFiles) -> dict:
    if backbone == "hf":
        return {"mlp_checkpoint": str(files.aesthetic_mlp), "hf_path": str(files.hf_folder)}
    return {
        "mlp_checkpoint": str(files.aesthetic_mlp),
        "checkpoint": str(files.bare_checkpoint),
        "arch": str(files.config),
    }


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def aesthetic(request: pytest.FixtureRequest, files: clip_models.TinyClipFiles) -> AestheticReward:
    reward = AestheticReward(f"aesthetic_{request.param}", options_for(request.param, files))
    reward.load()
    return reward


def by_hand(embedding: torch.Tensor, mlp_path: Path) -> np.ndarray:
    """The published head written out: five affine maps, no activations (dropout is off)."""
    sd = torch.load(mlp_path, weights_only=True)
    x = embedding / embedding.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x.squeeze(-1).numpy()


def test_registry_resolves_aesthetic() -> None:
    assert reward_class("aesthetic") is AestheticReward


def test_aesthetic_equals_the_mlp_by_hand(
    aesthetic: AestheticReward, files: clip_models.TinyClipFiles
) -> None:
    images = clip_models.random_images(5, seed=11)
    out = aesthetic.score(batch_of(images))
    assert aesthetic.output_names == ("score",) and set(out) == {"score"}
    assert out["score"].shape == (5,) and out["score"].dtype == np.float32
    with torch.inference_mode():
        embedding = aesthetic._encoder.encode_images(images)  # the backbone's raw image features
    np.testing.assert_allclose(
        out["score"], by_hand(embedding, files.aesthetic_mlp), atol=1e-5, rtol=0
    )


def test_aesthetic_embedding_is_the_backbones_own(files: clip_models.TinyClipFiles) -> None:
    """The HF backbone's features equal ``CLIPModel.get_image_features`` on the processor's pixels."""
    from transformers import CLIPModel, CLIPProcessor

    reward = AestheticReward("a", options_for("hf", files))
    reward.load()
    images = clip_models.random_images(3, seed=12)
    model = CLIPModel.from_pretrained(str(files.hf_folder), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(files.hf_folder), local_files_only=True)
    with torch.inference_mode():
        pixels = processor(
            images=[torch.from_numpy(i).permute(2, 0, 1) for i in images], return_tensors="pt"
        )
        reference = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    np.testing.assert_allclose(
        reward.score(batch_of(images))["score"],
        by_hand(reference, files.aesthetic_mlp),
        atol=1e-5,
        rtol=0,
    )


def test_aesthetic_batch_of_8_equals_one_by_one(aesthetic: AestheticReward) -> None:
    assert_batch_invariant(aesthetic, batch_of(clip_models.random_images(8, seed=13)), atol=1e-5)


def test_head_for_another_embedding_size_fails_at_load(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    head_768 = clip_models.write_aesthetic_mlp(
        tmp_path / "sac+logos+ava1-l14-linearMSE.pth", input_dim=768
    )
    reward = AestheticReward("a", {**options_for("hf", files), "mlp_checkpoint": str(head_768)})
    with pytest.raises(
        CheckpointError, match="768-d embeddings but the CLIP backbone gives 16-d"
    ) as err:
        reward.load()
    assert str(head_768) in str(err.value)


def test_head_with_wrong_keys_fails_at_load(
    tmp_path: Path, files: clip_models.TinyClipFiles
) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, wrong)
    reward = AestheticReward("a", {**options_for("hf", files), "mlp_checkpoint": str(wrong)})
    with pytest.raises(CheckpointError, match="wrong keys") as err:
        reward.load()
    assert str(wrong) in str(err.value) and "layers." in str(err.value)


def test_missing_head_names_path_and_docs(tmp_path: Path, files: clip_models.TinyClipFiles) -> None:
    missing = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(CheckpointError, match="not found") as err:
        AestheticReward("a", {**options_for("hf", files), "mlp_checkpoint": str(missing)})
    assert str(missing) in str(err.value) and "'aesthetic'" in str(err.value)


def test_aesthetic_defaults_to_openai_vit_l_14_arch(files: clip_models.TinyClipFiles) -> None:
    reward = AestheticReward(
        "a", {"mlp_checkpoint": str(files.aesthetic_mlp), "checkpoint": str(files.bare_checkpoint)}
    )
    assert reward.backbone.arch == "ViT-L-14-quickgelu"
    with pytest.raises(RewardConfigError, match="'mlp_checkpoint'"):
        AestheticReward("a", {"hf_path": str(files.hf_folder)})
