"""FLUX's latent layout: 2×2 patches of the VAE latent packed into a token sequence, and the
3-axis RoPE position ids of image and text tokens (diffusers ``FluxPipeline._pack_latents``,
``_unpack_latents``, ``_prepare_latent_image_ids``).
"""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)·(w/2), 4C]`` (row-major 2×2 patches; ``h``, ``w`` even)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h/2)·(w/2), 4C]`` → ``[B, C, h, w]``.

    Args:
        packed: the packed latents.
        height, width: the unpacked latent size ``h``, ``w`` (not pixels).
    """
    b, tokens, channels = packed.shape
    if tokens != (height // 2) * (width // 2) or channels % 4:
        raise ValueError(
            f"packed latents {tuple(packed.shape)} do not match a {height}x{width} latent"
        )
    x = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """RoPE ids ``[(h/2)·(w/2), 3]`` of the packed image tokens: ``(0, row, col)``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def text_ids(sequence_length: int) -> torch.Tensor:
    """RoPE ids ``[S, 3]`` of the text tokens (all zeros in FLUX)."""
    return torch.zeros(sequence_length, 3)
