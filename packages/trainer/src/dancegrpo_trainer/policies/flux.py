"""FLUX.1 (rectified flow, ``FluxTransformer2DModel``) sampled with the flow SDE, as a Policy.

The sampling loop is diffusers' ``FluxPipeline`` cut down to what GRPO needs: packed 2×2
latents with RoPE image/text ids, T5 sequence embeddings + CLIP pooled embedding, the
distilled guidance *embedding* (no second, unconditional pass), a shifted sigma schedule
(static ``shift`` as DanceGRPO, or diffusers' resolution-dependent dynamic shift), and each
step taken by :func:`flow_sde_step`, which returns the step's log-probability.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.core.schedules import flow_sigmas, flow_timesteps
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow_transformer import (
    FlowTransformerConfig,
    FlowTransformerPolicy,
    P,
)
from dancegrpo_trainer.policies.flux_latents import (
    latent_image_ids,
    pack_latents,
    text_ids,
    unpack_latents,
)
from dancegrpo_trainer.policies.runtime import (
    decode_to_uint8,
    module_dtype,
    parse_resolution,
    transformers_dtype_kwargs,
    vae_decode,
)

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
class FluxConfig(FlowTransformerConfig):
    """Options of :class:`FluxPolicy` (defaults: the DanceGRPO paper's FLUX.1-dev run).

    Attributes:
        resolution: image size in pixels, an int or ``[height, width]`` (multiple of 16).
        guidance_scale: value fed to the guidance embedding (FLUX.1-dev: 3.5).
        num_steps, eta, noise_schedule: see :class:`FlowTransformerConfig`.
        shift: static timestep shift ``s`` (``σ' = sσ/(1+(s−1)σ)``) when not ``dynamic_shift``.
        dynamic_shift: use diffusers' resolution-dependent shift ``s = exp(μ(seq_len))``
            with the four parameters below (FLUX.1-dev's scheduler config values).
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: ``μ``'s line.
        max_sequence_length: T5 tokens (512 for FLUX.1-dev; fewer saves memory).
    """

    resolution: int | list[int] = 720
    guidance_scale: float = 3.5
    eta: float = 0.3
    shift: float = 3.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_resolution(self.resolution, 16)
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError("max_image_seq_len must be greater than base_image_seq_len")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in [1, 512], got {self.max_sequence_length}"
            )


class FluxPolicy(FlowTransformerPolicy):
    """FLUX.1 transformer + flow SDE behind the :class:`Policy` interface.

    Latents are packed float32 ``[B, L, 4C]`` (``L = (H/16)·(W/16)``, ``C = 16`` for FLUX.1)
    on ``config.device``. Conditioning tensors: ``prompt_embeds`` ``[B, S, 4096]`` (T5) and
    ``pooled_prompt_embeds`` ``[B, 768]`` (CLIP).
    """

    modality: ClassVar = "image"
    config_class: ClassVar = FluxConfig
    config: FluxConfig

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
        self.height, self.width = parse_resolution(
            self.config.resolution, self.vae_scale_factor * 2
        )
        self.latent_height = self.height // self.vae_scale_factor
        self.latent_width = self.width // self.vae_scale_factor
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
            hf_dtype = transformers_dtype_kwargs(dtype)
            text = {
                "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                "text_encoder": CLIPTextModel.from_pretrained(
                    path, subfolder="text_encoder", **hf_dtype
                ),
                "tokenizer_2": T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2"),
                "text_encoder_2": T5EncoderModel.from_pretrained(
                    path, subfolder="text_encoder_2", **hf_dtype
                ),
            }
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
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError(
                "this policy was built without text encoders (load_text_encoders=False); "
                "look prompts up in an EmbeddingCache instead"
            )
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

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted ``sigmas`` ``[n + 1]`` from 1 to 0 and ``timesteps = 1000·sigmas[:-1]``."""
        sigmas = flow_sigmas(num_steps or self.config.num_steps, shift=self.effective_shift)
        return Schedule(timesteps=flow_timesteps(sigmas), sigmas=sigmas)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x_1 ~ N(0, I)`` drawn as ``[B, C, h, w]`` (on the generator's device, as
        diffusers' ``randn_tensor``) and packed → float32 ``[B, L, 4C]`` on ``device``."""
        draw_device = generator.device if generator is not None else self.device
        shape = (batch_size, self.latent_channels, self.latent_height, self.latent_width)
        noise = torch.randn(shape, generator=generator, device=draw_device)
        return pack_latents(noise).to(self.device)

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
        latents = unpack_latents(packed, self.latent_height, self.latent_width)
        return vae_decode(self.vae, latents, self.config.decode_device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed final latents ``[N, L, 4C]`` → ``uint8`` ``[N, H, W, 3]`` (CPU), decoded on
        ``vae_device`` ``vae_decode_chunk_size`` samples at a time."""
        return decode_to_uint8(self._decode_chunk, latents, self.config.vae_decode_chunk_size)

    # ----------------------------------------------------------------- training
    def fsdp_block_types(self) -> tuple[type[nn.Module], ...]:
        """The double- and single-stream transformer blocks (untested on the real model)."""
        from diffusers.models.transformers.transformer_flux import (
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        return (FluxTransformerBlock, FluxSingleTransformerBlock)

    @property
    def lora_target_modules(self) -> list[str]:
        return list(FLUX_LORA_TARGET_MODULES)
