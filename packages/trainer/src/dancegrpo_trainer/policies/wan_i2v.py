"""Wan image-to-video (Wan2.1 I2V, Wan2.2 I2V-A14B, Wan2.2 TI2V-5B with an image) sampled
with the flow SDE, as a Policy.

The sampling loop is diffusers' ``WanImageToVideoPipeline`` (diffusers 0.42) cut down to what
GRPO needs; text encoding, schedule, experts, guidance and decoding are :mod:`.wan`'s. The
image conditions the model in one of two ways, as the pipeline does:

- **Channel concatenation** (Wan2.1 I2V, Wan2.2 I2V-A14B): the image, resized to the video
  size, followed by ``F − 1`` black frames is VAE-encoded as a whole video (posterior mean,
  normalised); at every step the transformer takes ``[latents, mask, image latents]`` on
  channels (``C + 4 + C`` = 36 for the released models), the 4-channel mask being 1 on the
  first latent frame (the image's) and 0 elsewhere. Wan2.1 I2V also cross-attends to CLIP
  image tokens (the vision tower's penultimate hidden state, ``image_embeds``), for both the
  conditional and the unconditional pass.
- **First-frame replacement** (TI2V-5B, ``expand_timesteps``): the image alone is encoded to
  one latent frame, which replaces latent frame 0 at the model input, whose tokens see
  timestep 0. The pipeline lets its sampler move frame 0 with the model's output and pastes
  the image latents over it after the last step; a Policy decodes its final latents as they
  are, so here frame 0 moves with the exact flow velocity towards the image latents,
  ``(x₀ − c)/σ`` (σ = t/1000), which carries no parameters: the η = 0 path ends on ``c``
  (the pipeline's output, tested) and frame 0 contributes no gradient.

Images are encoded once per prompt (:meth:`WanI2VPolicy.encode_condition_images`), apart from
the text, so an embedding cache can hold the text while images are encoded at rollout.
Without an image, a TI2V-5B policy generates from text alone (``wan_ti2v``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.condition_images import to_pil_images
from dancegrpo_trainer.policies.runtime import freeze, module_dtype, place
from dancegrpo_trainer.policies.wan import (
    NUM_TRAIN_TIMESTEPS,
    WanConfig,
    WanPolicy,
    _listed,
    normalize_latents,
)

#: Normalised VAE latents of the conditioning: ``[B, C, T, h, w]`` (the image + black frames,
#: channel-concatenation models) or ``[B, C, 1, h, w]`` (TI2V's first frame).
IMAGE_KEY = "image_latents"
#: CLIP image tokens of Wan2.1 I2V, ``[B, 257, 1280]`` (penultimate hidden state).
IMAGE_EMBEDS_KEY = "image_embeds"
#: The text length Wan2.1 I2V needs: diffusers' ``WanAttnProcessor`` splits the context
#: into image tokens and the last 512 (text) tokens.
WAN21_I2V_TEXT_LENGTH = 512


class WanI2VPolicy(WanPolicy):
    """Wan image-to-video transformer(s) + flow SDE behind the :class:`Policy` interface.

    Latents are :class:`WanPolicy`'s. Conditioning: the text tensors, ``image_latents`` and,
    for Wan2.1 I2V, ``image_embeds``. ``encode_prompts`` without images gives the text part
    alone (what an embedding cache stores); :meth:`encode_condition_images` gives the image
    part. ``from_pretrained`` additionally reads ``image_encoder/`` and ``image_processor/``
    when ``model_index.json`` lists them; ``from_pipeline`` wraps a
    ``WanImageToVideoPipeline``.
    """

    config_class: ClassVar = WanConfig

    def __init__(
        self,
        *,
        image_encoder: nn.Module | None = None,
        image_processor: Any | None = None,
        **components: Any,
    ) -> None:
        """Takes :class:`WanPolicy`'s components plus Wan2.1 I2V's CLIP ``image_encoder``
        (a ``CLIPVisionModel``, placed on ``text_encoder_device``) and its
        ``image_processor`` (both ``None`` for Wan2.2)."""
        if (image_encoder is None) != (image_processor is None):
            raise ValueError("image_encoder and image_processor must both be given (or neither)")
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        super().__init__(**components)
        if image_encoder is not None:
            self.image_encoder = place(
                image_encoder, self.config.text_device, self.config.torch_dtype
            )
            freeze(self.image_encoder)
        tr_cfg = self.transformer.config
        image_dim = getattr(tr_cfg, "image_dim", None)
        if image_dim is not None and image_encoder is None:
            raise ValueError(
                f"the transformer cross-attends to CLIP image tokens (image_dim={image_dim}), "
                "but no image_encoder/image_processor was given (Wan2.1 I2V folders have them)"
            )
        has_image_kv = getattr(tr_cfg, "added_kv_proj_dim", None) is not None
        if has_image_kv and self.config.max_sequence_length != WAN21_I2V_TEXT_LENGTH:
            raise ValueError(
                f"max_sequence_length must be {WAN21_I2V_TEXT_LENGTH} for Wan2.1 I2V, got "
                f"{self.config.max_sequence_length}: diffusers' Wan attention takes the "
                f"context tokens before the last {WAN21_I2V_TEXT_LENGTH} as image tokens"
            )

    def _check_input_channels(self, in_channels: int) -> None:
        """Channel concatenation takes ``C + temporal_ratio + C`` channels; TI2V's first-frame
        replacement (``expand_timesteps``) the latents alone."""
        c = self.latent_channels
        if self.expand_timesteps:
            expected, layout = c, "latents (TI2V first-frame replacement)"
        else:
            expected = 2 * c + self.temporal_ratio
            layout = f"latents + {self.temporal_ratio}-channel mask + image latents"
        if in_channels != expected:
            raise ValueError(
                f"not a Wan image-to-video transformer for this VAE: it takes {in_channels} "
                f"input channels, expected {expected} ({layout})"
            )

    @property
    def text_only_allowed(self) -> bool:
        """TI2V-5B also generates from text alone; channel-concatenation models need an image."""
        return self.expand_timesteps

    # ----------------------------------------------------------------- loading
    #: :class:`WanPolicy`'s, plus Wan2.1 I2V's CLIP image encoder (placed with the text
    #: encoder) and its processor (``None`` in Wan2.2 pipelines).
    pipeline_modules: ClassVar[dict[str, str]] = {
        **WanPolicy.pipeline_modules,
        "image_encoder": "text",
    }
    pipeline_extras: ClassVar[tuple[str, ...]] = (*WanPolicy.pipeline_extras, "image_processor")

    @classmethod
    def _load_extras(cls, path: Path, index: dict[str, Any], config: WanConfig) -> dict[str, Any]:
        """``image_encoder/`` (``CLIPVisionModel``) and ``image_processor/``
        (``CLIPImageProcessor``) when listed (Wan2.1 I2V); loaded even with
        ``load_text_encoders`` off, since images are encoded at rollout."""
        if not _listed(index, "image_encoder"):
            return {}
        from transformers import CLIPImageProcessor, CLIPVisionModel

        from dancegrpo_trainer.policies.runtime import transformers_dtype_kwargs

        kwargs = transformers_dtype_kwargs(config.torch_dtype)
        return {
            "image_encoder": CLIPVisionModel.from_pretrained(
                path, subfolder="image_encoder", **kwargs
            ),
            "image_processor": CLIPImageProcessor.from_pretrained(
                path, subfolder="image_processor"
            ),
        }

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as :class:`WanPolicy` does, plus (given ``uint8
        [N, H, W, 3]`` ``condition_images``) their image conditioning.

        Without ``condition_images`` the result is text-only: for an embedding cache, or a
        TI2V-5B text-to-video rollout."""
        return self._with_condition_images(self._encode_text(list(prompts)), condition_images)

    @torch.no_grad()
    def encode_condition_images(self, condition_images: torch.Tensor) -> Conditioning:
        """``uint8 [N, H, W, 3]`` images (any size) → ``image_latents`` float32 on
        ``device`` (and Wan2.1's CLIP ``image_embeds``): each image resized to the video size
        by diffusers' ``VideoProcessor`` (as the pipeline), VAE-encoded on ``vae_device`` one
        image at a time (posterior mean, normalised)."""
        pils = to_pil_images(condition_images)
        pixels = self._preprocess_images(pils)  # [N, 3, H, W] in [-1, 1]
        latents = torch.cat([self._encode_image(p) for p in pixels])
        tensors = {IMAGE_KEY: latents.to(self.device)}
        if self.image_encoder is not None:
            tensors[IMAGE_EMBEDS_KEY] = self._clip_image_embeds(pils).to(self.device)
        return Conditioning(tensors)

    def _preprocess_images(self, pils: list[Any]) -> torch.Tensor:
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=self.spatial_ratio)
        return processor.preprocess(pils, height=self.height, width=self.width).float()

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """One image ``[3, H, W]`` → normalised posterior-mean latents ``[1, C, T', h, w]``
        float32: ``T' = 1`` for TI2V (the image alone), else the latents of the image
        followed by ``F − 1`` black frames (diffusers ``prepare_latents``)."""
        image = pixels[None, :, None]  # [1, 3, 1, H, W]
        if not self.expand_timesteps:
            black = image.new_zeros(1, 3, self.num_frames - 1, self.height, self.width)
            image = torch.cat([image, black], dim=2)
        vae = self.vae
        video = image.to(self.config.decode_device, module_dtype(vae))
        mean = vae.encode(video).latent_dist.mode().to(self.device, torch.float32)
        return normalize_latents(vae, mean)

    def _clip_image_embeds(self, pils: list[Any]) -> torch.Tensor:
        """CLIP vision penultimate hidden state ``[N, tokens, D]`` of the original images
        (diffusers ``WanImageToVideoPipeline.encode_image``)."""
        device = self.config.text_device
        inputs = self.image_processor(images=pils, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(module_dtype(self.image_encoder))
        out = self.image_encoder(**inputs, output_hidden_states=True)
        return out.hidden_states[-2]

    # ----------------------------------------------------------------- sampling
    def _image(
        self, tensors: dict[str, torch.Tensor], latents: torch.Tensor
    ) -> torch.Tensor | None:
        """The rows' ``image_latents`` on the latents' device (checked), or ``None`` for a
        TI2V text-to-video rollout."""
        if IMAGE_KEY not in tensors:
            if self.text_only_allowed:
                return None
            raise ValueError(
                "Wan image-to-video needs the conditioning image: encode_prompts(prompts, "
                "condition_images=...) or merge encode_condition_images(images) into cached "
                "text embeddings"
            )
        image = tensors[IMAGE_KEY].to(latents.device, torch.float32)
        b, c, t, h, w = latents.shape
        expected = (b, c, 1 if self.expand_timesteps else t, h, w)
        if tuple(image.shape) != expected:
            raise ValueError(
                f"image_latents {tuple(image.shape)} do not match latents {tuple(latents.shape)}"
                f" (expected {list(expected)}: encode the images with this policy's size)"
            )
        return image

    def _model_input(self, latents: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self._image(tensors, latents)
        if image is None:
            return latents
        if self.expand_timesteps:  # frame 0 is the image (the pipeline's mask blend, exactly)
            return torch.cat([image, latents[:, :, 1:]], dim=2)
        b, _, t, h, w = latents.shape
        mask = latents.new_zeros(b, self.temporal_ratio, t, h, w)
        mask[:, :, 0] = 1.0
        return torch.cat([latents, mask, image.to(latents.dtype)], dim=1)

    def _model_timestep(
        self, t: torch.Tensor, latents: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """TI2V with an image: one timestep per token, 0 on frame 0's tokens (the image is
        clean), ``t`` elsewhere (diffusers' ``expand_timesteps``)."""
        if not (self.expand_timesteps and IMAGE_KEY in tensors):
            return t
        patch_t, patch_h, patch_w = self.patch_size
        _, _, frames, h, w = latents.shape
        grid = torch.ones(frames // patch_t, h // patch_h, w // patch_w, device=t.device)
        grid[0] = 0.0
        return grid.flatten()[None, :] * t[:, None]

    def _model_kwargs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.image_encoder is None:
            return {}
        if IMAGE_EMBEDS_KEY not in tensors:
            raise ValueError(
                f"Wan2.1 I2V needs {IMAGE_EMBEDS_KEY!r} (CLIP image tokens) in the "
                "conditioning: encode the condition images with this policy"
            )
        return {"encoder_hidden_states_image": tensors[IMAGE_EMBEDS_KEY]}

    def _finish_velocity(
        self,
        velocity: torch.Tensor,
        latents: torch.Tensor,
        t: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """TI2V with an image: frame 0's velocity is the exact flow towards the image
        latents, ``(x₀ − c)/σ`` with ``σ = t/1000`` (parameter-free)."""
        if not (self.expand_timesteps and IMAGE_KEY in tensors):
            return velocity
        image = self._image(tensors, latents)
        sigma = (t / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1)
        frame0 = (latents[:, :, :1].float() - image) / sigma
        return torch.cat([frame0, velocity[:, :, 1:]], dim=2)

    # ----------------------------------------------------------------- training
    @property
    def lora_target_modules(self) -> list[str]:
        """:mod:`.wan`'s targets, plus Wan2.1 I2V's image cross-attention projections."""
        extra = ["attn2.add_k_proj", "attn2.add_v_proj"] if self.image_encoder is not None else []
        return super().lora_target_modules + extra
