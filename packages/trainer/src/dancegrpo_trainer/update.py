"""One optimisation step of the training algorithm on a batch of stored trajectories.

For every micro-batch of samples the algorithm picks its training terms (GRPO: a random
subset of the recorded denoising steps, shared by the micro-batch so the policy runs
batched); the loss of each (micro-batch, term) is backpropagated immediately, scaled so
the accumulated gradient is the mean over all samples and terms. Gradients are then
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

Samples may be left out (``train.drop_constant_groups``: groups whose rewards are all
equal): they keep their place in the global sample index, so micro-batches and their terms
are exactly those of the full batch and a kept sample trains exactly the terms it would
otherwise; its micro-batch just runs without the dropped rows. The gradient is then the
mean over the kept samples of every rank: the accumulated gradient (normalised over the
full batch) is multiplied by ``N_all / N_kept`` once, after the all-reduce (a factor of
exactly 1 when nothing is dropped), and a step where every sample is left out trains
nothing (logged as skipped). Under ``train.fsdp`` a micro-batch whose rows are all left out
on this rank still runs its passes with a zero weight: sharded forwards and backwards are
collectives that every rank must join (:meth:`GradientAccumulator._lockstep_pass`).
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

from dancegrpo_trainer.algorithms.base import Algorithm
from dancegrpo_trainer.config import TrainConfig
from dancegrpo_trainer.distributed import all_gather_tensor, average_gradients
from dancegrpo_trainer.policies.base import Policy
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
    """Diagnostics of one optimisation step (means over samples × terms, or the
    ``reductions`` named per metric: ``"min"``/``"max"``).
    """

    metrics: dict[str, float]
    skipped: bool
    reductions: dict[str, str] = dataclasses.field(default_factory=dict)


class GradientAccumulator:
    """Accumulates one batch's gradient of the algorithm's loss, part by part, then steps.

    The batch (``num_samples`` samples on this rank) may arrive in several parts, e.g.
    prompt groups as soon as their rewards are known: the parameters do not change until
    :meth:`step`, so the gradient of a part does not depend on when it is computed. Each
    part's samples are cut into micro-batches at global multiples of
    ``cfg.micro_batch_size``; a micro-batch split across two parts keeps one set of terms
    (drawn once per global micro-batch and remembered), so the accumulated terms are
    exactly those of a single pass over the batch, up to float summation order.

    Args:
        policy: the policy whose trainable module is optimised.
        optimizer: over the trainable parameters (its gradients are zeroed here).
        num_samples: samples this rank contributes to the step (every part together).
        cfg: the ``train`` section.
        algorithm: the training algorithm (default: GRPO built from ``cfg``, ``eta``,
            ``reference`` and ``autocast``).
        eta: the rollout's SDE noise level, for rollouts that do not record it (GRPO).
        generator: draws the terms (one stream, in order of first use), or
        timestep_generator: ``k ↦`` the generator of global micro-batch ``k``.
        reference: the reference policy for the KL penalty (``cfg.kl_coef > 0``).
        autocast: mixed-precision context factory.
        progress: show a tqdm bar over samples.
        partial: parts may leave samples out (``accumulate(..., keep=...)``); the step then
            counts the kept samples over ranks (a collective: every rank must agree).
    """

    def __init__(
        self,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        *,
        num_samples: int,
        cfg: TrainConfig,
        algorithm: Algorithm | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        timestep_generator: Callable[[int], torch.Generator] | None = None,
        reference: ReferencePolicy | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        progress: bool = False,
        partial: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if algorithm is None:
            from dancegrpo_trainer.algorithms.grpo import GRPO

            algorithm = GRPO(cfg, policy, reference=reference, autocast=autocast, eta=eta)
        self.policy = policy
        self.optimizer = optimizer
        self.num_samples = num_samples
        self.cfg = cfg
        self.algorithm = algorithm
        self._generator = generator
        self._timestep_generator = timestep_generator
        self._terms: dict[int, list[int]] = {}
        self._seen = 0
        self._kept = 0
        self.partial = partial
        self._totals: dict[str, float] = collections.defaultdict(float)
        self._extrema: dict[str, float] = {}
        self._bar = tqdm(
            total=num_samples, desc="train", unit="sample", disable=not progress, leave=False
        )
        self.module = policy.trainable_module()
        self.module.train()
        optimizer.zero_grad(set_to_none=True)

    def _terms_of(self, batch_index: int, rollout: Rollout) -> list[int]:
        """The terms of global micro-batch ``batch_index`` (drawn once)."""
        if batch_index not in self._terms:
            gen = (
                self._timestep_generator(batch_index)
                if self._timestep_generator is not None
                else self._generator
            )
            self._terms[batch_index] = self.algorithm.terms(rollout, gen)
        return self._terms[batch_index]

    def accumulate(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        *,
        sample_offset: int = 0,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Backpropagates the loss of ``rollout``'s samples (one part of the batch).

        Args:
            rollout: the part's trajectories.
            advantages: float32 ``[len(rollout)]``.
            sample_offset: global index of ``rollout``'s first sample (this rank's offset
                in the global batch plus the part's offset within this rank).
            keep: bool ``[len(rollout)]``: the samples to train (``None``: all); needs
                ``partial``. Left-out samples still count towards ``num_samples``.
        """
        n = len(rollout)
        if advantages.shape != (n,):
            raise ValueError(f"advantages must be [{n}], got {tuple(advantages.shape)}")
        if self._seen + n > self.num_samples:
            raise ValueError(f"{self._seen + n} samples accumulated, expected {self.num_samples}")
        if keep is not None:
            if not self.partial:
                raise ValueError("accumulate(keep=...) needs GradientAccumulator(partial=True)")
            if keep.shape != (n,):
                raise ValueError(f"keep must be [{n}], got {tuple(keep.shape)}")
            keep = keep.to(device="cpu", dtype=torch.bool)
        mb = self.cfg.micro_batch_size
        start = 0
        while start < n:
            batch_index, within = divmod(sample_offset + start, mb)
            stop = min(start + mb - within, n)
            rows = torch.arange(start, stop)
            if keep is not None:
                rows = rows[keep[start:stop]]
            # Drawn even when every row is left out, so that later micro-batches get the
            # same terms from a shared generator stream as without dropping.
            terms = self._terms_of(batch_index, rollout)
            if len(rows) == stop - start:
                self._micro_batch(rollout.rows(start, stop), advantages[start:stop], terms)
            elif len(rows):  # the kept rows of the micro-batch, with its terms
                batch = rollout.select(rows)
                self._micro_batch(batch, advantages[rows.to(advantages.device)], terms)
            elif self.cfg.fsdp:
                self._lockstep_pass(
                    rollout.rows(start, start + 1), advantages[start : start + 1], terms
                )
            self._kept += len(rows)
            self._bar.update(stop - start)
            start = stop
        self._seen += n

    def _micro_batch(self, batch: Rollout, advantages: torch.Tensor, terms: list[int]) -> None:
        weight = len(batch) / self.num_samples / len(terms)
        reductions = self.algorithm.metric_reductions
        for term in terms:
            res = self.algorithm.loss(batch, advantages, term)
            (res.loss * weight).backward()
            for key, value in res.metrics.items():
                how = reductions.get(key, "mean")
                if how == "mean":
                    self._totals[key] += value * weight
                else:
                    pick = min if how == "min" else max
                    self._extrema[key] = pick(self._extrema.get(key, value), value)

    def _lockstep_pass(self, batch: Rollout, advantages: torch.Tensor, terms: list[int]) -> None:
        """The forward and backward passes of a micro-batch whose rows were all left out,
        on one of its rows with a zero weight (``train.fsdp`` only).

        Under FSDP every forward and backward of the sharded module is a collective
        (parameter all-gathers, gradient reduce-scatters) that every rank must join in the
        same order, and another rank may keep rows of the same global micro-batch. The
        gradient contribution is exactly zero and nothing is logged; a non-finite loss
        would make the gradient norm non-finite and the step skipped, as any other would.
        """
        for term in terms:
            res = self.algorithm.loss(batch, advantages, term)
            (res.loss * 0.0).backward()

    def step(self, grad_monitor: GradNormMonitor) -> UpdateResult:
        """Averages gradients over ranks, clips, and steps (or skips) the optimiser.

        Raises ``ValueError`` unless exactly ``num_samples`` samples were accumulated.
        """
        self._bar.close()
        if self._seen != self.num_samples:
            raise ValueError(f"{self._seen} samples accumulated, expected {self.num_samples}")
        params = [p for p in self.module.parameters() if p.requires_grad]
        scale = 1.0
        if self.partial:
            counts = all_gather_tensor(torch.tensor([[self._kept, self._seen]]))
            kept, seen = (int(c) for c in counts.sum(dim=0))
            if kept == 0:  # every sample left out: nothing to train this step
                return self._nothing_to_train()
            scale = seen / kept
        average_gradients(params)
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
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
        self.algorithm.after_optimizer_step(skipped)
        metrics = {k: v * scale for k, v in self._totals.items()}
        metrics.update(self._extrema)
        metrics.update(grad_norm=grad_norm, skipped=float(skipped))
        return UpdateResult(
            metrics=metrics, skipped=skipped, reductions=dict(self.algorithm.metric_reductions)
        )

    def _nothing_to_train(self) -> UpdateResult:
        """No optimiser step (nor a recorded gradient norm) when every sample was left out."""
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.after_optimizer_step(True)
        return UpdateResult(
            metrics={"grad_norm": 0.0, "skipped": 1.0},
            skipped=True,
            reductions=dict(self.algorithm.metric_reductions),
        )


def policy_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: torch.Tensor,
    *,
    cfg: TrainConfig,
    grad_monitor: GradNormMonitor,
    sample_offset: int = 0,
    keep: torch.Tensor | None = None,
    **accumulator: Any,
) -> UpdateResult:
    """Accumulates the algorithm's gradient over ``rollout`` and takes (or skips) one step.

    Args:
        policy: the policy whose trainable module is optimised.
        optimizer: over the trainable parameters.
        rollout: stored trajectories (``latents [N, S+1, ...]``).
        advantages: float32 ``[N]``.
        cfg: the ``train`` section.
        grad_monitor: running gradient-norm statistics (skip rule).
        sample_offset: global index of ``rollout``'s first sample (this rank's offset in
            the global batch); micro-batches are cut at global multiples of
            ``cfg.micro_batch_size``. Every rank must hold the same number of samples,
            since per-rank mean gradients are averaged.
        accumulator: :class:`GradientAccumulator`'s other keywords (``algorithm``, ``eta``,
            ``generator`` / ``timestep_generator``, ``reference``, ``autocast``,
            ``progress``).
        keep: bool ``[N]``: the samples to train (``None``: all); the gradient is then the
            mean over the kept samples of every rank (see the module docstring).

    Returns:
        :class:`UpdateResult` (GRPO's ``metrics``: loss, policy_loss, kl, clip_fraction,
        approx_kl, ratio_mean/min/max, grad_norm, skipped).
    """
    n = len(rollout)
    if advantages.shape != (n,):
        raise ValueError(f"advantages must be [{n}], got {tuple(advantages.shape)}")
    accumulator.setdefault("partial", keep is not None)
    acc = GradientAccumulator(policy, optimizer, num_samples=n, cfg=cfg, **accumulator)
    acc.accumulate(rollout, advantages, sample_offset=sample_offset, keep=keep)
    return acc.step(grad_monitor)


#: The GRPO update (the default algorithm): :func:`policy_update` by its former name.
grpo_update = policy_update
