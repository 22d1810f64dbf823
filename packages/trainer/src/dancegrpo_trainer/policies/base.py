"""The interface every model adapter (SD, FLUX, HunyuanVideo, SkyReels, the demo policy)
implements, so the GRPO loop never knows which model it drives.

A rollout is::

    cond = policy.encode_prompts(prompts)                  # or load cached embeddings
    schedule = policy.schedule(num_steps)
    x = policy.initial_noise(batch_size, generator=g)
    for i in range(num_steps):
        out = policy.denoise_step(x, i, schedule, cond, eta=eta, generator=g)
        x = out.prev_sample                                 # store x and out.log_prob
    frames = policy.decode(x)                              # uint8 [N,H,W,3] or [N,T,H,W,3]

and a training pass recomputes ``denoise_step(x_i, i, schedule, cond, eta=eta,
prev_sample=x_{i+1})`` with gradients to get the new log-probability of the stored step.

Replay and comparison (issue 13): ``denoise_step(..., noise=eps)`` takes the step noise
instead of drawing it (``x' = mean + std·eps``, diffusers' ``variance_noise``), so a
recorded trajectory replays exactly; ``step_index`` may be an int64 ``[B]`` tensor (row
``b`` at step ``step_index[b]``, as DDPO's recompute needs); ``sampler`` names the step
rule (flow policies: ``dancegrpo``, ``flow_grpo``, ``cps``; diffusion policies: ``ddim``).
Flow adapters subclass :class:`~dancegrpo_trainer.policies.flow.FlowPolicy` and implement
``predict`` only.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from dancegrpo_trainer.core.step_output import StepOutput

SamplerKind = Literal["flow_sde", "ddim"]
ModalityKind = Literal["image", "video"]
#: A step index for the whole batch, or an int64 ``[B]`` tensor of per-row step indices.
StepIndex = int | torch.Tensor


@dataclasses.dataclass
class Schedule:
    """A sampling schedule for ``num_steps`` steps.

    Attributes:
        timesteps: ``[num_steps]`` model timesteps (diffusers convention: 0..1000 scale).
        sigmas: ``[num_steps + 1]`` noise levels for flow models (ending at 0), ``None``
            for DDIM (the policy's scheduler owns its alphas).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


@dataclasses.dataclass
class Conditioning:
    """Per-sample conditioning tensors (prompt embeddings, pooled embeddings, masks,
    conditioning-image latents, ...); every tensor has the batch as its first dimension.
    Negative (unconditional) embeddings for classifier-free guidance live here too.
    """

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> Conditioning:
        """Rows at ``index`` (repeat a prompt G times with ``repeat_interleave`` indices)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Conditioning({k: v[idx.to(v.device)] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        out = {}
        for k, v in self.tensors.items():
            cast = dtype if (dtype is not None and v.is_floating_point()) else None
            out[k] = v.to(device=device, dtype=cast)
        return Conditioning(out)

    @staticmethod
    def concat(items: Sequence[Conditioning]) -> Conditioning:
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in keys})


class Policy(abc.ABC):
    """A generator that GRPO fine-tunes.

    Attributes:
        sampler: ``"flow_sde"`` (rectified flow, ``flow_sde_step``) or ``"ddim"`` (DDIM-η).
        modality: ``"image"`` (decode → ``[N,H,W,3]``) or ``"video"`` (``[N,T,H,W,3]``).
    """

    sampler: ClassVar[SamplerKind]
    modality: ClassVar[ModalityKind] = "image"

    @abc.abstractmethod
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes prompts (and, for I2V, ``uint8 [N,H,W,3]`` conditioning images)."""

    def encode_condition_images(self, condition_images: torch.Tensor) -> Conditioning:
        """Encodes ``uint8 [N,H,W,3]`` conditioning images alone: the image part of the
        conditioning, merged with text embeddings looked up in an embedding cache (which is
        keyed by prompt and holds text only).

        I2V policies that keep the image conditioning apart from the text implement this;
        the default raises, since the policy cannot combine images with cached text.
        """
        raise ValueError(
            f"{type(self).__name__} cannot encode conditioning images apart from their prompts, "
            "so they cannot join cached text embeddings: unset data.embedding_cache"
        )

    @abc.abstractmethod
    def schedule(self, num_steps: int) -> Schedule:
        """The sampling schedule for ``num_steps`` denoising steps."""

    @abc.abstractmethod
    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Initial latents ``x_T`` for ``batch_size`` samples at the configured size."""

    @abc.abstractmethod
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
        """Runs the model (with guidance) at ``step_index`` and takes one stochastic step.

        Args:
            latents: ``x_i`` ``[B, ...]``.
            step_index: an int, or an int64 ``[B]`` tensor of per-row step indices.
            schedule: the sampling schedule (``policy.schedule(n)`` or one built by the
                caller with the same conventions).
            cond: ``B`` rows of conditioning.
            eta: the step's noise level (0: deterministic).
            prev_sample: the stored ``x_{i+1}`` whose log-probability to evaluate.
            generator: RNG of the step noise (when neither ``prev_sample`` nor ``noise``).
            noise: explicit standard-normal step noise ``[B, ...]`` (replay).
            sampler: the step rule; ``None`` is the policy's default.
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes final latents to ``uint8`` frames ``[N,H,W,3]`` or ``[N,T,H,W,3]``."""

    @abc.abstractmethod
    def trainable_module(self) -> nn.Module:
        """The module GRPO updates (UNet / transformer / the demo network)."""

    def at_resolution(self, height: int, width: int) -> Policy:
        """This policy sampling ``height × width`` pixel outputs (``eval.height/width``): a
        shallow copy sharing every module, so training, LoRA and EMA swaps act on both.

        Raises ``ValueError`` naming the constraint when the size does not fit the
        adapter's geometry, or when the adapter samples at one size only (the default).
        """
        if (height, width) == (getattr(self, "height", None), getattr(self, "width", None)):
            return self
        raise ValueError(f"{type(self).__name__} samples at its configured resolution only")

    def step_groups(self, schedule: Schedule) -> list[list[int]] | None:
        """Groups of step indices the training algorithm samples separately, where the
        steps are not all alike: GRPO trains ``timestep_fraction`` of every group in each
        micro-batch (at least one step each), group after group, and never a step outside
        the groups. A model that routes steps to different sub-networks (Wan2.2's two
        experts) lists each one's steps, so that every micro-batch on every rank runs the
        same sequence of sub-networks (sharded ranks must; the rules every algorithm
        follows are in :mod:`dancegrpo_trainer.algorithms.base`), and leaves out the steps
        of a frozen one (their log-probabilities carry no gradient).

        Default: ``None``, one draw over every step.
        """
        return None

    @property
    def lora_target_modules(self) -> list[str]:
        """Module-name patterns for ``peft.LoraConfig(target_modules=...)``."""
        return []

    def fsdp_block_types(self) -> tuple[type[nn.Module], ...]:
        """Submodule classes ``train.fsdp`` shards as units of their own (e.g. transformer
        blocks), so one block's full parameters are gathered at a time; the trainable
        module itself is always sharded last, holding whatever the blocks do not.

        Default: none, i.e. the whole trainable module is one unit.
        """
        return ()

    def enable_gradient_checkpointing(self) -> None:
        """Turns on activation checkpointing in the trainable module, if it supports it."""
        module = self.trainable_module()
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
