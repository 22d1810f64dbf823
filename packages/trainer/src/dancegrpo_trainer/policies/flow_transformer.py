"""What the diffusers rectified-flow transformer adapters share (FLUX, HunyuanVideo).

Both sample with the flow SDE (:func:`flow_sde_step`) on a shifted sigma schedule, train
only their ``transformer``, freeze a VAE and two text encoders that an embedding cache may
replace. The model-specific parts (prompt encoding, latent layout, ``predict``, decoding)
stay in each adapter.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from dancegrpo_trainer.core.sde import flow_sde_step
from dancegrpo_trainer.core.step_output import StepOutput
from dancegrpo_trainer.policies.base import Conditioning, Policy, Schedule
from dancegrpo_trainer.policies.runtime import RuntimeConfig, freeze, place

NOISE_SCHEDULES = ("dance", "flow_grpo")

P = TypeVar("P", bound="FlowTransformerPolicy")


@dataclasses.dataclass
class FlowTransformerConfig(RuntimeConfig):
    """Flow-SDE sampling options of every rectified-flow transformer adapter.

    Attributes:
        num_steps: default number of sampling steps.
        eta: default SDE noise scale η (0 is the Euler ODE sampler).
        noise_schedule: ``"dance"`` (``g = η``) or ``"flow_grpo"`` (see ``flow_sde_step``).
        shift: static timestep shift ``s`` (``σ' = sσ/(1+(s−1)σ)``).
    """

    num_steps: int = 16
    eta: float = 0.3
    noise_schedule: str = "dance"
    shift: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
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


class FlowTransformerPolicy(Policy):
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

    @classmethod
    def from_pipeline(cls: type[P], pipe: Any, config: FlowTransformerConfig | None = None) -> P:
        """Wraps the components of a loaded diffusers pipeline of this model (its
        ``transformer``, ``vae``, text encoders and tokenizers)."""
        return cls(
            transformer=pipe.transformer,
            vae=pipe.vae,
            config=config or cls.config_class(),
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
        )

    @abc.abstractmethod
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The transformer's velocity for ``latents`` at ``timestep`` (float32)."""

    def denoise_step(
        self,
        latents: torch.Tensor,
        step_index: int,
        schedule: Schedule,
        cond: Conditioning,
        *,
        eta: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Velocity at ``sigmas[step_index]``, then one flow-SDE step to
        ``sigmas[step_index + 1]`` (``prev_sample`` given: its log-probability instead)."""
        if schedule.sigmas is None:
            raise ValueError(
                f"{type(self).__name__} needs a flow schedule with sigmas (use policy.schedule)"
            )
        velocity = self.predict(latents, schedule.timesteps[step_index], cond)
        return flow_sde_step(
            velocity,
            latents,
            float(schedule.sigmas[step_index]),
            float(schedule.sigmas[step_index + 1]),
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
            noise_schedule=self.config.noise_schedule,
        )

    def trainable_module(self) -> nn.Module:
        return self.transformer

    def release_text_encoders(self) -> None:
        """Drops both tokenizers and text encoders (after caching embeddings)."""
        self.text_encoder = self.text_encoder_2 = None
        self.tokenizer = self.tokenizer_2 = None
