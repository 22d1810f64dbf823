"""What the adapters on packed 2×2 image latents share (FLUX.1, FLUX.1-Kontext, Qwen-Image):
initial noise drawn as ``[B, C, h, w]`` and packed to ``[B, L, 4C]``, the token count ``L``,
and diffusers' resolution-dependent ("dynamic") timestep shift, ``μ`` linear in ``L``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dancegrpo_trainer.policies.flow_transformer import (
    FlowTransformerConfig,
    FlowTransformerPolicy,
)
from dancegrpo_trainer.policies.flux_latents import pack_latents


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' ``calculate_shift``: ``μ`` linear in the packed image token count.

    The exponential time shift ``σ' = e^μ / (e^μ + 1/σ − 1)`` equals the static shift with
    ``s = e^μ``, so the schedule is ``flow_sigmas(n, shift=exp(μ))``.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


@dataclasses.dataclass
class PackedImageConfig(FlowTransformerConfig):
    """The shift options of the packed-latent adapters (defaults: FLUX.1-dev's scheduler).

    Attributes:
        dynamic_shift: diffusers' resolution-dependent shift ``s = exp(μ(L))`` with the four
            parameters below; ``False`` uses the static ``shift``.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: ``μ``'s line.
    """

    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError("max_image_seq_len must be greater than base_image_seq_len")


class PackedImagePolicy(FlowTransformerPolicy):
    """A :class:`FlowTransformerPolicy` whose latents are packed 2×2 image tokens
    ``[B, L, 4C]`` and whose schedule shift may follow ``L``."""

    config: PackedImageConfig

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens per sample ``L = (h/2)·(w/2)``."""
        return (self.latent_height // 2) * (self.latent_width // 2)

    @property
    def effective_shift(self) -> float:
        """The static shift ``s`` in use (``exp(μ)`` under ``dynamic_shift``)."""
        c = self.config
        if not c.dynamic_shift:
            return c.shift
        mu = dynamic_shift_mu(
            self.image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )
        return math.exp(mu)

    @property
    def schedule_shift(self) -> float:
        return self.effective_shift

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x_1 ~ N(0, I)`` drawn as ``[B, C, h, w]`` (on the generator's device, as
        diffusers' ``randn_tensor``) and packed → float32 ``[B, L, 4C]`` on ``device``."""
        return pack_latents(super().initial_noise(batch_size, generator))
