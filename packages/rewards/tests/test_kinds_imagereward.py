"""The ``imagereward`` kind against ImageReward's official code on a tiny model.

The reference is the ``image-reward`` 1.5 package (the official repository's
``ImageReward/`` folder, installed ``--no-deps`` from requirements-test-nodeps.txt): its
``ImageReward`` module, BLIP ViT (``vit.py``), BLIP BERT (``med.py``), preprocessing,
tokeniser set-up and ``score`` / ``inference_rank`` run unchanged. What is adapted, and
only around that code:

- the package ``__init__`` files are skipped (they import ReFL/diffusers/datasets and
  OpenAI's ``clip``, which scoring does not use);
- ``med.py`` was written for transformers 4: three names it imports from
  ``transformers.modeling_utils`` are re-exported there, and ``BertModel`` gets the
  transformers-4 ``get_head_mask`` (no head mask → ``None`` per layer), ``invert_attention_mask``
  (``(1 - mask) * dtype.min``; the image mask is all ones, so it adds 0) and a no-op
  ``init_weights`` (every weight is then loaded with ``strict=True``);
- ``BertTokenizer.from_pretrained("bert-base-uncased")`` reads the local folder, and its
  transformers-4 ``additional_special_tokens_ids`` is provided;
- ``create_vit`` builds the official ``VisionTransformer`` at the tiny size (the official
  code only knows ViT-B and ViT-L).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.imagereward import REWARD_MEAN, REWARD_STD, ImageRewardReward
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing import imagereward_models as irm
from dancegrpo_testing.reward_checks import (
    assert_batch_invariant,
    assert_serves_like_local,
    batch_of,
    served_reward,
)

PROMPTS = [
    "a red cube on a table",
    "a dog",
    "sunset over the sea, highly detailed, 8k, trending on artstation " * 4,  # > 35 tokens
    "An Astronaut riding a HORSE",
    "x",
    "two cats [ENC] [SEP]",
    "a bowl of fruit, oil painting",
    "",
]


def _bare_package(name: str, path: str) -> None:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


@functools.lru_cache(maxsize=1)
def _official_modules() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("image-reward is not installed (requirements-test-nodeps.txt)")
    root = spec.submodule_search_locations[0]
    _bare_package("ImageReward", root)
    _bare_package("ImageReward.models", f"{root}/models")
    import transformers.modeling_utils
    import transformers.pytorch_utils

    with pytest.MonkeyPatch.context() as patch:
        for name in ("apply_chunking_to_forward", "prune_linear_layer"):
            value = getattr(transformers.pytorch_utils, name)
            patch.setattr(transformers.modeling_utils, name, value, raising=False)
        patch.setattr(
            transformers.modeling_utils, "find_pruneable_heads_and_indices", None, raising=False
        )
        from ImageReward import ImageReward as image_reward
        from ImageReward.models.BLIP import blip, blip_pretrain, med, vit

    def invert_attention_mask(self: Any, mask: torch.Tensor) -> torch.Tensor:
        extended = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * torch.finfo(self.dtype).min

    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, layers: [None] * layers
    med.BertModel.init_weights = lambda self: None
    return types.SimpleNamespace(
        image_reward=image_reward, blip=blip, blip_pretrain=blip_pretrain, vit=vit
    )


def official_model(files: irm.TinyImageRewardFiles, checkpoint: Path | None = None) -> Any:
    """The official ``ImageReward`` module at the tiny size (see the module docstring)."""
    official = _official_modules()
    blip, blip_pretrain, vit = official.blip, official.blip_pretrain, official.vit

    from transformers import BertTokenizer

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name: str, *args: Any, **kwargs: Any) -> Any:
            assert name == "bert-base-uncased"
            return super().from_pretrained(str(files.tokenizer), *args, **kwargs)

        @property
        def additional_special_tokens_ids(self) -> list[int]:
            return self.convert_tokens_to_ids(list(self.extra_special_tokens))

    blip.BertTokenizer = LocalBertTokenizer
    v = files.vit

    def tiny_vit(*args: Any, **kwargs: Any) -> tuple[Any, int]:
        encoder = vit.VisionTransformer(
            img_size=v.image_size,
            patch_size=v.patch_size,
            embed_dim=v.width,
            depth=v.depth,
            num_heads=v.num_heads,
            mlp_ratio=v.mlp_ratio,
        )
        return encoder, v.width

    blip_pretrain.create_vit = tiny_vit
    torch.manual_seed(1)
    model = official.image_reward.ImageReward(med_config=str(files.med_config), device="cpu")
    if checkpoint is not None:
        # utils.load: torch.load, then load_state_dict (strict here, to prove the layout).
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> irm.TinyImageRewardFiles:
    return irm.write_imagereward_files(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def official(files: irm.TinyImageRewardFiles) -> Any:
    return official_model(files, files.checkpoint)


@pytest.fixture(scope="module")
def reward(files: irm.TinyImageRewardFiles) -> ImageRewardReward:
    reward = ImageRewardReward("imagereward", {"checkpoint": str(files.checkpoint)})
    reward.load()
    return reward


def official_scores(model: Any, prompts: list[str], images: list[np.ndarray]) -> np.ndarray:
    from PIL import Image

    with torch.no_grad():
        return np.asarray(
            [model.score(p, Image.fromarray(i)) for p, i in zip(prompts, images, strict=True)],
            np.float32,
        )


def test_registry_resolves_imagereward() -> None:
    assert reward_class("imagereward") is ImageRewardReward


def test_imagereward_equals_the_official_score(reward: ImageRewardReward, official: Any) -> None:
    images = clip_models.random_images(8, seed=11, min_size=20, max_size=300)
    ours = reward.score(batch_of(images, PROMPTS))["score"]
    reference = official_scores(official, PROMPTS, images)
    assert ours.shape == (8,) and ours.dtype == np.float32
    assert np.ptp(reference) > 0.5
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


def test_imagereward_equals_the_official_inference_rank(
    reward: ImageRewardReward, official: Any
) -> None:
    """``inference_rank`` (one prompt, several images; Flow-GRPO's scorer calls it)."""
    from PIL import Image

    images = clip_models.random_images(4, seed=12, min_size=30, max_size=260)
    with torch.no_grad():
        _, reference = official.inference_rank(PROMPTS[3], [Image.fromarray(i) for i in images])
    ours = reward.score(batch_of(images, [PROMPTS[3]] * 4))["score"]
    np.testing.assert_allclose(ours, np.asarray(reference, np.float32), atol=1e-5, rtol=0)


def test_a_checkpoint_saved_by_the_official_module_loads(
    tmp_path: Path, files: irm.TinyImageRewardFiles
) -> None:
    """The official module's own ``state_dict()`` (its initialisation, its buffers)."""
    model = official_model(files)
    with torch.no_grad():
        for name, param in model.named_parameters():  # spread the untrained head's output
            if name.startswith("mlp.") and name.endswith("weight"):
                param.normal_(0.0, param.shape[1] ** -0.5)
    release = tmp_path / "release"
    release.mkdir()
    torch.save(model.state_dict(), release / "ImageReward.pt")
    shutil.copy(files.med_config, release / "med_config.json")
    shutil.copytree(files.tokenizer, release / "bert-base-uncased")
    ours = ImageRewardReward("ir", {"checkpoint": str(release / "ImageReward.pt")})
    images = clip_models.random_images(3, seed=13, min_size=40, max_size=250)
    np.testing.assert_allclose(
        ours.score(batch_of(images, PROMPTS[:3]))["score"],
        official_scores(model, PROMPTS[:3], images),
        atol=1e-5,
        rtol=0,
    )


def test_tokens_are_the_official_tokenizers(reward: ImageRewardReward, official: Any) -> None:
    ours = reward._tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
    theirs = official.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
    assert ours["input_ids"] == theirs["input_ids"]
    assert all(ids[0] == 101 and len(ids) == 35 for ids in ours["input_ids"])  # [CLS] kept


def test_normalize_false_reports_the_raw_head_output(files: irm.TinyImageRewardFiles) -> None:
    raw = ImageRewardReward("raw", {"checkpoint": str(files.checkpoint), "normalize": False})
    normalised = ImageRewardReward("n", {"checkpoint": str(files.checkpoint)})
    batch = batch_of(clip_models.random_images(3, seed=14), PROMPTS[:3])
    np.testing.assert_allclose(
        raw.score(batch)["score"],
        normalised.score(batch)["score"] * REWARD_STD + REWARD_MEAN,
        atol=1e-5,
    )


def test_batch_of_8_equals_one_by_one(reward: ImageRewardReward) -> None:
    batch = batch_of(clip_models.random_images(8, seed=15, max_size=200), PROMPTS)
    assert_batch_invariant(reward, batch, atol=1e-5)


def test_edge_images_are_scored(reward: ImageRewardReward) -> None:
    images = [
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 400, 3), 255, np.uint8),
        np.full((300, 2, 3), 7, np.uint8),
        np.full((224, 224, 3), 128, np.uint8),
    ]
    out = reward.score(batch_of(images, ["a", "b", "c" * 5000, "d"]))["score"]
    assert out.shape == (4,) and np.all(np.isfinite(out))


def test_start_up_errors_name_the_path(tmp_path: Path, files: irm.TinyImageRewardFiles) -> None:
    missing = tmp_path / "ImageReward.pt"
    with pytest.raises(CheckpointError, match="'checkpoint'") as err:
        ImageRewardReward("ir", {"checkpoint": str(missing)})
    assert str(missing) in str(err.value) and "imagereward" in str(err.value)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files.checkpoint, alone / "ImageReward.pt")
    with pytest.raises(CheckpointError, match="'med_config'") as err:
        ImageRewardReward("ir", {"checkpoint": str(alone / "ImageReward.pt")})
    assert str(alone / "med_config.json") in str(err.value)
    (alone / "med_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="invalid"):
        ImageRewardReward("ir", {"checkpoint": str(alone / "ImageReward.pt")})
    shutil.copy(files.med_config, alone / "med_config.json")
    with pytest.raises(CheckpointError, match="'tokenizer_path'") as err:
        ImageRewardReward("ir", {"checkpoint": str(alone / "ImageReward.pt")})
    assert str(alone / "bert-base-uncased") in str(err.value)
    explicit = ImageRewardReward(
        "ir",
        {"checkpoint": str(alone / "ImageReward.pt"), "tokenizer_path": str(files.tokenizer)},
    )
    assert explicit.tokenizer_path == files.tokenizer


def test_unreadable_or_mismatched_checkpoints_fail_at_load(
    tmp_path: Path, files: irm.TinyImageRewardFiles
) -> None:
    release = tmp_path / "release"
    shutil.copytree(files.checkpoint.parent, release)
    (release / "ImageReward.pt").write_bytes(b"garbage")
    broken = ImageRewardReward("ir", {"checkpoint": str(release / "ImageReward.pt")})
    with pytest.raises(CheckpointError, match="could not be read") as err:
        broken.load()
    assert str(release / "ImageReward.pt") in str(err.value)
    state = torch.load(files.checkpoint, weights_only=True)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, release / "ImageReward.pt")
    with pytest.raises(CheckpointError, match="does not fit") as err:
        ImageRewardReward("ir", {"checkpoint": str(release / "ImageReward.pt")}).load()
    assert "crossattention.self.key.weight" in str(err.value)
    shutil.copy(files.checkpoint, release / "ImageReward.pt")
    med = json.loads(files.med_config.read_text())
    (release / "med_config.json").write_text(json.dumps({**med, "vocab_size": 50}))
    with pytest.raises(CheckpointError, match="does not fit"):
        ImageRewardReward("ir", {"checkpoint": str(release / "ImageReward.pt")}).load()


def test_a_tokenizer_larger_than_the_embeddings_fails_at_load(
    tmp_path: Path, files: irm.TinyImageRewardFiles
) -> None:
    tokenizer = tmp_path / "bert"
    shutil.copytree(files.tokenizer, tokenizer)
    with (tokenizer / "vocab.txt").open("a") as f:
        f.write("\n".join(f"extra{i}" for i in range(10)) + "\n")
    reward = ImageRewardReward(
        "ir", {"checkpoint": str(files.checkpoint), "tokenizer_path": str(tokenizer)}
    )
    with pytest.raises(CheckpointError, match="tokens with") as err:
        reward.load()
    assert str(tokenizer) in str(err.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "checkpoint"),
        ({"checkpoint": "x", "dtype": "int8"}, "dtype"),
        ({"checkpoint": "x", "device": "gpu"}, "device"),
        ({"checkpoint": "x", "normalize": "yes"}, "normalize"),
        ({"checkpoint": "x", "arch": "ViT-L"}, "arch"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        ImageRewardReward("ir", options)


def test_version_tracks_weights_and_output_options(files: irm.TinyImageRewardFiles) -> None:
    base = {"checkpoint": str(files.checkpoint)}
    a = ImageRewardReward("a", base)
    assert a.version.startswith("imagereward-")
    assert a.version == ImageRewardReward("b", {**base, "device": "cpu"}).version
    assert a.version != ImageRewardReward("c", {**base, "dtype": "bf16"}).version
    assert a.version != ImageRewardReward("d", {**base, "normalize": False}).version


def test_imagereward_scores_through_a_real_server(files: irm.TinyImageRewardFiles) -> None:
    options = {"checkpoint": str(files.checkpoint)}
    config = {"rewards": {"imagereward": {"kind": "imagereward", "options": options}}}
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    local = ImageRewardReward("imagereward", options)
    with served_reward(config, startup_timeout_s=120) as client:
        batch = batch_of(list(images), PROMPTS[:3])
        assert_serves_like_local(client, "imagereward", local, batch, atol=1e-5)
