"""The conditioning images of the image-to-video and editing adapters (``uint8
[N, H, W, 3]``): their check, and the PIL images the pipelines' preprocessing starts from."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def check_condition_images(images: torch.Tensor) -> torch.Tensor:
    """``images`` as given, after checking they are ``uint8 [N, H, W, 3]``."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"condition_images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
        )
    return images


def to_pil_images(images: torch.Tensor) -> list[Any]:
    """Checked ``uint8 [N, H, W, 3]`` images as ``N`` RGB PIL images."""
    from PIL import Image

    arrays = check_condition_images(images).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in arrays]
