"""Stable Diffusion 3 / 3.5 (rectified flow, ``SD3Transformer2DModel``) sampled with the flow
SDE, as a Policy.

The sampling loop is diffusers' ``StableDiffusion3Pipeline`` (diffusers 0.42) cut down to
what GRPO needs, as Flow-GRPO's ``sd3_pipeline_with_logprob`` does (github.com/yifan123/
flow_grpo, ``flow_grpo/diffusers_patch``):

- three text encoders: CLIP-L and CLIP-G (penultimate hidden states side by side, zero-padded
  to the T5 width, then the T5 sequence appended; their projected pooled outputs side by
  side as the pooled embedding), as ``StableDiffusion3Pipeline.encode_prompt``;
- classifier-free guidance ``v = v_u + w·(v_c − v_u)`` against a negative prompt (``""`` in
  Flow-GRPO and diffusers), as one batched forward with the negative rows first;
- unpacked latents ``[B, 16, H/8, W/8]`` (the transformer patches 2×2 itself), the VAE's
  ``scaling_factor``/``shift_factor``;
- the schedule of the checkpoint's ``FlowMatchEulerDiscreteScheduler`` with its static
  ``shift`` (3.0 for SD3.5), exactly as the pipeline sets it when given no sigmas (see
  :func:`sd3_sigmas`; Flow-GRPO samples with that same schedule);
- each step taken by the flow SDE of the shared base (:class:`FlowTransformerPolicy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dancegrpo_trainer.core.schedules import shift_sigmas
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow_transformer import (
    FlowTransformerConfig,
    FlowTransformerPolicy,
    P,
)
from dancegrpo_trainer.policies.guidance import guided_velocity, negative, repeated_negatives
from dancegrpo_trainer.policies.runtime import (
    freeze,
    load_text_encoders,
    module_dtype,
    place,
    vae_decode,
)

#: LoRA targets of Flow-GRPO's SD3.5 runs (``scripts/train_sd3.py``): the joint attention's
#: projections of both streams (``attn2`` of SD3.5's dual-attention blocks is not targeted).
SD3_LORA_TARGET_MODULES = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
#: The text-conditioning keys; CFG adds ``negative_<key>`` for each.
TEXT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def sd3_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas ``[n + 1]`` of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)
    .set_timesteps(n)`` without custom sigmas (``StableDiffusion3Pipeline``'s default; Flow-GRPO
    samples SD3.5 with it).

    The scheduler's training grid ends at ``σ_min = shift(1/T)``; ``set_timesteps`` spaces
    ``n`` values linearly from 1 to ``σ_min`` and shifts them again (so the last nonzero
    sigma is ``shift(shift(1/T))``), then appends 0. ``σ_min`` is computed in float32 as the
    scheduler does, the rest in float64, and the result is float32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid_end = torch.tensor([1.0], dtype=torch.float32) / num_train_timesteps
    sigma_min = float(shift_sigmas(grid_end, shift)[0])
    sigmas = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = sigmas / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


@dataclasses.dataclass
class StableDiffusion3Config(FlowTransformerConfig):
    """Options of :class:`StableDiffusion3Policy` (defaults: Flow-GRPO's SD3.5-Medium runs,
    ``config/grpo.py`` ``geneval_sd3`` / ``general_ocr_sd3`` / ``pickscore_sd3``).

    Attributes:
        resolution: image size in pixels, an int or ``[height, width]`` (multiple of 16:
            VAE 8 × patch 2).
        guidance_scale: classifier-free guidance weight ``w`` (``<= 1`` drops the negative
            pass); Flow-GRPO 4.5 (diffusers' pipeline default 7.0).
        negative_prompt: the unconditional prompt (Flow-GRPO and diffusers: ``""``).
        num_steps: sampling steps (Flow-GRPO trains with 10 and evaluates with 40).
        eta, noise_schedule: the flow SDE's noise (Flow-GRPO: ``noise_level`` 0.7 with
            ``g = η·√(σ/(1−σ))``, i.e. ``noise_schedule: flow_grpo``).
        shift: the scheduler's static shift (SD3/SD3.5 checkpoints: 3.0).
        max_sequence_length: T5 tokens (Flow-GRPO 128; diffusers' default 256; ≤ 512).
    """

    resolution: int | list[int] = 512
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    num_steps: int = 10
    eta: float = 0.7
    noise_schedule: str = "flow_grpo"
    shift: float = 3.0
    max_sequence_length: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in [1, 512], got {self.max_sequence_length}"
            )

    @property
    def do_cfg(self) -> bool:
        """Whether each step also runs the negative prompt (``guidance_scale > 1``)."""
        return self.guidance_scale > 1.0


class StableDiffusion3Policy(FlowTransformerPolicy):
    """SD3/SD3.5 transformer + flow SDE behind the :class:`Policy` interface.

    Latents are float32 ``[B, C, h, w]`` (``C = 16``, ``h = H/8``, ``w = W/8`` for the
    released models) on ``config.device``. Conditioning tensors: ``prompt_embeds``
    ``[B, 77 + S, D_t5]`` (CLIP-L ‖ CLIP-G penultimate states zero-padded to the T5 width,
    then T5), ``pooled_prompt_embeds`` ``[B, D_l + D_g]`` and, with CFG, their
    ``negative_*`` twins (the negative prompt repeated per row).
    """

    modality: ClassVar = "image"
    config_class: ClassVar = StableDiffusion3Config
    config: StableDiffusion3Config
    default_lora_targets: ClassVar = SD3_LORA_TARGET_MODULES
    #: The joint (MMDiT) transformer blocks.
    fsdp_blocks: ClassVar = ("diffusers.models.attention:JointTransformerBlock",)

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        config: StableDiffusion3Config,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any | None = None,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3: Any | None = None,
    ) -> None:
        """Places the components per ``config`` and freezes the text encoders and VAE.

        Args:
            transformer: a diffusers ``SD3Transformer2DModel`` (the trainable module).
            vae: a diffusers ``AutoencoderKL`` (SD3's, 16 latent channels).
            config: the policy options.
            text_encoder, tokenizer: CLIP-L (``CLIPTextModelWithProjection``) and tokenizer.
            text_encoder_2, tokenizer_2: CLIP-G (``CLIPTextModelWithProjection``) and tokenizer.
            text_encoder_3, tokenizer_3: T5 encoder and tokenizer. All six ``None`` when
                prompts come from an embedding cache.
        """
        if not isinstance(config, StableDiffusion3Config):
            raise TypeError(f"config must be a StableDiffusion3Config, got {type(config).__name__}")
        if (text_encoder_3 is None) != (tokenizer_3 is None) or (
            (text_encoder_3 is None) != (text_encoder is None)
        ):
            raise ValueError(
                "the three text encoders and their tokenizers must all be given (or none)"
            )
        super().__init__(
            transformer=transformer,
            vae=vae,
            config=config,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = None
        if text_encoder_3 is not None:
            self.text_encoder_3 = place(text_encoder_3, config.text_device, config.torch_dtype)
            freeze(self.text_encoder_3)
        self._init_geometry()

    def _init_geometry(self) -> None:
        # Read model configs now: the trainer may later swap in a DDP/FSDP-wrapped module.
        tr_cfg = self.transformer.config
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._set_image_size(self.vae_scale_factor, self.vae_scale_factor * int(tr_cfg.patch_size))
        self.latent_channels = int(tr_cfg.in_channels)
        self.t5_width = int(tr_cfg.joint_attention_dim)

    pipeline_modules: ClassVar[dict[str, str]] = {
        **FlowTransformerPolicy.pipeline_modules,
        "text_encoder_3": "text",
    }
    pipeline_extras: ClassVar[tuple[str, ...]] = (
        *FlowTransformerPolicy.pipeline_extras,
        "tokenizer_3",
    )

    @classmethod
    def from_pretrained(
        cls: type[P], path: str | Path, config: StableDiffusion3Config | None = None
    ) -> P:
        """Loads ``transformer/``, ``vae/`` and (unless ``load_text_encoders`` is off)
        ``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` + ``tokenizer_2/``
        (CLIP-G) and ``text_encoder_3/`` + ``tokenizer_3/`` (T5) from a local diffusers-format
        folder, e.g. ``stabilityai/stable-diffusion-3.5-medium``."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        config = config or cls.config_class()
        path = Path(path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(
                f"{path} is not a diffusers Stable Diffusion 3 folder (no transformer/)"
            )
        dtype = config.torch_dtype
        text = _load_text_encoders(path, dtype) if config.load_text_encoders else {}
        return cls(
            transformer=SD3Transformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            ),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
            config=config,
            **text,
        )

    def release_text_encoders(self) -> None:
        """Drops the three tokenizers and text encoders (after caching embeddings)."""
        super().release_text_encoders()
        self.text_encoder_3 = self.tokenizer_3 = None

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as ``StableDiffusion3Pipeline.encode_prompt`` (``clip_skip``
        unset, the same prompt for all three encoders): ``prompt_embeds`` ``[N, 77 + S, D]``
        and ``pooled_prompt_embeds`` ``[N, D_l + D_g]``, plus (CFG) the negative prompt's
        ``negative_*`` repeated ``N`` times. Runs on ``text_encoder_device``; the result is
        on ``device``."""
        if condition_images is not None:
            raise ValueError("Stable Diffusion 3 is text-to-image; condition_images must be None")
        self._require_text_encoders()
        prompts = list(prompts)
        tensors = self._encode_text(prompts)
        if self.config.do_cfg:
            negative_prompt = self._encode_text([self.config.negative_prompt])
            tensors.update(repeated_negatives(negative_prompt, len(prompts)))
        return Conditioning({k: v.to(self.device) for k, v in tensors.items()})

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts → ``prompt_embeds [N, 77 + S, D_t5]`` and ``pooled_prompt_embeds
        [N, D_l + D_g]``."""
        clip_l, pooled_l = self._clip_embeds(self.tokenizer, self.text_encoder, prompts)
        clip_g, pooled_g = self._clip_embeds(self.tokenizer_2, self.text_encoder_2, prompts)
        t5 = self._t5_embeds(prompts)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(
                f"CLIP hidden states ({clip.shape[-1]}) are wider than the T5 embeddings "
                f"({t5.shape[-1]}): not a Stable Diffusion 3 text-encoder set"
            )
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat([pooled_l, pooled_g], -1),
        }

    def _clip_embeds(
        self, tokenizer: Any, encoder: nn.Module, prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One CLIP: penultimate hidden state ``[N, 77, D]`` and projected pooled output
        ``[N, D]`` (both tokenizers pad to the first one's ``model_max_length``, as diffusers)."""
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = encoder(tokens.input_ids.to(self.config.text_device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5_embeds(self, prompts: list[str]) -> torch.Tensor:
        """T5 last hidden state ``[N, S, D_t5]`` (``S = max_sequence_length``, padded)."""
        tokens = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.config.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return self.text_encoder_3(tokens.input_ids.to(self.config.text_device))[0]

    # ----------------------------------------------------------------- sampling
    def schedule(self, num_steps: int | None = None) -> Schedule:
        """The pipeline's schedule (:func:`sd3_sigmas`) and ``timesteps = 1000·sigmas[:-1]``."""
        sigmas = sd3_sigmas(num_steps or self.config.num_steps, self.config.shift)
        return self.schedule_from_sigmas(sigmas)

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """Velocity for ``latents`` ``[B, C, h, w]`` at ``timestep`` (0..1000 scale, a scalar
        or one per row ``[B]``): the transformer on the prompt rows and, with CFG, on the
        negative rows in the same forward, combined ``v_u + w·(v_c − v_u)`` in float32;
        differentiable."""
        tensors = cond.tensors
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, device=self.device, dtype=torch.float32).expand(batch)
        text = {key: tensors[key] for key in TEXT_KEYS}
        if not self.config.do_cfg:
            return self._transformer_forward(latents, t, text)
        text = {
            key: torch.cat([negative(tensors, key, "guidance_scale"), tensors[key]])
            for key in TEXT_KEYS
        }
        out = self._transformer_forward(torch.cat([latents, latents]), t.repeat(2), text)
        uncond, cond_v = out.float().chunk(2)
        return guided_velocity(cond_v, uncond, self.config.guidance_scale)

    def _transformer_forward(
        self, hidden_states: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One transformer forward (``t`` float32 ``[B]``); output in the model dtype."""
        dtype = module_dtype(self.transformer)
        with self.config.autocast():
            return self.transformer(
                hidden_states=hidden_states.to(self.device, dtype),
                timestep=t,
                encoder_hidden_states=text["prompt_embeds"].to(self.device, dtype),
                pooled_projections=text["pooled_prompt_embeds"].to(self.device, dtype),
                return_dict=False,
            )[0]

    # ----------------------------------------------------------------- decoding
    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents, self.config.decode_device)


def _load_text_encoders(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """CLIP-L, CLIP-G (``CLIPTextModelWithProjection``) and T5 (``T5EncoderModel``) with their
    tokenizers from a diffusers Stable Diffusion 3 folder."""
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    clip = (CLIPTokenizer, CLIPTextModelWithProjection)
    return load_text_encoders(
        path, dtype, {"": clip, "_2": clip, "_3": (T5TokenizerFast, T5EncoderModel)}
    )
