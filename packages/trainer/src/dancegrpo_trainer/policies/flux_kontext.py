"""FLUX.1-Kontext (instruction-based image editing on the FLUX.1 transformer) sampled with
the flow SDE, as a Policy.

The sampling loop is diffusers' ``FluxKontextPipeline`` (diffusers 0.42) cut down to what
GRPO needs. It is FLUX.1 (:mod:`.flux`: same CLIP + T5 prompt encoding, packed 2×2 latents,
guidance embedding, dynamically shifted schedule, flow-SDE step, decoding) plus the source
image:

- each prompt's source image is resized to ``condition_resolution`` (PIL Lanczos, through
  the pipeline's ``VaeImageProcessor``), VAE-encoded (posterior mode, as the pipeline's
  ``sample_mode="argmax"``; ``(z − shift_factor)·scaling_factor``) and packed like the
  noisy latents, once per prompt;
- at every step its tokens are appended to the noisy image tokens *along the sequence*
  (``torch.cat([latents, image_latents], dim=1)``), with RoPE ids ``(1, row, col)`` where
  the generated image's are ``(0, row, col)``; the transformer's output for the appended
  tokens is dropped (``noise_pred[:, :L]``);
- the schedule's dynamic shift counts the generated image's tokens only.

Deliberate differences from ``FluxKontextPipeline.__call__``: the source image goes to one
configured size (``condition_resolution``, default the output size; Flow-Factory trains the
same way with its ``condition_image_size``) rather than to the preferred Kontext resolution
nearest its aspect ratio (``_auto_resize``), so every prompt of a batch has the same token
count; and the output size is the configured ``resolution`` (the pipeline rescales its
``height``/``width`` to ``max_area``). True CFG (the pipeline's ``true_cfg_scale``; 1.0 by
default, i.e. off) is not implemented: FLUX.1-Kontext-dev is guidance-distilled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.condition_images import to_pil_images
from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy
from dancegrpo_trainer.policies.flux_latents import latent_image_ids, pack_latents
from dancegrpo_trainer.policies.runtime import parse_resolution, vae_encode

#: Key of the packed source-image latents, ``[B, L_img, 4C]``.
IMAGE_KEY = "image_latents"


@dataclasses.dataclass
class FluxKontextConfig(FluxConfig):
    """Options of :class:`FluxKontextPolicy` (defaults: Flow-Factory's FLUX.1-Kontext GRPO
    example, ``examples/grpo/lora/flux1_kontext/default.yaml`` of github.com/X-GenGroup/
    Flow-Factory: 384 px output and source, 10 steps, guidance 2.5, Flow-GRPO's SDE noise
    ``noise_level`` 0.9; FLUX.1-Kontext-dev's scheduler shifts dynamically).

    Attributes:
        resolution: output size in pixels, an int or ``[height, width]`` (multiple of 16).
        condition_resolution: the size the source image is resized to before encoding
            (``None``: the output size; multiple of 16).
        guidance_scale: the distilled guidance embedding (FLUX.1-Kontext-dev: 2.5 in
            Flow-Factory and BFL's examples; diffusers' pipeline default 3.5).
        num_steps, eta, noise_schedule, shift, dynamic_shift, base_shift, max_shift,
            base_image_seq_len, max_image_seq_len, max_sequence_length: as
            :class:`FluxConfig`.
    """

    resolution: int | list[int] = 384
    condition_resolution: int | list[int] | None = None
    guidance_scale: float = 2.5
    num_steps: int = 10
    eta: float = 0.9
    noise_schedule: str = "flow_grpo"
    dynamic_shift: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.condition_resolution is not None:
            try:
                parse_resolution(self.condition_resolution, 16)
            except ValueError as err:
                raise ValueError(f"condition_resolution: {err}") from None


class FluxKontextPolicy(FluxPolicy):
    """FLUX.1-Kontext transformer + flow SDE behind the :class:`Policy` interface.

    Latents are FLUX's packed float32 ``[B, L, 4C]``. Conditioning tensors: FLUX's
    ``prompt_embeds`` / ``pooled_prompt_embeds`` and ``image_latents`` ``[B, L_img, 4C]``
    (the packed source image). ``encode_prompts`` without images gives the text part alone
    (what an embedding cache stores); :meth:`encode_condition_images` gives the image part;
    the two merge into one :class:`Conditioning`. ``from_pretrained`` reads FLUX's folder
    layout (``black-forest-labs/FLUX.1-Kontext-dev``); ``from_pipeline`` wraps a diffusers
    ``FluxKontextPipeline``.
    """

    config_class: ClassVar = FluxKontextConfig
    config: FluxKontextConfig

    def __init__(self, *, config: FluxKontextConfig, **components: Any) -> None:
        """Takes :class:`FluxPolicy`'s components and a Kontext config."""
        if not isinstance(config, FluxKontextConfig):
            raise TypeError(f"config must be a FluxKontextConfig, got {type(config).__name__}")
        super().__init__(config=config, **components)
        vae_channels = int(self.vae.config.latent_channels)
        if vae_channels != self.latent_channels:
            raise ValueError(
                f"the transformer's in_channels/4 ({self.latent_channels}) must equal the VAE's "
                f"latent_channels ({vae_channels}): the source image is packed like the latents"
            )

    def _init_geometry(self) -> None:
        """FLUX's geometry, plus the source image's size (``condition_resolution``, or the
        output size, so a policy at another resolution resizes its sources to it)."""
        super()._init_geometry()
        size = self.config.condition_resolution or self.config.resolution
        self.condition_height, self.condition_width = parse_resolution(
            size, self.vae_scale_factor * 2
        )
        self.condition_latent_height = self.condition_height // self.vae_scale_factor
        self.condition_latent_width = self.condition_width // self.vae_scale_factor

    @property
    def condition_seq_len(self) -> int:
        """Packed source-image tokens per sample ``L_img``."""
        return (self.condition_latent_height // 2) * (self.condition_latent_width // 2)

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as FLUX does, plus (given ``uint8 [N, H, W, 3]``
        ``condition_images``, the source images) their ``image_latents``.

        Without ``condition_images`` the result is text-only, for an embedding cache;
        sampling then needs :meth:`encode_condition_images` merged in.
        """
        return self._with_condition_images(super().encode_prompts(prompts), condition_images)

    @torch.no_grad()
    def encode_condition_images(self, condition_images: torch.Tensor) -> Conditioning:
        """``uint8 [N, H, W, 3]`` source images (any size) → ``image_latents`` float32
        ``[N, L_img, 4C]`` on ``device``: resized to ``condition_resolution`` and scaled to
        ``[-1, 1]`` by the pipeline's ``VaeImageProcessor`` (``resize`` then ``preprocess``),
        encoded on ``vae_device`` ``vae_decode_chunk_size`` images at a time (posterior
        mode, ``(z − shift_factor)·scaling_factor``), packed 2×2."""
        pixels = self._preprocess_images(condition_images)  # [N, 3, H, W] in [-1, 1]
        chunk, device = self.config.vae_decode_chunk_size, self.config.decode_device
        latents = [
            vae_encode(self.vae, pixels[i : i + chunk], device)
            for i in range(0, len(pixels), chunk)
        ]
        return Conditioning({IMAGE_KEY: pack_latents(torch.cat(latents)).to(self.device)})

    def _preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, H, W, 3]`` → float ``[N, 3, h, w]`` in ``[-1, 1]`` at the condition
        size, as ``FluxKontextPipeline`` step 3 (``image_processor.resize`` + ``preprocess``)."""
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        height, width = self.condition_height, self.condition_width
        pils = to_pil_images(images)
        return processor.preprocess(processor.resize(pils, height, width), height, width)

    # ----------------------------------------------------------------- sampling
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """Velocity for packed ``latents`` ``[B, L, 4C]`` at ``timestep``: the transformer on
        the generated tokens followed by the source image's (RoPE ids ``(0, ·, ·)`` then
        ``(1, ·, ·)``), its output for the first ``L`` tokens; differentiable."""
        image = self._image_tokens(cond.tensors, latents)
        hidden = torch.cat([latents, image], dim=1)
        source_ids = latent_image_ids(self.condition_latent_height, self.condition_latent_width)
        source_ids[:, 0] = 1
        ids = torch.cat([latent_image_ids(self.latent_height, self.latent_width), source_ids])
        out = self._transformer_forward(hidden, ids, timestep, cond.tensors)
        return out[:, : latents.shape[1]]

    def _image_tokens(
        self, tensors: dict[str, torch.Tensor], latents: torch.Tensor
    ) -> torch.Tensor:
        """``image_latents`` on ``latents``' device and dtype, after checking their shape."""
        if IMAGE_KEY not in tensors:
            raise ValueError(
                "FLUX.1-Kontext needs the source image: encode_prompts(prompts, "
                "condition_images=...) or merge encode_condition_images(images) into cached "
                "text embeddings"
            )
        image = tensors[IMAGE_KEY]
        expected = (latents.shape[0], self.condition_seq_len, latents.shape[2])
        if tuple(image.shape) != expected:
            raise ValueError(
                f"image_latents {tuple(image.shape)} do not match {expected} (encode the "
                "source images with this policy's condition_resolution)"
            )
        return image.to(latents.device, latents.dtype)
