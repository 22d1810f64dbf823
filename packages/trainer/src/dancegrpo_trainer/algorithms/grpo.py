"""DanceGRPO's GRPO (the default ``train.algorithm``): the clipped ratio objective on the
recorded SDE steps, with an optional KL penalty on the step means.

Xue et al. 2025 (DanceGRPO) eq. 4 / ``train_grpo_flux.py``; Flow-GRPO (Liu et al. 2025).
Per micro-batch it trains a random subset of the recorded steps
(``train.timestep_fraction``, DanceGRPO's shuffled ``perms``; ``skip_last_timestep``
never trains the final one) when every step is recorded, and every recorded step when an
SDE window (Flow-GRPO-Fast, MixGRPO) records only some: both official codes train the
whole window. The loss of step ``i`` recomputes ``log p(x_{i+1} | x_i)`` with gradients
(:func:`grpo_loss`, ratio against the rollout's log-prob); the KL penalty is on the step
means or on the velocities (``train.kl_type``).
"""

from __future__ import annotations

from typing import Any

import torch

from dancegrpo_trainer.algorithms.base import Algorithm, LossTerm, RolloutSpec
from dancegrpo_trainer.core import (
    StepOutput,
    gaussian_mean_kl,
    grpo_loss,
    select_timesteps,
    velocity_kl,
)
from dancegrpo_trainer.rollout import Rollout

#: What GRPO logs per term (means over samples × trained steps, ratio extremes).
GRPO_METRICS = ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl", "ratio_mean")


class GRPO(Algorithm):
    """The clipped GRPO loss over recorded steps (see the module docstring).

    ``eta``: the SDE noise level of rollouts that do not record theirs (``Rollout.eta``).
    """

    name = "grpo"
    metric_reductions = {"ratio_min": "min", "ratio_max": "max"}

    def __init__(self, *args, eta: float | None = None, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.eta = eta

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic="window", keep=("log_probs",))

    def terms(self, rollout: Rollout, generator: torch.Generator | None) -> list[int]:
        n = rollout.schedule.num_steps
        recorded = rollout.recorded_steps
        if len(recorded) == n:
            return select_timesteps(
                1,
                n,
                timestep_fraction=self.train.timestep_fraction,
                generator=generator,
                skip_last=self.train.skip_last_timestep,
            )[0].tolist()
        return recorded

    def step_kwargs(self, batch: Rollout, i: int) -> dict[str, Any]:
        """``denoise_step`` keywords that re-evaluate the stored step ``i`` of ``batch``."""
        eta = batch.eta if batch.eta is not None else self.eta
        if eta is None:
            raise ValueError("the rollout does not record its eta: build GRPO(..., eta=...)")
        return dict(eta=eta, prev_sample=batch.latents[:, i + 1], sampler=batch.sampler)

    def kl(
        self, out: StepOutput, batch: Rollout, i: int, step: dict[str, Any]
    ) -> torch.Tensor | None:
        """The ``[B]`` KL penalty of step ``i`` to the reference policy (``None`` without
        ``train.kl_coef``): ``train.kl_type`` ``mean`` (:func:`gaussian_mean_kl`) or
        ``velocity`` (:func:`velocity_kl`)."""
        if self.train.kl_coef <= 0:
            return None
        if self.reference is None:
            raise ValueError("train.kl_coef > 0 needs a reference policy")
        x = batch.latents[:, i]
        with torch.no_grad(), self.reference.active(), self.autocast():
            ref = self.policy.denoise_step(x, i, batch.schedule, batch.cond, **step)
        if self.train.kl_type == "velocity":
            if out.model_output is None or ref.model_output is None:
                raise ValueError(
                    "train.kl_type velocity: the policy's denoise_step reports no model_output"
                )
            return velocity_kl(out.model_output, ref.model_output)
        return gaussian_mean_kl(out.mean, ref.mean, out.std)

    def loss(self, batch: Rollout, advantages: torch.Tensor, term: int) -> LossTerm:
        cfg, policy, i = self.train, self.policy, term
        x = batch.latents[:, i]
        step = self.step_kwargs(batch, i)
        with self.autocast():
            out = policy.denoise_step(x, i, batch.schedule, batch.cond, **step)
        kl = self.kl(out, batch, i, step)
        res = grpo_loss(
            out.log_prob,
            batch.log_probs[:, i],
            advantages,
            clip_range=cfg.clip_range,
            adv_clip_max=cfg.adv_clip_max,
            kl=kl,
            kl_coef=cfg.kl_coef,
        )
        return LossTerm(loss=res.loss, metrics=res.metrics())
