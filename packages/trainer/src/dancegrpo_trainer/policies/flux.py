"""FLUX.1 (rectified flow, ``FluxTransformer2DModel``) sampled with the flow SDE, as a Policy.

The sampling loop is diffusers' ``FluxPipeline`` cut down to what GRPO needs: packed 2×2
latents with RoPE image/text ids, T5 sequence embeddings + CLIP pooled embedding, the
distilled guidance *embedding* (no second, unconditional pass), a shifted sigma schedule
(static ``shift`` as DanceGRPO, or diffusers' resolution-dependent dynamic shift), and each
step taken by :func:`flow_sde_step`, which returns the step's log-probability.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.core.schedules import flow_sigmas
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow_transformer import P
from dancegrpo_trainer.policies.flux_latents import latent_image_ids, text_ids, unpack_latents
from dancegrpo_trainer.policies.packed_image import (  # noqa: F401 - dynamic_shift_mu: public here
    PackedImageConfig,
    PackedImagePolicy,
    dynamic_shift_mu,
)
from dancegrpo_trainer.policies.runtime import load_text_encoders, module_dtype, vae_decode

#: LoRA targets of diffusers' FLUX LoRA training scripts: attention and MLP projections of
#: the double-stream blocks (``attn.to_q`` etc. also match the single-stream blocks).
FLUX_LORA_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


@dataclasses.dataclass
class FluxConfig(PackedImageConfig):
    """Options of :class:`FluxPolicy` (defaults: the DanceGRPO paper's FLUX.1-dev run).

    Attributes:
        resolution: image size in pixels, an int or ``[height, width]`` (multiple of 16).
        guidance_scale: value fed to the guidance embedding (FLUX.1-dev: 3.5).
        num_steps, eta, noise_schedule: see :class:`FlowTransformerConfig`.
        shift: static timestep shift ``s`` (``σ' = sσ/(1+(s−1)σ)``) when not ``dynamic_shift``.
        dynamic_shift, base_shift, max_shift, base_image_seq_len, max_image_seq_len: see
            :class:`PackedImageConfig` (defaults: FLUX.1-dev's scheduler config values).
        max_sequence_length: T5 tokens (512 for FLUX.1-dev; fewer saves memory).
    """

    resolution: int | list[int] = 720
    guidance_scale: float = 3.5
    eta: float = 0.3
    shift: float = 3.0
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in [1, 512], got {self.max_sequence_length}"
            )


class FluxPolicy(PackedImagePolicy):
    """FLUX.1 transformer + flow SDE behind the :class:`Policy` interface.

    Latents are packed float32 ``[B, L, 4C]`` (``L = (H/16)·(W/16)``, ``C = 16`` for FLUX.1)
    on ``config.device``. Conditioning tensors: ``prompt_embeds`` ``[B, S, 4096]`` (T5) and
    ``pooled_prompt_embeds`` ``[B, 768]`` (CLIP).
    """

    modality: ClassVar = "image"
    config_class: ClassVar = FluxConfig
    config: FluxConfig
    default_lora_targets: ClassVar = FLUX_LORA_TARGET_MODULES
    fsdp_blocks: ClassVar = (
        "diffusers.models.transformers.transformer_flux:FluxTransformerBlock",
        "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock",
    )

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        config: FluxConfig,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any | None = None,
    ) -> None:
        """Places the components per ``config`` and freezes the text encoders and VAE.

        Args:
            transformer: a diffusers ``FluxTransformer2DModel`` (the trainable module).
            vae: a diffusers ``AutoencoderKL`` (with ``scaling_factor``/``shift_factor``).
            config: the policy options.
            text_encoder, tokenizer: CLIP text model (pooled output) and its tokenizer.
            text_encoder_2, tokenizer_2: T5 encoder and its tokenizer. All four ``None``
                when prompts come from an embedding cache.
        """
        super().__init__(
            transformer=transformer,
            vae=vae,
            config=config,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self._init_geometry()

    def _init_geometry(self) -> None:
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._set_image_size(self.vae_scale_factor, self.vae_scale_factor * 2)
        # Read model config now: the trainer may later swap in a DDP/FSDP-wrapped module.
        self.latent_channels = int(self.transformer.config.in_channels) // 4
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)

    @classmethod
    def from_pretrained(cls: type[P], path: str | Path, config: FluxConfig | None = None) -> P:
        """Loads ``transformer/``, ``vae/`` and (unless ``load_text_encoders`` is off)
        ``text_encoder/`` + ``tokenizer/`` (CLIP) and ``text_encoder_2/`` + ``tokenizer_2/``
        (T5) from a local diffusers-format folder, e.g. ``black-forest-labs/FLUX.1-dev``."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        config = config or cls.config_class()
        path = Path(path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"{path} is not a diffusers FLUX folder (no transformer/)")
        dtype = config.torch_dtype
        text: dict[str, Any] = {}
        if config.load_text_encoders:
            text = load_text_encoders(
                path,
                dtype,
                {"": (CLIPTokenizer, CLIPTextModel), "_2": (T5TokenizerFast, T5EncoderModel)},
            )
        return cls(
            transformer=FluxTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            ),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
            config=config,
            **text,
        )

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts → ``prompt_embeds`` ``[N, S, D_t5]`` (T5 last hidden state,
        ``S = max_sequence_length``) and ``pooled_prompt_embeds`` ``[N, D_clip]`` (CLIP
        pooled output), as ``FluxPipeline.encode_prompt``. Runs on ``text_encoder_device``;
        the result is on ``device``."""
        if condition_images is not None:
            raise ValueError("FLUX is text-to-image; condition_images must be None")
        self._require_text_encoders()
        prompts = list(prompts)
        device = self.config.text_device
        clip_tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        pooled = self.text_encoder(clip_tokens.input_ids.to(device)).pooler_output
        t5_tokens = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.config.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = self.text_encoder_2(t5_tokens.input_ids.to(device))[0]
        return Conditioning(
            {
                "prompt_embeds": embeds.to(self.device),
                "pooled_prompt_embeds": pooled.to(self.device),
            }
        )

    # ----------------------------------------------------------------- sampling
    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted ``sigmas`` ``[n + 1]`` from 1 to 0 and ``timesteps = 1000·sigmas[:-1]``."""
        sigmas = flow_sigmas(num_steps or self.config.num_steps, shift=self.effective_shift)
        return self.schedule_from_sigmas(sigmas)

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """The transformer's velocity ``v = ε − x0`` for packed ``latents`` ``[B, L, 4C]`` at
        ``timestep`` (0..1000 scale, a scalar or one per row), with the guidance embedding;
        differentiable."""
        img_ids = latent_image_ids(self.latent_height, self.latent_width)
        return self._transformer_forward(latents, img_ids, timestep, cond.tensors)

    def _transformer_forward(
        self,
        hidden_states: torch.Tensor,
        img_ids: torch.Tensor,
        timestep: torch.Tensor | float,
        tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One transformer forward on packed tokens ``hidden_states`` ``[B, L', 4C]`` with RoPE
        ids ``img_ids`` ``[L', 3]`` and the text conditioning ``tensors``; returns the output
        for all ``L'`` tokens in the model dtype (FLUX.1-Kontext appends image tokens)."""
        dtype = module_dtype(self.transformer)
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=self.device, dtype=torch.float32)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full(
                (batch,), self.config.guidance_scale, device=self.device, dtype=torch.float32
            )
        embeds = tensors["prompt_embeds"].to(self.device, dtype)
        with self.config.autocast():
            return self.transformer(
                hidden_states=hidden_states.to(self.device, dtype),
                timestep=(t.expand(batch) / 1000).to(dtype),
                guidance=guidance,
                pooled_projections=tensors["pooled_prompt_embeds"].to(self.device, dtype),
                encoder_hidden_states=embeds,
                txt_ids=text_ids(embeds.shape[1]).to(self.device),
                img_ids=img_ids.to(self.device),
                return_dict=False,
            )[0]

    # ----------------------------------------------------------------- decoding
    def _decode_chunk(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed latents ``[n, L, 4C]`` unpacked and decoded."""
        latents = unpack_latents(packed, self.latent_height, self.latent_width)
        return vae_decode(self.vae, latents, self.config.decode_device)
