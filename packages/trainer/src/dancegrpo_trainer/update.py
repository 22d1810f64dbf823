"""One GRPO optimisation step on a batch of stored trajectories.

For every micro-batch of samples, a random subset of the denoising steps (shared by the
micro-batch, so the policy runs batched) is recomputed with gradients; the clipped loss
of each (micro-batch, timestep) is backpropagated immediately, scaled so the accumulated
gradient is the mean over all samples and selected timesteps. Gradients are then
averaged across ranks, their norm logged and clipped, and the update is skipped when
the norm is non-finite or exceeds a multiple of its running median.

Under several ranks each rank holds a contiguous slice of the global batch (equal sizes).
Micro-batches are cut at multiples of ``micro_batch_size`` of the *global* sample index
and their timesteps drawn from a generator per global micro-batch, so the set of
(sample, timestep) terms, and hence the averaged gradient, is the same for any number of
ranks; only the floating-point summation order differs.

:class:`GradientAccumulator` takes the batch in parts (the trainer feeds it prompt groups
as their rewards arrive, overlapping the remaining reward calls with backward passes);
:func:`grpo_update` is the one-part case.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from dancegrpo_trainer.config import TrainConfig
from dancegrpo_trainer.core import gaussian_mean_kl, grpo_loss, select_timesteps
from dancegrpo_trainer.distributed import average_gradients
from dancegrpo_trainer.policies.base import Policy, Schedule
from dancegrpo_trainer.rollout import Rollout
from dancegrpo_trainer.weights import ReferencePolicy


class GradNormMonitor:
    """Running median of recent gradient norms; flags outliers for skipping."""

    def __init__(self, window: int, skip_factor: float) -> None:
        self.skip_factor = skip_factor
        self.history: collections.deque[float] = collections.deque(maxlen=window)

    def should_skip(self, norm: float) -> bool:
        if not math.isfinite(norm):
            return True
        if self.skip_factor > 0 and len(self.history) >= 3:
            return norm > self.skip_factor * statistics.median(self.history)
        return False

    def record(self, norm: float) -> None:
        if math.isfinite(norm):
            self.history.append(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in state["history"])


@dataclasses.dataclass
class UpdateResult:
    """Diagnostics of one optimisation step (means over samples × timesteps)."""

    metrics: dict[str, float]
    skipped: bool


class GradientAccumulator:
    """Accumulates the GRPO gradient of one batch, part by part, then takes one step.

    The batch (``num_samples`` samples on this rank) may arrive in several parts, e.g.
    prompt groups as soon as their rewards are known: the parameters do not change until
    :meth:`step`, so the gradient of a part does not depend on when it is computed. Each
    part's samples are cut into micro-batches at global multiples of
    ``cfg.micro_batch_size``; a micro-batch split across two parts keeps one timestep
    subset (drawn once per global micro-batch and remembered), so the accumulated terms are
    exactly those of a single pass over the batch, up to float summation order.

    Args:
        policy: the policy whose trainable module is optimised.
        optimizer: over the trainable parameters (its gradients are zeroed here).
        num_samples: samples this rank contributes to the step (every part together).
        cfg: the ``train`` section.
        eta: the rollout's SDE noise level (the training pass must use the same policy).
        generator: draws the timestep subsets (one stream, in order of first use), or
        timestep_generator: ``k ↦`` the generator of global micro-batch ``k``.
        reference: the reference policy for the KL penalty (``cfg.kl_coef > 0``).
        autocast: mixed-precision context factory.
        progress: show a tqdm bar over samples.
    """

    def __init__(
        self,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        *,
        num_samples: int,
        cfg: TrainConfig,
        eta: float,
        generator: torch.Generator | None = None,
        timestep_generator: Callable[[int], torch.Generator] | None = None,
        reference: ReferencePolicy | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        progress: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.policy = policy
        self.optimizer = optimizer
        self.num_samples = num_samples
        self.cfg = cfg
        self.eta = eta
        self.reference = reference
        self.autocast = autocast
        self._generator = generator
        self._timestep_generator = timestep_generator
        self._timesteps: dict[int, list[int]] = {}
        self._seen = 0
        self._totals: dict[str, float] = collections.defaultdict(float)
        self._ratio_min, self._ratio_max = math.inf, -math.inf
        self._bar = tqdm(
            total=num_samples, desc="train", unit="sample", disable=not progress, leave=False
        )
        self.module = policy.trainable_module()
        self.module.train()
        optimizer.zero_grad(set_to_none=True)

    def _steps_of(
        self, batch_index: int, num_steps: int, schedule: Schedule | None = None
    ) -> list[int]:
        """The timestep subset of global micro-batch ``batch_index`` (drawn once).

        A policy with :meth:`~dancegrpo_trainer.policies.base.Policy.step_groups` gets
        ``timestep_fraction`` of each group (at least one step), the groups in their order:
        every micro-batch then runs the same sequence of sub-networks (e.g. Wan2.2's
        experts), which sharded (FSDP) ranks must do in lockstep.
        """
        if batch_index not in self._timesteps:
            gen = (
                self._timestep_generator(batch_index)
                if self._timestep_generator is not None
                else self._generator
            )
            groups = self._step_groups(schedule) if schedule is not None else None
            if groups is None:
                steps = select_timesteps(
                    1,
                    num_steps,
                    timestep_fraction=self.cfg.timestep_fraction,
                    generator=gen,
                    skip_last=self.cfg.skip_last_timestep,
                )[0].tolist()
            else:
                steps = []
                for group in groups:
                    picks = select_timesteps(
                        1, len(group), timestep_fraction=self.cfg.timestep_fraction, generator=gen
                    )[0]
                    steps += [group[j] for j in picks.tolist()]
            self._timesteps[batch_index] = steps
        return self._timesteps[batch_index]

    def _step_groups(self, schedule: Schedule) -> list[list[int]] | None:
        """The policy's step groups (``None``: one draw over every step), less the last step
        with ``skip_last_timestep`` and any group that leaves empty."""
        groups = self.policy.step_groups(schedule)
        if groups is None:
            return None
        last = schedule.num_steps - 1
        skip = self.cfg.skip_last_timestep
        groups = [[s for s in g if not (skip and s == last)] for g in groups]
        groups = [g for g in groups if g]
        if not groups:
            raise ValueError(
                "no trainable step is left once train.skip_last_timestep drops the last"
            )
        return groups

    def accumulate(
        self, rollout: Rollout, advantages: torch.Tensor, *, sample_offset: int = 0
    ) -> None:
        """Backpropagates the loss of ``rollout``'s samples (one part of the batch).

        Args:
            rollout: the part's trajectories.
            advantages: float32 ``[len(rollout)]``.
            sample_offset: global index of ``rollout``'s first sample (this rank's offset
                in the global batch plus the part's offset within this rank).
        """
        n = len(rollout)
        if advantages.shape != (n,):
            raise ValueError(f"advantages must be [{n}], got {tuple(advantages.shape)}")
        if self._seen + n > self.num_samples:
            raise ValueError(f"{self._seen + n} samples accumulated, expected {self.num_samples}")
        mb = self.cfg.micro_batch_size
        start = 0
        while start < n:
            batch_index, within = divmod(sample_offset + start, mb)
            stop = min(start + mb - within, n)
            steps = self._steps_of(batch_index, rollout.schedule.num_steps, rollout.schedule)
            self._micro_batch(rollout, advantages, start, stop, steps)
            self._bar.update(stop - start)
            start = stop
        self._seen += n

    def _micro_batch(
        self, rollout: Rollout, advantages: torch.Tensor, start: int, stop: int, steps: list[int]
    ) -> None:
        cfg, policy = self.cfg, self.policy
        cond = rollout.cond.select(range(start, stop))
        adv = advantages[start:stop]
        weight = (stop - start) / self.num_samples / len(steps)
        for i in steps:
            x = rollout.latents[start:stop, i]
            x_next = rollout.latents[start:stop, i + 1]
            with self.autocast():
                out = policy.denoise_step(
                    x, i, rollout.schedule, cond, eta=self.eta, prev_sample=x_next
                )
            kl = None
            if cfg.kl_coef > 0:
                assert self.reference is not None
                with torch.no_grad(), self.reference.active(), self.autocast():
                    ref = policy.denoise_step(
                        x, i, rollout.schedule, cond, eta=self.eta, prev_sample=x_next
                    )
                kl = gaussian_mean_kl(out.mean, ref.mean, out.std)
            res = grpo_loss(
                out.log_prob,
                rollout.log_probs[start:stop, i],
                adv,
                clip_range=cfg.clip_range,
                adv_clip_max=cfg.adv_clip_max,
                kl=kl,
                kl_coef=cfg.kl_coef,
            )
            (res.loss * weight).backward()
            m = res.metrics()
            for key in ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl", "ratio_mean"):
                self._totals[key] += m[key] * weight
            self._ratio_min = min(self._ratio_min, m["ratio_min"])
            self._ratio_max = max(self._ratio_max, m["ratio_max"])

    def step(self, grad_monitor: GradNormMonitor) -> UpdateResult:
        """Averages gradients over ranks, clips, and steps (or skips) the optimiser.

        Raises ``ValueError`` unless exactly ``num_samples`` samples were accumulated.
        """
        self._bar.close()
        if self._seen != self.num_samples:
            raise ValueError(f"{self._seen} samples accumulated, expected {self.num_samples}")
        params = [p for p in self.module.parameters() if p.requires_grad]
        average_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        # With FSDP the norm of the sharded gradients is a partial DTensor: full_tensor()
        # sums the shards' contributions over ranks (a collective; every rank calls it).
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        skipped = grad_monitor.should_skip(grad_norm)
        grad_monitor.record(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        metrics = dict(self._totals)
        metrics.update(
            ratio_min=self._ratio_min,
            ratio_max=self._ratio_max,
            grad_norm=grad_norm,
            skipped=float(skipped),
        )
        return UpdateResult(metrics=metrics, skipped=skipped)


def grpo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: torch.Tensor,
    *,
    cfg: TrainConfig,
    eta: float,
    generator: torch.Generator | None = None,
    timestep_generator: Callable[[int], torch.Generator] | None = None,
    sample_offset: int = 0,
    grad_monitor: GradNormMonitor,
    reference: ReferencePolicy | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    progress: bool = False,
) -> UpdateResult:
    """Accumulates the GRPO gradient over ``rollout`` and takes (or skips) one step.

    Args:
        policy: the policy whose trainable module is optimised.
        optimizer: over the trainable parameters.
        rollout: trajectories sampled with ``eta`` (``latents [N, S+1, ...]``).
        advantages: float32 ``[N]``.
        cfg: the ``train`` section.
        eta: the rollout's SDE noise level (the training pass must use the same policy).
        generator: draws the timestep subsets (one stream for all micro-batches), or
        timestep_generator: ``k ↦`` the generator of global micro-batch ``k``.
        sample_offset: global index of ``rollout``'s first sample (this rank's offset in
            the global batch); micro-batches are cut at global multiples of
            ``cfg.micro_batch_size``. Every rank must hold the same number of samples,
            since per-rank mean gradients are averaged.
        grad_monitor: running gradient-norm statistics (skip rule).
        reference: the reference policy for the KL penalty (``cfg.kl_coef > 0``).
        autocast: mixed-precision context factory.

    Returns:
        :class:`UpdateResult` (``metrics``: loss, policy_loss, kl, clip_fraction,
        approx_kl, ratio_mean/min/max, grad_norm, skipped).
    """
    n = len(rollout)
    if advantages.shape != (n,):
        raise ValueError(f"advantages must be [{n}], got {tuple(advantages.shape)}")
    acc = GradientAccumulator(
        policy,
        optimizer,
        num_samples=n,
        cfg=cfg,
        eta=eta,
        generator=generator,
        timestep_generator=timestep_generator,
        reference=reference,
        autocast=autocast,
        progress=progress,
    )
    acc.accumulate(rollout, advantages, sample_offset=sample_offset)
    return acc.step(grad_monitor)
