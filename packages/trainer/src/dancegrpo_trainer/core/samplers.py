"""The rectified-flow samplers a rollout can use, by name (``sampling.sampler``).

Every sampler is a Gaussian policy step ``x_σ → x_σ'`` returning a :class:`StepOutput`;
``eta = 0`` is the deterministic Euler ODE step for all of them. DDIM-η (Stable Diffusion)
is not here: it needs the policy's diffusers scheduler (:func:`ddim_step`).
"""

from __future__ import annotations

from typing import Literal

import torch

from dancegrpo_trainer.core.sde import cps_step, flow_sde_step
from dancegrpo_trainer.core.step_output import StepOutput

FlowSampler = Literal["dancegrpo", "flow_grpo", "cps"]
#: ``dancegrpo``: DanceGRPO's flow SDE (``g = η``); ``flow_grpo``: Flow-GRPO's
#: (``g = η·√(σ/(1−σ))``); ``cps``: coefficients-preserving sampling (Flow-CPS).
FLOW_SAMPLERS: tuple[str, ...] = ("dancegrpo", "flow_grpo", "cps")
#: The DDIM-η sampler of diffusion (ε/v-prediction) policies.
DDIM_SAMPLER = "ddim"


def flow_step(
    sampler: str,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One step of the named flow sampler (see :data:`FLOW_SAMPLERS`).

    ``dancegrpo`` and ``flow_grpo`` are :func:`flow_sde_step` with ``noise_schedule``
    ``"dance"`` / ``"flow_grpo"``; ``cps`` is :func:`cps_step` with the Gaussian
    log-density. Arguments as :func:`flow_sde_step`.
    """
    if sampler == "dancegrpo":
        schedule = "dance"
    elif sampler == "flow_grpo":
        schedule = "flow_grpo"
    elif sampler == "cps":
        return cps_step(
            velocity,
            sample,
            sigma,
            sigma_next,
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
        )
    else:
        raise ValueError(f"unknown flow sampler {sampler!r}: use one of {list(FLOW_SAMPLERS)}")
    return flow_sde_step(
        velocity,
        sample,
        sigma,
        sigma_next,
        eta=eta,
        prev_sample=prev_sample,
        generator=generator,
        noise=noise,
        noise_schedule=schedule,
    )
