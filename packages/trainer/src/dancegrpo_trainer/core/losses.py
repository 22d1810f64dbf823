"""The clipped GRPO policy loss with an optional KL penalty to a reference policy."""

from __future__ import annotations

import dataclasses

import torch

from dancegrpo_trainer.core.gaussian import reduce_non_batch


@dataclasses.dataclass
class GRPOLossOutput:
    """The loss to backpropagate and its diagnostics.

    Attributes:
        loss: scalar, ``policy_loss + kl_coef · kl`` (carries the gradient).
        policy_loss: scalar clipped surrogate (carries the gradient).
        kl: scalar mean KL to the reference policy (0 when no KL term is given).
        clip_fraction: fraction of entries with ``|ratio − 1| > clip_range`` (detached).
        approx_kl: ``½·mean((logp_new − logp_old)²)`` (detached; Schulman's k2 estimator).
        ratio_mean, ratio_min, ratio_max: statistics of ``ratio`` (detached).
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Every field as a Python float, for logging."""
        return {f.name: float(getattr(self, f.name).detach()) for f in dataclasses.fields(self)}


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(μθ, σ²) ‖ N(μref, σ²)) = ‖μθ − μref‖² / (2σ²)``, averaged over non-batch dims.

    Flow-GRPO (Liu et al. 2025) eq. 7 / ``train_sd3.py`` (both policies share the step's
    σ, so the KL of the two Gaussians reduces to the scaled squared mean difference).
    Entries with ``σ = 0`` (deterministic steps, whose log-prob is 0) contribute 0.

    Args:
        mean: the trained policy's step mean ``[B, ...]``.
        ref_mean: the reference policy's step mean ``[B, ...]`` (detached by the caller).
        std: the step std, broadcastable to ``mean`` (``[B, 1, ..., 1]``).

    Returns:
        float32 ``[B]``.
    """
    std = std.to(torch.float32)
    positive = std > 0
    safe_var = torch.where(positive, std, torch.ones_like(std)) ** 2
    kl = (mean.to(torch.float32) - ref_mean.to(torch.float32)) ** 2 / (2.0 * safe_var)
    kl = torch.where(positive, kl, torch.zeros_like(kl))
    return reduce_non_batch(kl, "mean")


def velocity_kl(velocity: torch.Tensor, ref_velocity: torch.Tensor) -> torch.Tensor:
    """``mean_d (vθ − v_ref)²`` per sample: the KL penalty on the velocity (``train.kl_type:
    velocity``), Flow-Factory's ``kl_type: v-based`` (``trainers/grpo.py``).

    Unlike :func:`gaussian_mean_kl` it does not depend on the step's noise: every step,
    deterministic or not, contributes, weighted alike.

    Args:
        velocity: the trained policy's model output ``[B, ...]`` (carries the gradient).
        ref_velocity: the reference policy's ``[B, ...]`` (detached by the caller).

    Returns:
        float32 ``[B]``.
    """
    diff = velocity.to(torch.float32) - ref_velocity.to(torch.float32)
    return reduce_non_batch(diff**2, "mean")


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> GRPOLossOutput:
    """PPO-style clipped GRPO objective, averaged over samples and trained timesteps.

    DanceGRPO (Xue et al. 2025) eq. 4 / ``train_grpo_flux.py``; Flow-GRPO (Liu et al. 2025)::

        A      = clamp(advantages, −adv_clip_max, adv_clip_max)
        ratio  = exp(logp_new − logp_old)
        policy = mean(max(−A·ratio, −A·clamp(ratio, 1 − ε, 1 + ε)))
        loss   = policy + β·mean(kl)

    The mean runs over every ``(sample, timestep)`` entry, i.e. per-timestep losses
    averaged over the trained timesteps (what DanceGRPO's per-timestep backward with
    ``/ train_timesteps`` accumulates to).

    Args:
        log_prob: ``[B]`` or ``[B, T]`` log-probs under the current policy (with gradient).
        old_log_prob: same shape, from the rollout (treated as constants).
        advantages: ``[B]`` (broadcast over ``T``) or same shape as ``log_prob``.
        clip_range: ε > 0 (DanceGRPO: 1e-4; Flow-GRPO: 1e-4 as well, DDPO: 1e-4).
        adv_clip_max: advantages are clamped to ``[−adv_clip_max, adv_clip_max]`` (5).
        kl: optional per-entry KL to the reference policy, same shape as ``log_prob``
            (e.g. from :func:`gaussian_mean_kl`).
        kl_coef: β >= 0; requires ``kl`` when > 0.

    Returns:
        :class:`GRPOLossOutput`.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and kl is None:
        raise ValueError("kl_coef > 0 needs the kl tensor (see gaussian_mean_kl)")
    if log_prob.ndim not in (1, 2) or old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"log_prob and old_log_prob must both be [B] or [B, T], got "
            f"{tuple(log_prob.shape)} and {tuple(old_log_prob.shape)}"
        )
    if kl is not None and kl.shape != log_prob.shape:
        raise ValueError(f"kl shape {tuple(kl.shape)} != log_prob shape {tuple(log_prob.shape)}")
    if advantages.shape == log_prob.shape[:1] and log_prob.ndim == 2:
        advantages = advantages[:, None]
    elif advantages.shape != log_prob.shape:
        raise ValueError(
            f"advantages must be [B] or {tuple(log_prob.shape)}, got {tuple(advantages.shape)}"
        )

    adv = advantages.detach().to(torch.float32).clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.to(torch.float32) - old_log_prob.detach().to(torch.float32)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    kl_mean = kl.to(torch.float32).mean() if kl is not None else policy_loss.new_zeros(())
    loss = policy_loss + kl_coef * kl_mean if kl_coef > 0 else policy_loss

    with torch.no_grad():
        r = ratio.detach()
        return GRPOLossOutput(
            loss=loss,
            policy_loss=policy_loss,
            kl=kl_mean,
            clip_fraction=((r - 1.0).abs() > clip_range).float().mean(),
            approx_kl=0.5 * (log_ratio.detach() ** 2).mean(),
            ratio_mean=r.mean(),
            ratio_min=r.min(),
            ratio_max=r.max(),
        )
