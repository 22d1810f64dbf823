"""One DDIM-η step with its Gaussian log-probability (DDPO / DanceGRPO for diffusion models)."""

from __future__ import annotations

from typing import Any

import torch

from dancegrpo_trainer.core.gaussian import Reduction, gaussian_step, per_sample
from dancegrpo_trainer.core.step_output import StepOutput


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022), as diffusers' ``_threshold_sample``."""
    batch = x0.shape[0]
    flat = x0.reshape(batch, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def _alphas(scheduler: Any, timestep: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ᾱ_t, ᾱ_prev)`` for ``timestep`` (0-dim or ``[B]``), float32 on CPU."""
    t = torch.as_tensor(timestep).detach().to("cpu", torch.long)
    if t.ndim > 1:
        raise ValueError(f"timestep must be an int, a 0-dim or a [B] tensor, got {tuple(t.shape)}")
    n_train = int(scheduler.config.num_train_timesteps)
    if bool(((t < 0) | (t >= n_train)).any()):
        raise ValueError(f"timestep must be in [0, {n_train}), got {t.tolist()}")
    prev_t = t - n_train // int(scheduler.num_inference_steps)
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_t = alphas_cumprod[t]
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_step(
    scheduler: Any,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_clipped_model_output: bool = False,
    reduction: Reduction = "mean",
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One DDIM step ``x_t → x_{t−k}`` with ``σ_t(η)`` noise, as a Gaussian policy.

    DDIM (Song et al. 2021) eq. 12 & 16, the policy of DDPO (Black et al. 2023)
    ``ddim_step_with_logprob``; identical to diffusers ``DDIMScheduler.step`` (same previous
    timestep ``t − T_train // n_inference``, ``final_alpha_cumprod`` past the start)::

        x0     = (x − √(1−ᾱ_t)·ε̂) / √ᾱ_t        (ε-prediction; "v_prediction" and
                                                  "sample" as in diffusers)
        x0     ← clip / dynamic-threshold(x0)   (scheduler.config.clip_sample / thresholding)
        σ_t²   = (1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)
        std    = η·σ_t
        mean   = √ᾱ_prev·x0 + √(1 − ᾱ_prev − std²)·ε̂
        x_prev = mean + std·noise

    ``std == 0`` (η = 0, or the last step with ``set_alpha_to_one=True`` where σ_t = 0) is
    deterministic: ``log_prob`` is 0 there, never NaN. (DDPO clamps the previous timestep to
    0 instead, giving the last step a small non-zero variance; we follow diffusers.)

    Args:
        scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
        noise_pred: the model output ``[B, ...]`` (ε, v or x0 per
            ``scheduler.config.prediction_type``); gradients flow from it.
        timestep: current timestep (an entry of ``scheduler.timesteps``), an int or a
            per-sample ``[B]`` tensor.
        sample: the current latent ``x_t`` ``[B, ...]``.
        eta: η ∈ [0, 1] (0: DDIM, 1: DDPM-like; DDPO uses 1.0).
        prev_sample: if given, the stored next latent to evaluate (detached).
        generator: RNG for the step noise when ``prev_sample`` is not given.
        noise: explicit standard-normal step noise ``[B, ...]`` instead of drawing it
            (diffusers' ``variance_noise``): replays a recorded step exactly.
        use_clipped_model_output: re-derive ε̂ from the clipped x0 (diffusers' option).
        reduction: ``"mean"`` (default) or ``"sum"`` of the log-density over non-batch dims.

    Returns:
        :class:`StepOutput` (``prev_sample`` in ``sample.dtype``, detached; float32
        ``log_prob`` ``[B]``, ``mean``, ``std`` ``[B, 1, ..., 1]``, ``pred_original_sample``).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] for DDIM, got {eta}")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler.set_timesteps(num_inference_steps) must be called first")
    if noise_pred.shape != sample.shape:
        raise ValueError(
            f"noise_pred shape {tuple(noise_pred.shape)} != sample shape {tuple(sample.shape)}"
        )
    config = scheduler.config

    x = sample.to(torch.float32)
    out = noise_pred.to(torch.float32)
    alpha_t_cpu, alpha_prev_cpu = _alphas(scheduler, timestep)
    alpha_t = per_sample(alpha_t_cpu, x)
    alpha_prev = per_sample(alpha_prev_cpu, x)
    beta_t = 1 - alpha_t

    prediction_type = config.prediction_type
    if prediction_type == "epsilon":
        x0 = (x - beta_t ** (0.5) * out) / alpha_t ** (0.5)
        eps = out
    elif prediction_type == "sample":
        x0 = out
        eps = (x - alpha_t ** (0.5) * x0) / beta_t ** (0.5)
    elif prediction_type == "v_prediction":
        x0 = (alpha_t**0.5) * x - (beta_t**0.5) * out
        eps = (alpha_t**0.5) * out + (beta_t**0.5) * x
    else:
        raise ValueError(
            f"scheduler.config.prediction_type must be 'epsilon', 'sample' or 'v_prediction', "
            f"got {prediction_type!r}"
        )

    if config.thresholding:
        x0 = _dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
    std_dev = eta * variance ** (0.5)
    if use_clipped_model_output:
        eps = (x - alpha_t ** (0.5) * x0) / beta_t ** (0.5)
    # clamp: guards rounding at η = 1 where the argument is ≥ 0 exactly but may round below.
    direction = (1 - alpha_prev - std_dev**2).clamp(min=0.0) ** (0.5) * eps
    mean = alpha_prev ** (0.5) * x0 + direction

    std_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    std = std_dev.expand(std_shape)
    return gaussian_step(
        sample,
        mean,
        std,
        x0,
        deterministic=eta == 0,
        prev_sample=prev_sample,
        generator=generator,
        reduction=reduction,
        noise=noise,
    )
