"""Tiny random-weight CLIP models and reward heads for tests (no downloads).

Everything here writes real files in the formats the reward kinds load in production:

- ``write_open_clip_config``: an open_clip model-config JSON (the same schema as open_clip's
  ``model_configs/ViT-H-14.json``) for a tiny ViT. Passing its *path* as ``arch`` loads it
  like a built-in name, without registering anything in open_clip's global config table.
- ``write_open_clip_checkpoint``: random weights for that config, either in hpsv2's format
  (``{"state_dict": ...}``, optionally with ``module.`` prefixes as saved from DDP) or as a
  bare state dict.
- ``write_hf_clip_folder``: a Hugging Face ``CLIPModel`` folder (``save_pretrained``) with
  an exact CLIP tokenizer and a ``CLIPImageProcessor`` sized for the tiny model.
- ``write_aesthetic_mlp``: a random LAION aesthetic-predictor-v2 head with the published
  ``layers.{0,2,4,6,7}`` key layout.

Tiny sizes keep the real 49,408-token vocabulary and 77-token context so the real CLIP
tokenizer works unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

#: Vocabulary and context of every OpenAI/open_clip CLIP text tower.
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77


def tiny_open_clip_config(
    *, image_size: int = 32, embed_dim: int = 16, width: int = 32, quick_gelu: bool = False
) -> dict[str, Any]:
    """An open_clip model config for a 2-layer ViT (patch 8) and a 2-layer text tower."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 2,
            "width": width,
            "head_width": width // 2,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": CLIP_CONTEXT_LENGTH,
            "vocab_size": CLIP_VOCAB_SIZE,
            "width": width,
            "heads": 2,
            "layers": 2,
        },
    }


def write_open_clip_config(path: str | Path, **kwargs: Any) -> Path:
    """Writes ``tiny_open_clip_config(**kwargs)`` as JSON to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_open_clip_config(**kwargs), indent=2))
    return path


def build_open_clip_model(config_path: str | Path, *, seed: int = 0):
    """A random-weight open_clip ``CLIP`` built from a config JSON (eval mode, fp32)."""
    import open_clip
    import torch

    cfg = json.loads(Path(config_path).read_text())
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg).eval()


def write_open_clip_checkpoint(
    config_path: str | Path,
    path: str | Path,
    *,
    seed: int = 0,
    fmt: str = "hpsv2",
    module_prefix: bool = False,
) -> Path:
    """Writes random weights for the config at ``config_path`` to ``path``.

    Args:
        fmt: ``"hpsv2"`` — ``{"state_dict": sd}`` as in ``HPS_v2.1_compressed.pt``;
            ``"bare"`` — the state dict itself (open_clip ``*.bin``/``*.pt`` files).
        module_prefix: prefix every key with ``module.`` (checkpoints saved from DDP).
    """
    import torch

    if fmt not in ("hpsv2", "bare"):
        raise ValueError(f"fmt must be 'hpsv2' or 'bare', got {fmt!r}")
    sd = build_open_clip_model(config_path, seed=seed).state_dict()
    if module_prefix:
        sd = {f"module.{k}": v for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd} if fmt == "hpsv2" else sd, path)
    return path


def write_hf_clip_folder(
    directory: str | Path, *, image_size: int = 32, projection_dim: int = 16, seed: int = 0
) -> Path:
    """Saves a tiny random ``CLIPModel`` + ``CLIPProcessor`` folder (``save_pretrained``).

    Name the folder so that it contains ``openai`` if it is to be passed to torchmetrics'
    ``CLIPScore(model_name_or_path=...)``, which only accepts such names.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dancegrpo_testing.tokenizers import clip_tokenizer

    directory = Path(directory)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CLIP_CONTEXT_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def write_aesthetic_mlp(path: str | Path, *, input_dim: int = 16, seed: int = 0) -> Path:
    """Writes a random LAION aesthetic-predictor-v2 state dict to ``path``.

    Layout of ``sac+logos+ava1-l14-linearMSE.pth`` (christophschuhmann/
    improved-aesthetic-predictor): ``nn.Sequential`` of Linear(d,1024), Dropout,
    Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1) — keys
    ``layers.{0,2,4,6,7}.{weight,bias}``. The published head has ``d = 768``.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    dims = [input_dim, 1024, 128, 64, 16, 1]
    sd = {}
    for index, (d_in, d_out) in zip(
        (0, 2, 4, 6, 7), zip(dims[:-1], dims[1:], strict=True), strict=True
    ):
        bound = d_in**-0.5
        sd[f"layers.{index}.weight"] = (torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound
        sd[f"layers.{index}.bias"] = (torch.rand(d_out, generator=gen) * 2 - 1) * bound
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


@dataclasses.dataclass(frozen=True)
class TinyClipFiles:
    """Paths written by ``write_tiny_clip_files`` (all models share a 16-d embedding)."""

    config: Path
    hps_checkpoint: Path
    bare_checkpoint: Path
    hf_folder: Path
    aesthetic_mlp: Path


def write_tiny_clip_files(directory: str | Path) -> TinyClipFiles:
    """Writes one of everything the image reward kinds load into ``directory``.

    - ``tiny_vit.json``: open_clip config (image size 32, 16-d embedding);
    - ``hps_tiny.pt``: random weights in hpsv2's ``{"state_dict": ...}`` format;
    - ``clip_tiny.bin``: other random weights (seed 1) as a bare state dict;
    - ``openai-clip-tiny/``: an HF CLIPModel folder (named for torchmetrics);
    - ``aesthetic_tiny.pth``: a 16-d LAION aesthetic head.
    """
    directory = Path(directory)
    config = write_open_clip_config(directory / "tiny_vit.json")
    return TinyClipFiles(
        config=config,
        hps_checkpoint=write_open_clip_checkpoint(config, directory / "hps_tiny.pt"),
        bare_checkpoint=write_open_clip_checkpoint(
            config, directory / "clip_tiny.bin", seed=1, fmt="bare"
        ),
        # seed 2: its cosines on random images have both signs, so CLIPScore's max(·, 0)
        # is exercised on both sides.
        hf_folder=write_hf_clip_folder(directory / "openai-clip-tiny", seed=2),
        aesthetic_mlp=write_aesthetic_mlp(directory / "aesthetic_tiny.pth", input_dim=16),
    )


def random_images(count: int, *, seed: int = 0, min_size: int = 20, max_size: int = 72) -> list:
    """``count`` random ``uint8 [H, W, 3]`` images of differing, non-square sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        rng.integers(
            0,
            256,
            (int(rng.integers(min_size, max_size)), int(rng.integers(min_size, max_size)), 3),
            dtype=np.uint8,
        )
        for _ in range(count)
    ]


@dataclasses.dataclass(frozen=True)
class TinyPickScoreFiles:
    """Paths written by ``write_pickscore_folders``."""

    model: Path
    processor: Path


def write_pickscore_folders(
    directory: str | Path, *, image_size: int = 32, logit_scale: float = 100.0, seed: int = 3
) -> TinyPickScoreFiles:
    """A tiny PickScore in the official layout: two folders, as PickScore loads them.

    - ``PickScore_v1/``: a ``CLIPModel`` ``save_pretrained`` (``config.json`` + weights, no
      processor files), like hub repo ``yuvalkirstain/PickScore_v1``; its ``logit_scale``
      is set to ``log(logit_scale)`` (the released model learned about 100).
    - ``CLIP-ViT-H-14-laion2B-s32B-b79K/``: the processor folder, like hub repo
      ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` without its weights: the base model's
      ``config.json`` (``AutoProcessor`` finds ``CLIPProcessor`` through its
      ``model_type``), the CLIP tokenizer files and a
      ``preprocessor_config.json`` in that repo's (older, feature-extractor) format —
      integer ``size``/``crop_size``, ``resample: 3`` (bicubic), OpenAI mean/std — at
      ``image_size`` instead of 224.
    """
    import math

    import torch

    from dancegrpo_testing.tokenizers import clip_tokenizer

    directory = Path(directory)
    model_dir = directory / "PickScore_v1"
    staging = write_hf_clip_folder(directory / "staging", image_size=image_size, seed=seed)
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(staging), local_files_only=True).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    model.save_pretrained(model_dir)
    processor_dir = directory / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    clip_tokenizer().save_pretrained(processor_dir)
    (processor_dir / "config.json").write_text((staging / "config.json").read_text())
    (processor_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": image_size,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "size": image_size,
            },
            indent=2,
        )
    )
    return TinyPickScoreFiles(model=model_dir, processor=processor_dir)
