"""A tiny random-weight DINOv2 folder in the layout of ``facebook/dinov2-*`` (no downloads).

``write_hf_dinov2_folder`` saves a 2-layer ``Dinov2Model`` (hidden 32, patch 14) and a
``BitImageProcessor`` configured as the released ones (shortest side → resize bicubic,
centre crop, ImageNet mean/std), scaled down from 256 → 224 to 32 → 28.
"""

from __future__ import annotations

from pathlib import Path

#: The released processors' ImageNet normalisation (``facebook/dinov2-base``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_hf_dinov2_folder(directory: str | Path, *, seed: int = 0) -> Path:
    """Saves a tiny ``Dinov2Model`` + ``BitImageProcessor`` folder; returns its path."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = Path(directory)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
    )
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        resample=3,  # bicubic, as the released processors
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(directory)
    return directory
