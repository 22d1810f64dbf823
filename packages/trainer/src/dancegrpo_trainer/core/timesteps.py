"""Which denoising steps each sample trains on (DanceGRPO's timestep subsampling)."""

from __future__ import annotations

import math

import torch


def num_train_timesteps(
    num_steps: int, timestep_fraction: float, *, skip_last: bool = False
) -> int:
    """``K = max(1, floor(fraction · eligible))`` with ``eligible = num_steps − skip_last``.

    DanceGRPO ``train_timesteps = int(len(sigma_schedule) · timestep_fraction)``;
    Flow-GRPO ``int(num_steps · timestep_fraction)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    eligible = num_steps - int(skip_last)
    if eligible < 1:
        raise ValueError("skip_last=True needs num_steps >= 2")
    # The small tolerance keeps e.g. 0.6 · 10 = 6.000000000000001 from mattering either way.
    return max(1, math.floor(timestep_fraction * eligible + 1e-9))


def select_timesteps(
    batch_size: int,
    num_steps: int,
    *,
    timestep_fraction: float,
    generator: torch.Generator | None = None,
    skip_last: bool = False,
) -> torch.Tensor:
    """Per sample, a random subset of step indices in random order.

    DanceGRPO (Xue et al. 2025) §3.4 "timestep selection": each sample trains on a fraction
    of its denoising steps, drawn as ``torch.randperm`` per sample (``perms`` in
    ``train_grpo_flux.py``), which also shuffles the update order.

    Args:
        batch_size: ``B`` samples.
        num_steps: steps per trajectory; indices are in ``[0, num_steps)``.
        timestep_fraction: fraction of (eligible) steps to train on, in (0, 1].
        generator: CPU RNG; the same seed gives the same selection.
        skip_last: exclude the final step ``num_steps − 1`` (e.g. a deterministic or
            zero-variance last step).

    Returns:
        int64 ``[B, K]`` step indices (distinct within a row), ``K`` from
        :func:`num_train_timesteps`; CPU.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    k = num_train_timesteps(num_steps, timestep_fraction, skip_last=skip_last)
    eligible = num_steps - int(skip_last)
    rows = [torch.randperm(eligible, generator=generator)[:k] for _ in range(batch_size)]
    if not rows:
        return torch.empty(0, k, dtype=torch.long)
    return torch.stack(rows)


def gather_steps(per_step: torch.Tensor, step_indices: torch.Tensor) -> torch.Tensor:
    """Rows of per-step rollout data at the selected steps.

    Args:
        per_step: ``[B, num_steps, ...]`` (latents, log-probs, timesteps, ...).
        step_indices: int64 ``[B, K]`` from :func:`select_timesteps`.

    Returns:
        ``[B, K, ...]`` with ``out[b, j] = per_step[b, step_indices[b, j]]``.
    """
    if step_indices.ndim != 2 or step_indices.shape[0] != per_step.shape[0]:
        raise ValueError(
            f"step_indices must be [B, K] with B={per_step.shape[0]}, got {tuple(step_indices.shape)}"
        )
    rows = torch.arange(per_step.shape[0], device=per_step.device)[:, None]
    return per_step[rows, step_indices.to(per_step.device)]
