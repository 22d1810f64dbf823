"""Diagonal-Gaussian helpers shared by the sampling steps and the KL penalty."""

from __future__ import annotations

import math
from typing import Literal

import torch

from dancegrpo_trainer.core.step_output import StepOutput

Reduction = Literal["mean", "sum"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar or per-sample ``[B]`` value shaped to broadcast against ``like``.

    Args:
        value: a Python float, a 0-dim tensor, or a ``[B]`` tensor.
        like: the tensor to broadcast against, ``[B, ...]``.

    Returns:
        float32 tensor on ``like.device``: 0-dim for scalars, ``[B, 1, ..., 1]`` for ``[B]``.
    """
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"per-sample value must be a scalar or have shape [B]=[{like.shape[0]}], "
            f"got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def reduce_non_batch(x: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean (or sum) of ``x`` ``[B, ...]`` over every dimension but the first → ``[B]``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.ndim == 1:
        return x
    dims = tuple(range(1, x.ndim))
    return x.mean(dim=dims) if reduction == "mean" else x.sum(dim=dims)


def gaussian_log_prob(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std²)``, elementwise, then reduced per sample.

    ``log N(x; μ, s²) = −(x−μ)²/(2s²) − log s − ½·log 2π`` in float32.

    Where ``std == 0`` (a deterministic step: η = 0, or a zero-variance step) the density
    does not exist; those elements contribute exactly ``0`` (never NaN/inf, and no NaN
    gradient), so a deterministic step has ``log_prob == 0`` and a constant ratio of 1.

    Args:
        x: the sample, ``[B, ...]`` (any float dtype; detached by the callers).
        mean: the Gaussian mean, ``[B, ...]``.
        std: standard deviation broadcastable to ``mean`` (0-dim or ``[B, 1, ..., 1]``).
        reduction: ``"mean"`` (DanceGRPO/Flow-GRPO convention) or ``"sum"`` over non-batch dims.

    Returns:
        float32 ``[B]``.
    """
    x = x.to(torch.float32)
    mean = mean.to(torch.float32)
    std = std.to(torch.float32)
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    elementwise = -((x - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    elementwise = torch.where(positive, elementwise, torch.zeros_like(elementwise))
    return reduce_non_batch(elementwise, reduction)


def sample_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal float32 noise shaped like ``like``, drawn on the generator's device.

    Drawing on the generator's device (then moving) keeps a CPU generator reproducible for
    CUDA latents, as diffusers' ``randn_tensor`` does.
    """
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device)


def check_step_inputs(
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
) -> None:
    """A step either evaluates a given ``prev_sample`` or draws one (from ``noise`` or
    ``generator``); shapes must match ``sample``."""
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}"
        )
    if noise is not None:
        if noise.shape != sample.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} != sample shape {tuple(sample.shape)}"
            )
        if prev_sample is not None or generator is not None:
            raise ValueError("give noise, or prev_sample, or generator: not several")


def gaussian_step(
    sample: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    pred_original_sample: torch.Tensor,
    *,
    deterministic: bool,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
    reduction: Reduction,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """The step ``x → x'`` with ``x' ~ N(mean, std²)``: draws ``x'`` (or takes the given
    ``prev_sample``, detached) and returns it with its log-probability.

    ``deterministic`` (η = 0) takes ``x' = mean`` without drawing noise, so the generator's
    state is left untouched. ``noise`` (standard normal, shaped like ``sample``) replaces
    the draw: ``x' = mean + std · noise`` (diffusers' ``variance_noise``), so a recorded
    trajectory replays exactly. The drawn sample is cast to ``sample``'s dtype before its
    log-probability is computed, so recomputing the step on the stored sample gives exactly
    the same value.
    """
    check_step_inputs(sample, prev_sample, noise, generator)
    if prev_sample is None:
        if deterministic:
            drawn = mean
        else:
            eps = sample_noise(sample, generator) if noise is None else noise.to(torch.float32)
            drawn = mean + std * eps
        prev_sample = drawn.detach().to(sample.dtype)
    else:
        prev_sample = prev_sample.detach()
    return StepOutput(
        prev_sample=prev_sample,
        log_prob=gaussian_log_prob(prev_sample, mean, std, reduction),
        mean=mean,
        std=std,
        pred_original_sample=pred_original_sample,
    )
