"""GRPO-Guard (``train.algorithm: grpo_guard``): GRPO with the regulated ratio.

Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via
Regulated Clipping" (arXiv 2510.22319). GRPO's per-step ratio ``exp(log pθ − log p_old)``
has a mean below 1 that varies with the step's noise scale, so a fixed ``clip_range``
misses over-confident positive updates at some steps and clips everything at others.
GRPO-Guard replaces it by ``r̂ = exp(s·(log r + mean_d(μθ − μ_old)²/(2s²)))`` (``s`` the
step's std: RatioNorm, which equals ``exp(mean_d(ε·(μθ − μ_old)))``) and divides each
step's policy loss by ``Δ = σ − σ_next`` (gradient reweighting); the formula, its sources
and its exact tests are in :mod:`dancegrpo_trainer.core.guard`.

Everything else is GRPO's: the recorded SDE steps (every step, or the SDE window), the
steps a micro-batch trains (``train.timestep_fraction``), advantages, clipping of
advantages, the KL penalty (``train.kl_type``). The rollout also keeps each step's mean
and std (:attr:`RolloutSpec.keep`), the ``μ_old`` and ``s`` of the ratio.

Options (``train.algorithm_options``): ``reweight`` (default ``true``, as the official
Flow-GRPO script; ``false`` is Flow-Factory's variant without the ``1/Δ`` factor).
"""

from __future__ import annotations

from typing import Any

import torch

from dancegrpo_trainer.algorithms.base import LossTerm, RolloutSpec
from dancegrpo_trainer.algorithms.grpo import GRPO
from dancegrpo_trainer.config import ConfigError
from dancegrpo_trainer.core.guard import grpo_guard_loss
from dancegrpo_trainer.rollout import Rollout

OPTIONS = {"reweight": True}


class GRPOGuard(GRPO):
    """GRPO on GRPO-Guard's regulated ratio (see the module docstring)."""

    name = "grpo_guard"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        options = {**OPTIONS, **self.train.algorithm_options}
        self.reweight = bool(options["reweight"])

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        options = cfg.train.algorithm_options
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"train.algorithm_options: unknown {unknown} for grpo_guard; "
                f"options: {sorted(OPTIONS)}"
            )
        if not isinstance(options.get("reweight", True), bool):
            raise ConfigError("train.algorithm_options.reweight: expected true/false")
        if cfg.model.kind == "stable_diffusion":
            raise ConfigError(
                "train.algorithm: grpo_guard normalises by the flow step's noise scale and "
                "reweights by its Δσ; model.kind stable_diffusion samples with DDIM: use grpo"
            )

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic="window", keep=("log_probs", "means", "stds"))

    def loss(self, batch: Rollout, advantages: torch.Tensor, term: int) -> LossTerm:
        cfg, i = self.train, term
        if batch.means is None or batch.stds is None:
            raise ValueError("grpo_guard needs a rollout that kept its means and stds")
        step = self.step_kwargs(batch, i)
        with self.autocast():
            out = self.policy.denoise_step(
                batch.latents[:, i], i, batch.schedule, batch.cond, **step
            )
        sigmas = batch.schedule.sigmas
        if sigmas is None:
            raise ValueError("grpo_guard needs a flow schedule (sigmas)")
        delta = float(sigmas[i] - sigmas[i + 1]) if self.reweight else None
        res = grpo_guard_loss(
            out.log_prob,
            batch.log_probs[:, i],
            out.mean,
            batch.means[:, i],
            batch.stds[:, i],
            advantages,
            delta=delta,
            clip_range=cfg.clip_range,
            adv_clip_max=cfg.adv_clip_max,
            kl=self.kl(out, batch, i, step),
            kl_coef=cfg.kl_coef,
        )
        return LossTerm(loss=res.loss, metrics=res.metrics())
