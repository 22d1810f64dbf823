"""Sigma / timestep schedules for rectified-flow models (diffusers' FlowMatchEuler convention)."""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Applies the SD3 timestep shift ``σ' = s·σ / (1 + (s−1)·σ)``.

    Source: Esser et al. 2024 (SD3), eq. 23; diffusers ``FlowMatchEulerDiscreteScheduler``
    (``shift``); DanceGRPO's ``sd3_time_shift``. ``s > 1`` spends more steps at high noise.
    Fixed points: ``σ = 0`` and ``σ = 1``.

    Args:
        sigmas: any shape, values in ``[0, 1]``.
        shift: ``s > 0`` (1 is the identity).

    Returns:
        the shifted sigmas, same shape and dtype.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sampling noise levels: ``linspace(1, 0, num_steps + 1)``, shifted.

    Matches ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(
    sigmas=linspace(1, 0, num_steps + 1)[:-1])``'s ``scheduler.sigmas`` (which appends 0),
    and DanceGRPO's ``sd3_time_shift(shift, linspace(1, 0, steps + 1))``.

    Args:
        num_steps: number of denoising steps (``>= 1``).
        shift: the timestep shift ``s`` (see :func:`shift_sigmas`).

    Returns:
        float32 ``[num_steps + 1]`` decreasing from 1 to 0; step ``i`` goes
        ``sigmas[i] → sigmas[i + 1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
    return shift_sigmas(sigmas, shift)


def flow_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Model timesteps for a flow schedule: ``t = σ · num_train_timesteps`` (diffusers).

    Args:
        sigmas: ``[num_steps + 1]`` as returned by :func:`flow_sigmas` (the final 0 is dropped).
        num_train_timesteps: the model's training horizon (1000 for SD3/FLUX/HunyuanVideo).

    Returns:
        float32 ``[num_steps]``; ``timesteps[i]`` is what the model sees at step ``i``.
    """
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must have shape [num_steps + 1] with num_steps >= 1, got {tuple(sigmas.shape)}"
        )
    return sigmas[:-1].to(torch.float32) * num_train_timesteps
