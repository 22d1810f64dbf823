"""DanceGRPO's GRPO (the default ``train.algorithm``): the clipped ratio objective on the
recorded SDE steps, with an optional KL penalty on the step means.

Xue et al. 2025 (DanceGRPO) eq. 4 / ``train_grpo_flux.py``; Flow-GRPO (Liu et al. 2025).
Per micro-batch it trains a random subset of the recorded steps
(``train.timestep_fraction``, DanceGRPO's shuffled ``perms``; ``skip_last_timestep``
never trains the final one) when every step is recorded, and every recorded step when an
SDE window (Flow-GRPO-Fast, MixGRPO) records only some: both official codes train the
whole window. A policy with step groups (Wan2.2's experts) gets both per group (see
:meth:`GRPO.terms`; subclasses such as GRPO-Guard inherit it). The loss of step ``i``
recomputes ``log p(x_{i+1} | x_i)`` with gradients (:func:`grpo_loss`, ratio against the
rollout's log-prob); the KL penalty is on the step means or on the velocities
(``train.kl_type``).
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
        """Step indices, shared by the micro-batch.

        A policy with :meth:`~dancegrpo_trainer.policies.base.Policy.step_groups` (Wan2.2's
        two experts) gets them group by group: with every step recorded,
        ``timestep_fraction`` of each group (at least one step; the last step left out with
        ``skip_last_timestep``), drawn group after group; under an SDE window, the recorded
        steps that fall in the groups, in group order. Every micro-batch then runs the same
        sequence of sub-networks, which sharded (FSDP) ranks must. Without groups this is
        DanceGRPO's one draw over every step (bit-identical to the single-group case).
        """
        n = rollout.schedule.num_steps
        recorded = rollout.recorded_steps
        groups = self.policy.step_groups(rollout.schedule)
        if len(recorded) == n:
            if groups is None:
                return select_timesteps(
                    1,
                    n,
                    timestep_fraction=self.train.timestep_fraction,
                    generator=generator,
                    skip_last=self.train.skip_last_timestep,
                )[0].tolist()
            return self._draw_per_group(groups, n, generator)
        if groups is None:
            return recorded
        kept = set(recorded)
        steps = [s for group in groups for s in group if s in kept]
        if not steps:
            raise ValueError(
                f"the SDE window records steps {recorded}, none of which the policy trains "
                f"(its step groups: {groups}); move sampling.window or change which "
                "sub-networks train (Wan: model.options.train_experts)"
            )
        return steps

    def _draw_per_group(
        self, groups: list[list[int]], num_steps: int, generator: torch.Generator | None
    ) -> list[int]:
        last = num_steps - 1
        skip = self.train.skip_last_timestep
        groups = [[s for s in g if not (skip and s == last)] for g in groups]
        groups = [g for g in groups if g]
        if not groups:
            raise ValueError(
                "no trainable step is left once train.skip_last_timestep drops the last"
            )
        steps: list[int] = []
        for group in groups:
            picks = select_timesteps(
                1, len(group), timestep_fraction=self.train.timestep_fraction, generator=generator
            )[0]
            steps += [group[j] for j in picks.tolist()]
        return steps

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
