"""DPM-Solver++ (2M) for rectified flows: the deterministic ODE solver MixGRPO-Flash runs
after the SDE window.

Lu et al. 2022, *DPM-Solver++* (data-prediction, multistep, "midpoint" second order), in
the flow parametrisation ``x_σ = (1−σ)·x0 + σ·ε``: ``α = 1 − σ``, ``λ = log α − log σ``,
``x0 = x − σ·v``. MixGRPO's ``sampling_utils.dpm_step`` (``dpm_algorithm_type
"dpmsolver++"``, ``dpm_solver_order 2``, ``dpm_solver_type "midpoint"``, ODE branch) and
diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2)`` use
the same update (tested against diffusers).
"""

from __future__ import annotations

import torch

from dancegrpo_trainer.core.gaussian import per_sample


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1.0 - sigma) - torch.log(sigma)


def dpm_solver_pp_step(
    sample: torch.Tensor,
    x0: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    prev_x0: torch.Tensor | None = None,
    prev_sigma: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One DPM-Solver++ step ``x_σ → x_σ_next`` from the data prediction ``x0``.

    First order (``prev_x0`` is ``None``; DDIM in data prediction)::

        h   = λ(σ_next) − λ(σ)
        x'  = (σ_next/σ)·x − α_next·(e^(−h) − 1)·x0

    Second order, multistep midpoint (``prev_x0`` at ``prev_sigma``, the previous step's)::

        r   = (λ(σ) − λ(σ_prev)) / h,   D1 = (x0 − x0_prev)/r
        x'  = (σ_next/σ)·x − α_next·(e^(−h) − 1)·x0 − ½·α_next·(e^(−h) − 1)·D1

    ``σ_next = 0`` gives ``x' = x0`` (use first order there: second order's ``r`` is 0;
    DPM-Solver++'s ``lower_order_final``).

    Args:
        sample: ``x_σ`` ``[B, ...]``.
        x0: the model's clean-sample prediction at σ, ``[B, ...]``.
        sigma, sigma_next: noise levels (``0 < σ < 1``, ``0 <= σ_next < σ``), floats or ``[B]``.
        prev_x0, prev_sigma: the previous step's prediction and noise level (2nd order).

    Returns:
        float32 ``x_σ_next`` ``[B, ...]``.
    """
    if (prev_x0 is None) != (prev_sigma is None):
        raise ValueError("prev_x0 and prev_sigma go together (second order) or are both None")
    x = sample.to(torch.float32)
    d0 = x0.to(torch.float32)
    s = per_sample(sigma, x)
    s_next = per_sample(sigma_next, x)
    alpha_next = 1.0 - s_next
    h = _lambda(s_next) - _lambda(s)
    coef = alpha_next * (torch.exp(-h) - 1.0)
    out = (s_next / s) * x - coef * d0
    if prev_x0 is not None:
        s_prev = per_sample(prev_sigma, x)
        r = (_lambda(s) - _lambda(s_prev)) / h
        d1 = (d0 - prev_x0.to(torch.float32)) / r
        out = out - 0.5 * coef * d1
    return out
