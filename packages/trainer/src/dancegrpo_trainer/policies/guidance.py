"""Classifier-free guidance plumbing the flow adapters share: the ``negative_<key>`` tensors
of the unconditional pass and the guided velocity ``v_u + w·(v_c − v_u)``.

How an adapter runs the two passes (one batched forward, a scale per expert, Qwen-Image's
norm rescale) stays in the adapter.
"""

from __future__ import annotations

import torch


def repeated_negatives(negative: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The negative prompt's encoding (one row per tensor) as ``negative_<key>`` tensors of
    ``rows`` rows each (copies, so that an embedding cache stores every row on its own)."""
    return {
        f"negative_{key}": value.expand(rows, *value.shape[1:]).clone()
        for key, value in negative.items()
    }


def negative(tensors: dict[str, torch.Tensor], key: str, scale_field: str) -> torch.Tensor:
    """``negative_<key>`` of a guided conditioning, or an error naming the fix;
    ``scale_field`` is the config field whose value turned guidance on."""
    name = f"negative_{key}"
    if name not in tensors:
        raise ValueError(
            f"{scale_field} > 1 needs {name!r} in the conditioning: encode prompts (or "
            f"rebuild the embedding cache) with the same {scale_field}"
        )
    return tensors[name]


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + w·(v_c − v_u)`` (Ho & Salimans 2022, as the diffusers
    pipelines combine the two passes)."""
    return uncond + scale * (cond - uncond)
