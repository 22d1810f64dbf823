"""What the diffusers rectified-flow transformer adapters share (FLUX, HunyuanVideo,
SkyReels, SD3, FLUX.1-Kontext, ...).

They sample with the flow SDE (:func:`flow_sde_step`) on a shifted sigma schedule, train
only their ``transformer``, freeze a VAE and two text encoders that an embedding cache may
replace. Here, once: placing and freezing the components, ``from_pipeline``, the pixel and
latent sizes, initial noise, chunked decoding (each adapter's ``_decode_chunk``), the FSDP
units and LoRA targets its class attributes name, and merging conditioning images with
text. The model-specific parts (prompt encoding, latent layout, ``predict``, a chunk's
decoding) stay in each adapter.
"""

from __future__ import annotations

import abc
import copy as _copy
import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.flow import FlowPolicy
from dancegrpo_trainer.policies.runtime import (
    RuntimeConfig,
    decode_to_uint8,
    freeze,
    parse_resolution,
    place,
    preserved_module_state,
    shared_or_copied,
)

NOISE_SCHEDULES = ("dance", "flow_grpo")

P = TypeVar("P", bound="FlowTransformerPolicy")


@dataclasses.dataclass
class FlowTransformerConfig(RuntimeConfig):
    """Flow-SDE sampling options of every rectified-flow transformer adapter.

    Attributes:
        resolution: output size in pixels, an int or ``[height, width]``; a multiple of 16
            (each adapter checks its own model's factor when it loads).
        num_steps: default number of sampling steps.
        eta: default SDE noise scale η (0 is the Euler ODE sampler).
        noise_schedule: the sampler ``denoise_step`` uses when given none: ``"dance"``
            (DanceGRPO, ``g = η``) or ``"flow_grpo"`` (see ``flow_sde_step``). The trainer
            always passes ``sampling.sampler``; in a training config this key is an error
            (``model.options.noise_schedule``: set ``sampling.sampler``).
        shift: static timestep shift ``s`` (``σ' = sσ/(1+(s−1)σ)``).
    """

    resolution: int | list[int] = 512
    num_steps: int = 16
    eta: float = 0.3
    noise_schedule: str = "dance"
    shift: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_resolution(self.resolution, 16)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(
                f"noise_schedule must be 'dance' or 'flow_grpo', got {self.noise_schedule!r}"
            )
        # None: an adapter that reads the shift from its checkpoint (Wan).
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")


class FlowTransformerPolicy(FlowPolicy):
    """A trainable diffusers ``transformer`` predicting the flow velocity, a frozen VAE and
    two frozen text encoders (both pairs ``None`` when prompts come from an embedding cache).
    """

    sampler: ClassVar = "flow_sde"
    #: The adapter's options class: the config ``from_pipeline``/``from_pretrained`` use
    #: when given none.
    config_class: ClassVar[type[FlowTransformerConfig]] = FlowTransformerConfig
    config: FlowTransformerConfig

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        config: FlowTransformerConfig,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any | None = None,
    ) -> None:
        """Places the components per ``config`` and freezes the text encoders and VAE."""
        text_parts = (text_encoder, tokenizer, text_encoder_2, tokenizer_2)
        if any(p is None for p in text_parts) and any(p is not None for p in text_parts):
            raise ValueError(
                "text_encoder, tokenizer, text_encoder_2 and tokenizer_2 must all be given "
                "(or none of them)"
            )
        self.config = config
        self.device = config.torch_device
        dtype = config.torch_dtype
        self.transformer = place(transformer, self.device, dtype)
        self.vae = place(vae, config.decode_device, dtype)
        freeze(self.vae)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = self.text_encoder_2 = None
        if text_encoder is not None and text_encoder_2 is not None:
            self.text_encoder = place(text_encoder, config.text_device, dtype)
            self.text_encoder_2 = place(text_encoder_2, config.text_device, dtype)
            freeze(self.text_encoder)
            freeze(self.text_encoder_2)

    #: The pipeline's modules ``from_pipeline`` hands to the constructor, each with where
    #: the config places it: ``"model"`` (``device``), ``"decode"`` (``vae_device``) or
    #: ``"text"`` (``text_encoder_device``). Adapters with other components (a third text
    #: encoder, an image encoder, a second expert) extend it.
    pipeline_modules: ClassVar[dict[str, str]] = {
        "transformer": "model",
        "vae": "decode",
        "text_encoder": "text",
        "text_encoder_2": "text",
    }
    #: The pipeline's tensor-free components passed along as they are (tokenizers,
    #: processors): always shared.
    pipeline_extras: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")

    @classmethod
    def pipeline_options(cls, pipe: Any) -> dict[str, Any]:
        """Constructor keywords ``from_pipeline`` reads from the pipeline itself rather than
        from its modules (Wan: ``boundary_ratio``, ``expand_timesteps``, the scheduler's
        shift). Default: none."""
        return {}

    @classmethod
    def from_pipeline(
        cls: type[P],
        pipe: Any,
        config: FlowTransformerConfig | None = None,
        *,
        copy: bool = False,
    ) -> P:
        """Wraps the components of a loaded diffusers pipeline of this model (the modules
        named in ``pipeline_modules``, the tokenizers/processors in ``pipeline_extras`` and
        the settings :meth:`pipeline_options` reads).

        Shared (default): the policy holds the pipeline's own modules, no copy, and
        changes nothing about them: nothing is moved, cast or frozen (``requires_grad``
        flags and train/eval modes stay as they were; the VAE and text encoders run under
        ``torch.no_grad``). So the pipeline must already sit where ``config`` says
        (``device`` / ``vae_device`` / ``text_encoder_device``, in ``dtype``): a mismatch
        raises naming the module. What *uses* the policy may still change the shared
        transformer: the :class:`~dancegrpo_trainer.trainer.Trainer` trains it (float32
        master weights, LoRA adapters injected in place, train/eval mode), and
        HunyuanVideo's ``vae_tiling`` switches the shared VAE's tiling on.

        ``copy=True``: deep copies of every module are placed, cast and frozen as the
        constructor does; the pipeline is left exactly as it was. Tokenizers and
        processors are always shared (they hold no tensors).
        """
        config = config or cls.config_class()
        where = {
            "model": config.torch_device,
            "decode": config.decode_device,
            "text": config.text_device,
        }
        parts = shared_or_copied(
            {name: getattr(pipe, name, None) for name in cls.pipeline_modules},
            {name: where[kind] for name, kind in cls.pipeline_modules.items()},
            config.torch_dtype,
            copy=copy,
        )
        extras = {name: getattr(pipe, name, None) for name in cls.pipeline_extras}
        modules = [] if copy else list(parts.values())
        with preserved_module_state(modules):
            return cls(**parts, **extras, **cls.pipeline_options(pipe), config=config)

    @property
    def schedule_shift(self) -> float:
        return self.config.shift

    @property
    def default_sampler(self) -> str:
        """``config.noise_schedule`` as a sampler name (``dance`` → ``dancegrpo``)."""
        return "dancegrpo" if self.config.noise_schedule == "dance" else "flow_grpo"

    @abc.abstractmethod
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The transformer's velocity for ``latents`` at ``timestep`` (0..1000 scale, a
        0-dim or per-row ``[B]`` tensor; float32)."""

    # ----------------------------------------------------------------- geometry
    def _init_geometry(self) -> None:
        """Pixel and latent sizes from ``config.resolution`` (each adapter's own, with
        :meth:`_set_image_size` and, for video, :meth:`_set_frame_count`)."""
        raise NotImplementedError(f"{type(self).__name__} does not derive its geometry")

    def _set_image_size(self, scale_factor: int, multiple: int) -> None:
        """``height`` / ``width`` from ``config.resolution`` (multiples of ``multiple``, the
        pixels of one transformer patch) and ``latent_height`` / ``latent_width`` (the pixels
        divided by the VAE's ``scale_factor``)."""
        self.height, self.width = parse_resolution(self.config.resolution, multiple)
        self.latent_height = self.height // scale_factor
        self.latent_width = self.width // scale_factor

    def _set_frame_count(self, temporal_ratio: int, patch_t: int) -> None:
        """Video adapters: ``num_frames`` (``config.num_frames``, ``r·k + 1`` for the VAE's
        temporal ratio ``r``) and ``latent_frames`` (a multiple of the transformer's
        temporal patch ``patch_t``)."""
        self.num_frames = self.config.num_frames
        if (self.num_frames - 1) % temporal_ratio:
            raise ValueError(
                f"num_frames must be {temporal_ratio}k + 1 for this VAE, got {self.num_frames}"
            )
        self.latent_frames = latent_num_frames(self.num_frames, temporal_ratio)
        if self.latent_frames % patch_t:
            raise ValueError(
                f"num_frames gives {self.latent_frames} latent frames, not a multiple of the "
                f"transformer's temporal patch size {patch_t}"
            )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latents before any packing: ``(C, h, w)``, or ``(C, T, h, w)`` for
        video."""
        if self.modality == "video":
            return (self.latent_channels, self.latent_frames, self.latent_height, self.latent_width)
        return (self.latent_channels, self.latent_height, self.latent_width)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x_1 ~ N(0, I)`` float32 ``[B, *latent_shape]`` on ``device``, drawn on the
        generator's device (as diffusers' ``randn_tensor``)."""
        draw_device = generator.device if generator is not None else self.device
        noise = torch.randn(
            (batch_size, *self.latent_shape), generator=generator, device=draw_device
        )
        return noise.to(self.device)

    # ----------------------------------------------------------------- conditioning
    def _require_text_encoders(self) -> None:
        """Raises unless the text encoders are loaded (not skipped with
        ``load_text_encoders: false``, nor released after caching)."""
        if self.text_encoder is None:
            raise RuntimeError(
                "this policy was built without text encoders (load_text_encoders=False); "
                "look prompts up in an EmbeddingCache instead"
            )

    def _with_condition_images(
        self, text: Conditioning, condition_images: torch.Tensor | None
    ) -> Conditioning:
        """``text`` (``N`` rows) plus, given ``N`` conditioning images, their
        :meth:`encode_condition_images` part (image-to-video and editing adapters)."""
        if condition_images is None:
            return text
        if len(condition_images) != len(text):
            raise ValueError(f"{len(condition_images)} condition images for {len(text)} prompts")
        return Conditioning(
            {**text.tensors, **self.encode_condition_images(condition_images).tensors}
        )

    # ----------------------------------------------------------------- decoding
    @abc.abstractmethod
    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """A few samples' final latents → images in ``[-1, 1]``, ``[n, 3, H, W]`` (video:
        the frames, ``[n·F, 3, H, W]`` sample-major), on ``vae_device``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents ``[N, ...]`` → ``uint8`` ``[N, H, W, 3]`` (video ``[N, F, H, W, 3]``)
        on CPU, decoded on ``vae_device`` ``vae_decode_chunk_size`` samples at a time."""
        frames = decode_to_uint8(self._decode_chunk, latents, self.config.vae_decode_chunk_size)
        if self.modality == "video":
            return frames.view(latents.shape[0], -1, *frames.shape[1:])
        return frames

    # ----------------------------------------------------------------- training
    #: Module-name patterns LoRA adapts by default (``peft.LoraConfig(target_modules=...)``).
    default_lora_targets: ClassVar[Sequence[str]] = ()
    #: The transformer block classes ``train.fsdp`` shards as units of their own, as
    #: ``"module:Class"`` (imported when asked; not run on the real models here).
    fsdp_blocks: ClassVar[Sequence[str]] = ()

    def trainable_module(self) -> nn.Module:
        return self.transformer

    @property
    def lora_target_modules(self) -> list[str]:
        return list(self.default_lora_targets)

    def fsdp_block_types(self) -> tuple[type[nn.Module], ...]:
        """The classes :attr:`fsdp_blocks` names."""
        return tuple(_import_class(name) for name in self.fsdp_blocks)

    def at_resolution(self, height: int, width: int) -> FlowTransformerPolicy:
        """A shallow copy (same modules) whose ``config.resolution`` is ``[height, width]``,
        its geometry re-derived (the adapter's config checks the size)."""
        if (height, width) == (self.height, self.width):
            return self
        other = _copy.copy(self)
        other.config = dataclasses.replace(self.config, resolution=[height, width])
        other._init_geometry()
        return other

    def release_text_encoders(self) -> None:
        """Drops both tokenizers and text encoders (after caching embeddings)."""
        self.text_encoder = self.text_encoder_2 = None
        self.tokenizer = self.tokenizer_2 = None


def latent_num_frames(num_frames: int, temporal_ratio: int) -> int:
    """Latent frames of a ``num_frames`` video: ``(F − 1) // r + 1`` (the first frame kept,
    the rest compressed ``r``× in time; diffusers ``HunyuanVideoPipeline.prepare_latents``,
    ``WanPipeline.prepare_latents``)."""
    return (num_frames - 1) // temporal_ratio + 1


def _import_class(name: str) -> type:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)
