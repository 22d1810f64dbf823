"""Stable Diffusion 1.x / 2.x (ε- or v-prediction UNet) sampled with DDIM-η, as a Policy.

The sampling loop is diffusers' ``StableDiffusionPipeline`` with a ``DDIMScheduler``, cut
down to what GRPO needs: classifier-free guidance ``ε̂ = ε_u + w·(ε_c − ε_u)`` (unconditional
row first, one batched UNet call), and each step taken by :func:`ddim_step`, which returns
the log-probability of the step (DDPO / DanceGRPO).
"""

from __future__ import annotations

import copy as _copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.core.ddim import ddim_step
from dancegrpo_trainer.core.samplers import DDIM_SAMPLER
from dancegrpo_trainer.core.step_output import StepOutput
from dancegrpo_trainer.policies.base import Conditioning, Policy, Schedule, StepIndex
from dancegrpo_trainer.policies.runtime import (
    RuntimeConfig,
    decode_to_uint8,
    freeze,
    module_dtype,
    parse_resolution,
    place,
    preserved_module_state,
    shared_or_copied,
    transformers_dtype_kwargs,
    vae_decode,
)

#: LoRA targets of diffusers' SD LoRA training scripts: the attention projections.
SD_LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclasses.dataclass
class StableDiffusionConfig(RuntimeConfig):
    """Options of :class:`StableDiffusionPolicy` (defaults: the DanceGRPO paper's SD run).

    Attributes:
        resolution: image size in pixels, an int or ``[height, width]`` (multiple of 8).
        guidance_scale: classifier-free guidance weight ``w`` (``<= 1`` disables CFG and
            the unconditional UNet pass).
        negative_prompt: the unconditional prompt for CFG (``""`` as in diffusers).
        num_steps: default number of DDIM steps.
        eta: default DDIM η (1.0: DDPM-like variance, as DDPO/DanceGRPO).
    """

    resolution: int | list[int] = 512
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    num_steps: int = 50
    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_resolution(self.resolution, 8)
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] for DDIM, got {self.eta}")

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


class StableDiffusionPolicy(Policy):
    """SD 1.x/2.x UNet + DDIM-η behind the :class:`Policy` interface.

    Latents are float32 ``[B, 4, H/8, W/8]`` on ``config.device``; the UNet runs in its
    weight dtype (under autocast on CUDA). Conditioning tensors: ``prompt_embeds``
    ``[B, 77, D]`` and, with CFG, ``negative_prompt_embeds`` ``[B, 77, D]``.

    Build from a local diffusers folder with :meth:`from_pretrained`, or from component
    objects (tests) with the constructor.
    """

    sampler: ClassVar = "ddim"
    modality: ClassVar = "image"

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        config: StableDiffusionConfig,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        """Places the components per ``config`` and freezes the text encoder and VAE.

        Args:
            unet: a diffusers ``UNet2DConditionModel`` (the trainable module).
            vae: a diffusers ``AutoencoderKL``.
            scheduler: any diffusers scheduler; its config is re-read as a ``DDIMScheduler``.
            config: the policy options.
            text_encoder, tokenizer: a ``CLIPTextModel`` and its tokenizer; both ``None``
                when prompts come from an embedding cache.
        """
        from diffusers import DDIMScheduler

        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer must be given together (or neither)")
        self.config = config
        self.device = config.torch_device
        dtype = config.torch_dtype
        self.unet = place(unet, self.device, dtype)
        self.vae = place(vae, config.decode_device, dtype)
        freeze(self.vae)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if text_encoder is not None:
            self.text_encoder = place(text_encoder, config.text_device, dtype)
            freeze(self.text_encoder)
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # Read model config now: the trainer may later swap in a DDP/FSDP-wrapped module.
        self.latent_channels = int(self.unet.config.in_channels)
        self.height, self.width = parse_resolution(config.resolution, self.vae_scale_factor)

    def at_resolution(self, height: int, width: int) -> StableDiffusionPolicy:
        """A shallow copy (same modules) sampling ``height × width`` pixels (multiples of
        the VAE's 8)."""
        if (height, width) == (self.height, self.width):
            return self
        other = _copy.copy(self)
        other.config = dataclasses.replace(self.config, resolution=[height, width])
        other.height, other.width = parse_resolution(other.config.resolution, self.vae_scale_factor)
        return other

    @classmethod
    def from_pipeline(
        cls, pipe: Any, config: StableDiffusionConfig | None = None, *, copy: bool = False
    ) -> StableDiffusionPolicy:
        """Wraps the components of a loaded diffusers ``StableDiffusionPipeline``.

        Shared (default): the UNet, VAE, text encoder and tokenizer are the pipeline's own
        objects, and nothing about them is changed (not moved, cast or frozen; the
        pipeline must already sit on ``config``'s devices in its ``dtype``, else this
        raises naming the module). The scheduler is always a new ``DDIMScheduler`` built
        from the pipeline's scheduler config (DDIM-η needs DDIM's posterior; the
        pipeline's scheduler is not touched). ``copy=True``: deep copies of the modules
        are placed, cast and frozen; the pipeline is left as it was. A trainer training the
        shared UNet changes it (float32 master weights, LoRA, train/eval mode).
        """
        config = config or StableDiffusionConfig()
        parts = shared_or_copied(
            {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder},
            {
                "unet": config.torch_device,
                "vae": config.decode_device,
                "text_encoder": config.text_device,
            },
            config.torch_dtype,
            copy=copy,
        )
        with preserved_module_state([] if copy else list(parts.values())):
            return cls(**parts, scheduler=pipe.scheduler, config=config, tokenizer=pipe.tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: StableDiffusionConfig | None = None
    ) -> StableDiffusionPolicy:
        """Loads ``unet/``, ``vae/``, ``scheduler/`` and (unless ``load_text_encoders`` is
        off) ``text_encoder/`` + ``tokenizer/`` from a local diffusers-format folder, e.g. a
        download of ``runwayml/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-2-1``.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        config = config or StableDiffusionConfig()
        path = Path(path)
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path} is not a diffusers Stable Diffusion folder (no unet/)")
        dtype = config.torch_dtype
        text_encoder = tokenizer = None
        if config.load_text_encoders:
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", **transformers_dtype_kwargs(dtype)
            )
        return cls(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
            config=config,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def _encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden state ``[N, 77, D]`` on ``self.device`` (diffusers' encode_prompt)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                "this policy was built without text encoders (load_text_encoders=False); "
                "look prompts up in an EmbeddingCache instead"
            )
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.config.text_device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(self.device)

    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts → ``prompt_embeds`` ``[N, 77, D]`` (+ ``negative_prompt_embeds``
        ``[N, 77, D]`` with CFG). Runs on ``text_encoder_device``; result on ``device``."""
        if condition_images is not None:
            raise ValueError("Stable Diffusion is text-to-image; condition_images must be None")
        tensors = {"prompt_embeds": self._encode_text(prompts)}
        if self.config.do_cfg:
            negative = self._encode_text([self.config.negative_prompt])
            tensors["negative_prompt_embeds"] = negative.expand(len(prompts), -1, -1).clone()
        return Conditioning(tensors)

    # ----------------------------------------------------------------- sampling
    def schedule(self, num_steps: int | None = None) -> Schedule:
        """DDIM timesteps ``[num_steps]`` (descending, diffusers spacing; ``sigmas`` is None)."""
        num_steps = num_steps or self.config.num_steps
        self.scheduler.set_timesteps(num_steps)
        return Schedule(timesteps=self.scheduler.timesteps.clone())

    def _scheduler_for(self, schedule: Schedule) -> Any:
        # ddim_step reads num_inference_steps for the previous timestep: keep it in sync with
        # the schedule being driven (a caller may build schedules of different lengths).
        if self.scheduler.num_inference_steps != schedule.num_steps:
            self.scheduler.set_timesteps(schedule.num_steps)
        return self.scheduler

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent."""
        return (
            self.latent_channels,
            self.height // self.vae_scale_factor,
            self.width // self.vae_scale_factor,
        )

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x_T ~ N(0, I)·init_noise_sigma``, float32 ``[B, 4, H/8, W/8]`` on ``device``.

        Drawn on the generator's device (then moved), as diffusers' ``randn_tensor``.
        """
        draw_device = generator.device if generator is not None else self.device
        noise = torch.randn(
            (batch_size, *self.latent_shape), generator=generator, device=draw_device
        )
        return noise.to(self.device) * self.scheduler.init_noise_sigma

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | int, cond: Conditioning
    ) -> torch.Tensor:
        """The guided UNet output (ε or v per the scheduler's ``prediction_type``).

        Args:
            latents: ``[B, 4, h, w]``.
            timestep: the DDIM timestep (0..999).
            cond: ``B`` rows with ``prompt_embeds`` (and ``negative_prompt_embeds`` if CFG).

        Returns:
            ``[B, 4, h, w]`` in the UNet's output dtype; differentiable w.r.t. the UNet.
        """
        dtype = module_dtype(self.unet)
        embeds = cond.tensors["prompt_embeds"].to(self.device, dtype)
        x = latents.to(self.device, dtype)
        t = torch.as_tensor(timestep, device=self.device)
        if self.config.do_cfg:
            if "negative_prompt_embeds" not in cond.tensors:
                raise KeyError(
                    "guidance_scale > 1 needs 'negative_prompt_embeds' in the conditioning "
                    "(encode prompts with the same guidance_scale)"
                )
            negative = cond.tensors["negative_prompt_embeds"].to(self.device, dtype)
            x = torch.cat([x, x])
            embeds = torch.cat([negative, embeds])
            if t.ndim == 1:  # per-row timesteps: the negative rows come first
                t = torch.cat([t, t])
        x = self.scheduler.scale_model_input(x, t)
        with self.config.autocast():
            out = self.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if self.config.do_cfg:
            uncond, text = out.chunk(2)
            out = uncond + self.config.guidance_scale * (text - uncond)
        return out

    def denoise_step(
        self,
        latents: torch.Tensor,
        step_index: StepIndex,
        schedule: Schedule,
        cond: Conditioning,
        *,
        eta: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
    ) -> StepOutput:
        """Guided UNet prediction at ``schedule.timesteps[step_index]`` (an int, or an int64
        ``[B]`` tensor of per-row steps), then one DDIM-η step (``prev_sample`` given: its
        log-probability is evaluated instead of sampling; ``noise`` given: used as the
        step noise). ``sampler`` must be ``None`` or ``"ddim"``: the flow samplers
        (``dancegrpo``, ``flow_grpo``, ``cps``) need a rectified-flow model."""
        if sampler not in (None, DDIM_SAMPLER):
            raise ValueError(
                f"sampler {sampler!r}: Stable Diffusion samples with DDIM-eta only ('ddim'); "
                "dancegrpo/flow_grpo/cps are rectified-flow samplers"
            )
        if isinstance(step_index, int):
            timestep = schedule.timesteps[step_index]
        else:
            idx = torch.as_tensor(step_index, dtype=torch.long)
            timestep = schedule.timesteps[idx.to(schedule.timesteps.device)]
        noise_pred = self.predict(latents, timestep, cond)
        return ddim_step(
            self._scheduler_for(schedule),
            noise_pred,
            timestep,
            latents,
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
        )

    # ----------------------------------------------------------------- decoding
    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents, self.config.decode_device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents ``[N, 4, h, w]`` → ``uint8`` ``[N, H, W, 3]`` (CPU), decoded on
        ``vae_device`` ``vae_decode_chunk_size`` samples at a time."""
        return decode_to_uint8(self._decode_chunk, latents, self.config.vae_decode_chunk_size)

    # ----------------------------------------------------------------- training
    def trainable_module(self) -> nn.Module:
        return self.unet

    def fsdp_block_types(self) -> tuple[type[nn.Module], ...]:
        """The classes of the UNet's down, mid and up blocks (untested on the real model)."""
        blocks = [*self.unet.down_blocks, *self.unet.up_blocks, self.unet.mid_block]
        return tuple({type(b) for b in blocks if b is not None})

    @property
    def lora_target_modules(self) -> list[str]:
        return list(SD_LORA_TARGET_MODULES)

    def release_text_encoders(self) -> None:
        """Drops the tokenizer and text encoder (after caching embeddings) to free memory."""
        self.text_encoder = None
        self.tokenizer = None
