"""One stochastic rectified-flow step with its Gaussian log-probability (DanceGRPO / Flow-GRPO).

Conventions (diffusers' flow matching, SD3/FLUX/HunyuanVideo): ``x_σ = (1−σ)·x0 + σ·ε`` and
the model predicts the velocity ``v = ε − x0``; sampling goes from σ = 1 (noise) to σ = 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from dancegrpo_trainer.core.gaussian import Reduction, gaussian_step, per_sample, reduce_non_batch
from dancegrpo_trainer.core.step_output import StepOutput

NoiseSchedule = Literal["dance", "flow_grpo"]


def _step_inputs(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flow step's inputs, checked, in float32: ``(x, v, σ, σ_next)``, the sigmas
    broadcastable per sample (``[B, 1, ..., 1]``)."""
    if velocity.shape != sample.shape:
        raise ValueError(
            f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}"
        )
    _check_float_sigmas(sigma, sigma_next)
    x = sample.to(torch.float32)
    return x, velocity.to(torch.float32), per_sample(sigma, x), per_sample(sigma_next, x)


def _check_float_sigmas(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> None:
    if isinstance(sigma, (int, float)) and not 0.0 < sigma <= 1.0:
        raise ValueError(f"sigma must be in (0, 1], got {sigma}")
    if isinstance(sigma_next, (int, float)):
        if not 0.0 <= sigma_next <= 1.0:
            raise ValueError(f"sigma_next must be in [0, 1], got {sigma_next}")
        if isinstance(sigma, (int, float)) and sigma_next > sigma:
            raise ValueError(f"sigma_next ({sigma_next}) must be <= sigma ({sigma})")


def flow_sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_schedule: NoiseSchedule = "dance",
    reduction: Reduction = "mean",
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One step ``x_σ → x_σ'`` of the reverse-time SDE of a rectified flow, as a Gaussian policy.

    With ``Δ = σ − σ_next`` and a diffusion coefficient ``g``::

        mean = x − Δ·[v + g²/(2σ)·(x + (1−σ)·v)]
        std  = g·√Δ

    (the Euler–Maruyama step of ``dx = [v − g²/2·∇log p]dσ`` using the score
    ``∇log p = −(x + (1−σ)·v)/σ``; DanceGRPO (Xue et al. 2025) ``flux_step`` with
    ``sde_solver=True``; Flow-GRPO (Liu et al. 2025) eq. 9 / ``sde_step_with_logprob``).

    ``noise_schedule`` picks ``g``:

    - ``"dance"``: ``g = η`` (DanceGRPO; η ≈ 0.3 in the paper).
    - ``"flow_grpo"``: ``g = η·√(σ/(1−σ))`` with ``η`` Flow-GRPO's ``noise_level`` ``a``
      (≈ 0.7). At ``σ = 1`` the denominator uses ``σ_next`` instead, as Flow-GRPO does
      (it substitutes ``sigmas[1]``, which is ``σ_next`` of the first step).

    ``eta = 0`` is the deterministic Euler ODE step ``x − Δ·v`` (diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``); its density does not exist, so ``std`` and
    ``log_prob`` are returned as zeros (never NaN). A step with ``Δ = 0`` likewise.

    Args:
        velocity: the model output ``v`` ``[B, ...]`` (any float dtype; gradients flow from it).
        sample: the current latent ``x_σ`` ``[B, ...]``.
        sigma: current noise level σ ∈ (0, 1], a float or per-sample ``[B]`` tensor.
        sigma_next: next noise level σ_next ∈ [0, σ], a float or ``[B]`` tensor.
        eta: noise scale ``η >= 0`` (see ``noise_schedule``).
        prev_sample: if given, the stored next latent whose log-probability is evaluated
            (detached; used when recomputing a rollout step with gradients).
        generator: RNG for the step noise when ``prev_sample`` is not given.
        noise: explicit standard-normal step noise ``[B, ...]`` instead of drawing it
            (diffusers' ``variance_noise``): replays a recorded step exactly.
        noise_schedule: ``"dance"`` or ``"flow_grpo"`` (see above).
        reduction: reduce the elementwise log-density over non-batch dims by ``"mean"``
            (DanceGRPO's convention, default) or ``"sum"``.

    Returns:
        :class:`StepOutput` with ``prev_sample`` (``sample.dtype``, detached), float32
        ``log_prob`` ``[B]``, float32 ``mean`` ``[B, ...]``, float32 ``std``
        ``[B, 1, ..., 1]`` and float32 ``pred_original_sample`` ``x0 = x − σ·v``.
        ``log_prob`` is evaluated at ``prev_sample`` as stored (after casting to
        ``sample.dtype``), so recomputing the step on it reproduces it exactly.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if noise_schedule not in ("dance", "flow_grpo"):
        raise ValueError(f"noise_schedule must be 'dance' or 'flow_grpo', got {noise_schedule!r}")
    x, v, s, s_next = _step_inputs(velocity, sample, sigma, sigma_next)
    delta = s - s_next
    pred_original_sample = x - s * v

    if eta == 0:
        mean = x - delta * v
        g = torch.zeros_like(s)
    else:
        if noise_schedule == "dance":
            g = torch.full_like(s, float(eta))
        else:
            # Flow-GRPO: σ_t = a·√(σ/(1−σ)); at σ = 1 it uses the next sigma in the denominator.
            denom_sigma = torch.where(s >= 1.0, s_next, s)
            g = eta * torch.sqrt(s / (1.0 - denom_sigma))
        mean = x - delta * (v + g**2 / (2.0 * s) * (x + (1.0 - s) * v))

    std_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    std = (g * torch.sqrt(delta)).expand(std_shape)

    return gaussian_step(
        sample,
        mean,
        std,
        pred_original_sample,
        deterministic=eta == 0,
        prev_sample=prev_sample,
        generator=generator,
        reduction=reduction,
        noise=noise,
    )


CpsLogProb = Literal["gaussian", "flow_grpo"]


def cps_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    log_prob: CpsLogProb = "gaussian",
    reduction: Reduction = "mean",
) -> StepOutput:
    """One coefficients-preserving sampling (CPS) step ``x_σ → x_σ'`` as a Gaussian policy.

    Flow-CPS (Wang & Yu 2025, "Coefficients-Preserving Sampling for Reinforcement Learning
    with Flow Matching"; Flow-GRPO's ``sde_step_with_logprob(..., sde_type="cps")``). With
    ``x̂0 = x − σ·v`` (predicted clean sample) and ``x̂1 = x + (1−σ)·v`` (predicted noise)::

        σ̃    = σ_next · sin(η·π/2)
        mean = (1 − σ_next)·x̂0 + √(σ_next² − σ̃²)·x̂1
        std  = σ̃

    so ``x' = (1−σ_next)·x̂0 + σ_next·(cos(ηπ/2)·x̂1 + sin(ηπ/2)·ε)`` keeps the coefficients
    of a rectified-flow marginal at ``σ_next`` (noise of unit variance). ``η = 0`` is taken
    as the Euler ODE step ``x − (σ − σ_next)·v`` exactly (the formula above equals it up to
    rounding); ``σ_next = 0`` (the last step) is deterministic: ``x' = x̂0``, log-prob 0.

    ``log_prob`` picks the log-probability convention:

    - ``"gaussian"`` (default): the Gaussian log-density of ``x'`` as for every other step
      here (``−(x'−μ)²/(2σ̃²) − log σ̃ − ½·log 2π``, reduced over non-batch dims).
    - ``"flow_grpo"``: Flow-GRPO's CPS convention, ``−(x'−μ)²`` reduced the same way: it
      drops the constants (which cancel in a ratio) *and* the ``1/(2σ̃²)`` scale (which
      does not): its log-ratio is ``2σ̃²`` times the Gaussian one, so the same
      ``clip_range`` clips differently per step. Entries with ``σ̃ = 0`` contribute 0.

    Args:
        velocity: the model output ``v`` ``[B, ...]``; gradients flow from it.
        sample: the current latent ``x_σ`` ``[B, ...]``.
        sigma, sigma_next: noise levels (floats or per-sample ``[B]`` tensors).
        eta: η ∈ [0, 1] (Flow-GRPO's ``noise_level``).
        prev_sample, generator, noise, reduction: as :func:`flow_sde_step`.
        log_prob: ``"gaussian"`` or ``"flow_grpo"`` (above).

    Returns:
        :class:`StepOutput` (float32 ``mean``, ``std`` ``[B, 1, ..., 1]``, ``log_prob``
        ``[B]``, ``pred_original_sample = x̂0``).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] for CPS (sin(eta*pi/2) <= 1), got {eta}")
    if log_prob not in ("gaussian", "flow_grpo"):
        raise ValueError(f"log_prob must be 'gaussian' or 'flow_grpo', got {log_prob!r}")
    x, v, s, s_next = _step_inputs(velocity, sample, sigma, sigma_next)
    x0 = x - s * v
    if eta == 0:
        mean = x - (s - s_next) * v
        std_t = torch.zeros_like(s_next)
    else:
        std_t = s_next * math.sin(eta * math.pi / 2)
        x1 = x + (1.0 - s) * v
        mean = (1.0 - s_next) * x0 + torch.sqrt((s_next**2 - std_t**2).clamp(min=0.0)) * x1
    std_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    out = gaussian_step(
        sample,
        mean,
        std_t.expand(std_shape),
        x0,
        deterministic=eta == 0,
        prev_sample=prev_sample,
        generator=generator,
        reduction=reduction,
        noise=noise,
    )
    if log_prob == "flow_grpo":
        sq = -((out.prev_sample.to(torch.float32) - mean) ** 2)
        sq = torch.where(out.std > 0, sq, torch.zeros_like(sq))
        out.log_prob = reduce_non_batch(sq, reduction)
    return out
