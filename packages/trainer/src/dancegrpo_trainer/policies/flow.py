"""The rectified-flow policy base: one ``denoise_step`` for every flow adapter.

An adapter implements :meth:`FlowPolicy.predict` (the model's velocity at a timestep, with
its guidance) and :meth:`Policy.schedule`; sampling (the flow samplers of
:mod:`dancegrpo_trainer.core.samplers`), explicit replay noise and per-row timesteps are
implemented here once, so every flow adapter (tiny_flow, FLUX, HunyuanVideo, SkyReels and
those built on :class:`FlowTransformerPolicy`) supports every sampler and SDE window.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from dancegrpo_trainer.core.samplers import FLOW_SAMPLERS, flow_step
from dancegrpo_trainer.core.schedules import flow_timesteps
from dancegrpo_trainer.core.step_output import StepOutput
from dancegrpo_trainer.policies.base import Conditioning, Policy, Schedule, StepIndex


class FlowPolicy(Policy):
    """A policy predicting the rectified-flow velocity ``v = ε − x0``.

    Attributes:
        default_sampler: the flow sampler ``denoise_step`` uses when given none.
    """

    sampler: ClassVar = "flow_sde"

    @property
    def default_sampler(self) -> str:
        return "dancegrpo"

    @property
    def schedule_shift(self) -> float:
        """The timestep shift ``s`` of :meth:`schedule` (``σ' = sσ/(1+(s−1)σ)``);
        MixGRPO-Flash builds its compressed post-window schedule with it."""
        return 1.0

    def schedule_from_sigmas(self, sigmas: torch.Tensor) -> Schedule:
        """A :class:`Schedule` on explicit ``sigmas`` ``[n + 1]`` (decreasing to 0) with this
        model's timestep convention (default: ``1000·σ``, diffusers')."""
        return Schedule(timesteps=flow_timesteps(sigmas), sigmas=sigmas)

    @abc.abstractmethod
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The model's velocity for ``latents`` ``[B, ...]`` at ``timestep`` (a 0-dim tensor,
        or ``[B]`` for rows at different steps; the schedule's ``timesteps`` scale), with
        guidance; differentiable w.r.t. the trainable module."""

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
        """Velocity at ``sigmas[i]``, then one step of ``sampler`` to ``sigmas[i + 1]``.

        ``step_index``: an int, or an int64 ``[B]`` tensor (row ``b`` at step
        ``step_index[b]``). ``prev_sample`` given: its log-probability instead of a draw;
        ``noise`` given: ``x' = mean + std·noise`` (replay); otherwise drawn from
        ``generator``. ``sampler``: one of ``dancegrpo``/``flow_grpo``/``cps``
        (``None``: :attr:`default_sampler`). The output's ``model_output`` is the velocity.
        """
        if schedule.sigmas is None:
            raise ValueError(
                f"{type(self).__name__} needs a flow schedule with sigmas (use policy.schedule)"
            )
        name = sampler or self.default_sampler
        if name not in FLOW_SAMPLERS:
            raise ValueError(
                f"sampler {name!r} is not a rectified-flow sampler: use one of "
                f"{list(FLOW_SAMPLERS)}"
            )
        if isinstance(step_index, int):
            sigma: float | torch.Tensor = float(schedule.sigmas[step_index])
            sigma_next: float | torch.Tensor = float(schedule.sigmas[step_index + 1])
            timestep = schedule.timesteps[step_index]
        else:
            idx = torch.as_tensor(step_index, dtype=torch.long)
            if idx.shape != (latents.shape[0],):
                raise ValueError(
                    f"step_index must be an int or a [B]=[{latents.shape[0]}] tensor, "
                    f"got shape {tuple(idx.shape)}"
                )
            sigma = schedule.sigmas[idx.to(schedule.sigmas.device)].to(latents.device)
            sigma_next = schedule.sigmas[(idx + 1).to(schedule.sigmas.device)].to(latents.device)
            timestep = schedule.timesteps[idx.to(schedule.timesteps.device)]
        velocity = self.predict(latents, timestep, cond)
        out = flow_step(
            name,
            velocity,
            latents,
            sigma,
            sigma_next,
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
        )
        out.model_output = velocity
        return out
