"""GRPO-Guard's regulated clipping: the ratio normalised by the step's noise scale and
corrected for the mean shift, and the per-step gradient reweighting.

GRPO-Guard (Wang et al. 2025, "Mitigating Implicit Over-Optimization in Flow Matching via
Regulated Clipping", arXiv 2510.22319). The formula is the one the authors' code runs:
Flow-GRPO's ``scripts/train_sd3_GRPO_Guard.py`` (``config.rationorm``, configs in
``config/grpo_guard.py``), identical in Flow-Factory's ``GRPOGuardTrainer``
(``trainers/grpo.py``, which leaves out the ``1/Δ`` reweighting) and verl-omni's
``GRPOGuardLoss``. For one recorded step with the sampling policy's mean ``μ_old``, the
current policy's mean ``μθ`` (both at the stored ``x_t``), the step's Gaussian std ``s``
(Flow-GRPO's ``std_dev_t·sqrt_dt``, i.e. ``g·√Δ``) and ``Δ = σ − σ_next``::

    log r   = log pθ(x') − log p_old(x')                  (GRPO's log-ratio, mean over dims)
    b       = mean_d (μθ − μ_old)² / (2 s²)               (the mean shift that pulls E[log r] < 0)
    log r̂  = s · (log r + b)                             (RatioNorm)
    policy  = mean_b max(−A·r̂, −A·clip(r̂, 1 − ε, 1 + ε)) / Δ   (gradient reweighting)

Since ``x' = μ_old + s·ε`` and both log-densities share ``s``, ``log r = mean_d(ε·Δμ)/s −
b`` with ``Δμ = μθ − μ_old``, so ``log r̂ = mean_d(ε·Δμ)`` exactly: zero mean over the
step noise whatever the policy drift, and a spread that no longer scales with ``1/s``, so
one ``clip_range`` means the same thing at every step. The stored ``μ_old`` and ``s`` are
constants: gradients reach the policy through ``μθ`` only (``log pθ`` depends on θ through
its mean; ``s`` does not depend on θ).
"""

from __future__ import annotations

import dataclasses

import torch

from dancegrpo_trainer.core.gaussian import reduce_non_batch
from dancegrpo_trainer.core.losses import GRPOLossOutput


@dataclasses.dataclass
class GuardLossOutput(GRPOLossOutput):
    """:class:`GRPOLossOutput` of the regulated ratio (``ratio_*``, ``clip_fraction`` are
    of ``r̂``; ``approx_kl`` is of GRPO's raw log-ratio, as the official code logs), plus

    Attributes:
        mean_shift: mean of ``b = mean_d(μθ − μ_old)²/(2s²)``, the left shift RatioNorm
            removes from GRPO's log-ratio (detached).
    """

    mean_shift: torch.Tensor


def regulated_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-Guard's ``log r̂ = s·(log pθ − log p_old + b)``, ``b = mean_d(μθ − μ_old)²/(2s²)``.

    Args:
        log_prob: float32 ``[B]``, the current policy's log-density of the stored ``x'``
            (mean over non-batch dims, as :func:`flow_sde_step`); carries the gradient.
        old_log_prob: ``[B]``, the sampling policy's (the rollout's), a constant.
        mean: ``[B, ...]`` the current policy's step mean ``μθ`` (carries the gradient).
        old_mean: ``[B, ...]`` the rollout's step mean ``μ_old`` (a constant).
        std: ``[B]`` (or broadcastable, e.g. ``[B, 1, ..., 1]``) the step's Gaussian std
            ``s`` (a constant). Rows with ``s = 0`` (deterministic steps) get ``log r̂ = 0``.

    Returns:
        ``(log r̂, b)``, both float32 ``[B]``.
    """
    if mean.shape != old_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and old_mean {tuple(old_mean.shape)} differ")
    if log_prob.shape != (mean.shape[0],) or old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"log_prob and old_log_prob must be [B]=[{mean.shape[0]}], got "
            f"{tuple(log_prob.shape)} and {tuple(old_log_prob.shape)}"
        )
    s = std.detach().to(torch.float32).reshape(mean.shape[0])
    positive = s > 0
    safe = torch.where(positive, s, torch.ones_like(s))
    shift = mean.to(torch.float32) - old_mean.detach().to(torch.float32)
    bias = reduce_non_batch(shift**2, "mean") / (2.0 * safe**2)
    log_ratio = log_prob.to(torch.float32) - old_log_prob.detach().to(torch.float32)
    regulated = (log_ratio + bias) * safe
    zero = torch.zeros_like(regulated)
    return torch.where(positive, regulated, zero), torch.where(positive, bias, zero)


def grpo_guard_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
    advantages: torch.Tensor,
    *,
    delta: float | None,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> GuardLossOutput:
    """The clipped objective on GRPO-Guard's regulated ratio for one recorded step::

        A      = clamp(advantages, −adv_clip_max, adv_clip_max)
        r̂      = exp(regulated_log_ratio(...))
        policy = mean_b max(−A·r̂, −A·clamp(r̂, 1 − ε, 1 + ε)) / Δ
        loss   = policy + β·mean(kl)

    Args:
        log_prob, old_log_prob, mean, old_mean, std: see :func:`regulated_log_ratio`.
        advantages: ``[B]``.
        delta: the step's ``Δ = σ − σ_next`` (> 0): the policy loss is divided by it
            (GRPO-Guard's gradient reweighting); ``None`` skips it (Flow-Factory).
        clip_range: ε > 0 (the official GRPO-Guard configs use 2e-6 to 4e-6).
        adv_clip_max: advantages are clamped to ``[−adv_clip_max, adv_clip_max]``.
        kl: optional ``[B]`` KL to the reference policy (not reweighted, as officially).
        kl_coef: β >= 0; requires ``kl`` when > 0.

    Returns:
        :class:`GuardLossOutput`.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta (σ − σ_next) must be > 0, got {delta}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and kl is None:
        raise ValueError("kl_coef > 0 needs the kl tensor")
    if advantages.shape != log_prob.shape:
        raise ValueError(
            f"advantages must be {tuple(log_prob.shape)}, got {tuple(advantages.shape)}"
        )
    log_r, bias = regulated_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
    adv = advantages.detach().to(torch.float32).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_r)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    if delta is not None:
        policy_loss = policy_loss / delta
    kl_mean = kl.to(torch.float32).mean() if kl is not None else policy_loss.new_zeros(())
    loss = policy_loss + kl_coef * kl_mean if kl_coef > 0 else policy_loss
    with torch.no_grad():
        r = ratio.detach()
        raw = log_prob.detach().to(torch.float32) - old_log_prob.detach().to(torch.float32)
        return GuardLossOutput(
            loss=loss,
            policy_loss=policy_loss,
            kl=kl_mean,
            clip_fraction=((r - 1.0).abs() > clip_range).float().mean(),
            approx_kl=0.5 * (raw**2).mean(),
            ratio_mean=r.mean(),
            ratio_min=r.min(),
            ratio_max=r.max(),
            mean_shift=bias.detach().mean(),
        )
