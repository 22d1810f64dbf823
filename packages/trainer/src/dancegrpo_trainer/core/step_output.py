"""The result of one stochastic sampling step (shared by the flow-SDE and DDIM-η steps)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class StepOutput:
    """One denoising step ``x_t → x_{t-1}`` with its Gaussian policy.

    Attributes:
        prev_sample: the next latent ``x_{t-1}``, ``[B, ...]`` (sampled, or the one given).
        log_prob: float32 ``[B]`` log-density of ``prev_sample`` under ``N(mean, std²)``,
            averaged (default) or summed over all non-batch dimensions.
        mean: the policy mean ``μθ(x_t)``, ``[B, ...]``; carries the gradient.
        std: the policy standard deviation, broadcastable to ``mean`` (``[B, 1, ...]``).
        pred_original_sample: the model's prediction of the clean sample ``x0``.
        model_output: the model's raw prediction the step was taken from (the guided
            velocity of flow policies), or ``None`` where the policy does not report it.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor
    model_output: torch.Tensor | None = None
