"""From scored rollout chunks to one optimisation step: rewards → advantages → update.

:class:`RewardAdvantages` turns reward columns into advantages (group or per-prompt,
multi-reward weighted) and logged statistics. The two ways of running the update:

- :func:`update_as_scored` (``train.pipeline_update``, group advantages): each chunk's
  whole prompt groups are trained as soon as that chunk is scored, overlapping the
  remaining reward calls with backward passes;
- :func:`update_after_scoring`: waits for every reward, computes advantages of the global
  batch (the per-prompt tracker needs it), then updates.

Both feed the algorithm-agnostic :class:`GradientAccumulator`; neither knows the algorithm.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dancegrpo_trainer import distributed as dist_utils
from dancegrpo_trainer.config import BestOfNConfig, RewardsConfig
from dancegrpo_trainer.core import (
    PerPromptStatTracker,
    best_of_n_indices,
    multi_reward_advantages,
    routed_advantages,
)
from dancegrpo_trainer.rollout import Rollout
from dancegrpo_trainer.scoring import PendingScores, Scores
from dancegrpo_trainer.update import GradientAccumulator, UpdateResult

#: ``(rollout, advantages, sample_offset, keep) ↦`` one optimiser step over that batch
#: (``keep``: bool per sample, ``None`` when no group is ever left out).
UpdateFn = Callable[[Rollout, torch.Tensor, int, torch.Tensor | None], UpdateResult]


@dataclasses.dataclass
class StepUpdate:
    """What a train step's update produced, over the global batch where it says so.

    Attributes:
        terms, outputs: the reward columns of the global batch (rank-major order).
        prompts: the global batch's prompts.
        advantages: float32 ``[global N]``, before any Best-of-N selection.
        keep: this rank's Best-of-N selection (local row indices), or ``None``.
        result: the optimiser step's diagnostics (this rank's).
        wait_s: seconds this rank was blocked waiting for rewards after the rollout.
        weights: per-sample term weights of the global batch (routed runs), else ``None``.
    """

    terms: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    prompts: list[str]
    advantages: torch.Tensor
    keep: torch.Tensor | None
    result: UpdateResult
    wait_s: float
    weights: dict[str, np.ndarray] | None = None


def gather_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each reward column concatenated over ranks (rank-major)."""
    keys = sorted(columns)
    local = torch.from_numpy(np.stack([columns[k] for k in keys], axis=1).astype(np.float32))
    full = dist_utils.all_gather_tensor(local).numpy()
    return {k: full[:, i] for i, k in enumerate(keys)}


class RewardAdvantages:
    """Rewards → advantages (``rewards.advantage``) and the logged reward statistics.

    Args:
        rewards: the ``rewards`` section (endpoint weights, advantage mode, tracker sizes).
        group_size: samples per prompt group.
        drop_constant_groups: leave groups whose rewards are all equal out of the update
            (``train.drop_constant_groups``; :meth:`kept_rows`).
    """

    def __init__(
        self, rewards: RewardsConfig, group_size: int, drop_constant_groups: bool = False
    ) -> None:
        self.mode = rewards.advantage
        self.group_size = group_size
        self.drop_constant_groups = drop_constant_groups
        self.weights = {ep.label: ep.weight for ep in rewards.endpoints}
        self.trackers = {
            ep.label: PerPromptStatTracker(
                rewards.tracker_buffer_size,
                min(rewards.tracker_min_count, rewards.tracker_buffer_size),
            )
            for ep in rewards.endpoints
        }

    def stats(
        self,
        terms: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        weights: dict[str, np.ndarray] | None = None,
        sources: list[str | None] | None = None,
    ) -> dict:
        """``reward_mean``/``reward_std`` of the weighted terms, and per term and output.

        Routed batches (``weights``: per-sample term weights, 0 where a term does not score
        the sample): a sample's reward is the weighted mean of its own terms; a term's and
        an output's statistics cover the samples it scored (left out when none); with
        ``sources`` (per sample) also ``source/<name>/reward_mean|_std`` and ``_samples``.
        """
        if weights is not None:
            return self._routed_stats(terms, outputs, weights, sources)
        total = sum(self.weights.values())
        combined = sum(self.weights[k] * terms[k] for k in terms) / total
        stats: dict[str, float] = {
            "reward_mean": float(np.mean(combined)),
            "reward_std": float(np.std(combined)),
        }
        for k, v in terms.items():
            stats[f"reward/{k}_mean"] = float(np.mean(v))
            stats[f"reward/{k}_std"] = float(np.std(v))
        for k, v in outputs.items():
            stats[f"output/{k}_mean"] = float(np.mean(v))
            stats[f"output/{k}_std"] = float(np.std(v))
        return stats

    def _routed_stats(
        self,
        terms: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        weights: dict[str, np.ndarray],
        sources: list[str | None] | None,
    ) -> dict:
        num = sum(
            np.where(weights[k] > 0, weights[k] * np.nan_to_num(terms[k]), 0.0) for k in terms
        )
        den = sum(weights[k] for k in terms)
        combined = np.asarray(num / np.where(den > 0, den, 1.0), np.float64)
        scored = np.asarray(den > 0)
        stats: dict[str, float] = {}
        if scored.any():
            stats["reward_mean"] = float(np.mean(combined[scored]))
            stats["reward_std"] = float(np.std(combined[scored]))
        for k, v in terms.items():
            values = v[weights[k] > 0]
            if values.size:
                stats[f"reward/{k}_mean"] = float(np.mean(values))
                stats[f"reward/{k}_std"] = float(np.std(values))
        for k, v in outputs.items():
            values = v[np.isfinite(v)]
            if values.size:
                stats[f"output/{k}_mean"] = float(np.mean(values))
                stats[f"output/{k}_std"] = float(np.std(values))
        for name in dict.fromkeys(s for s in sources or () if s is not None):
            rows = np.asarray([s == name for s in sources or ()]) & scored
            if rows.any():
                stats[f"source/{name}/reward_mean"] = float(np.mean(combined[rows]))
                stats[f"source/{name}/reward_std"] = float(np.std(combined[rows]))
                stats[f"source/{name}/samples"] = int(rows.sum())
        return stats

    def constant_groups(
        self, terms: dict[str, np.ndarray], weights: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """bool ``[groups]``: the whole prompt groups of ``terms`` whose every reward term
        is constant (exactly equal within the group: group advantage exactly 0). With
        per-sample ``weights`` (routed runs) only the terms routed to a group count: the
        others are NaN there and weigh nothing in its advantage."""
        g = self.group_size
        constant = None
        for k, v in terms.items():
            rows = np.asarray(v).reshape(-1, g)
            same = (rows == rows[:, :1]).all(axis=1)
            if weights is not None:
                same |= ~(np.asarray(weights[k]).reshape(-1, g) > 0).any(axis=1)
            constant = same if constant is None else constant & same
        assert constant is not None
        return constant

    def kept_rows(
        self,
        terms: dict[str, np.ndarray],
        rows_per_group: int,
        weights: dict[str, np.ndarray] | None = None,
    ) -> torch.Tensor | None:
        """bool ``[groups · rows_per_group]``: the rows trained when constant groups are
        dropped (``rows_per_group``: ``group_size``, or the Best-of-N selection size;
        ``weights`` as in :meth:`constant_groups`); ``None`` when nothing is ever dropped."""
        if not self.drop_constant_groups:
            return None
        keep = torch.from_numpy(~self.constant_groups(terms, weights))
        return keep.repeat_interleave(rows_per_group)

    def of_groups(
        self, terms: dict[str, np.ndarray], weights: dict[str, np.ndarray] | None = None
    ) -> torch.Tensor:
        """Group advantages of whole prompt groups (each reward normalised, then weighted;
        with per-sample ``weights``, each group by its own routed rewards)."""
        tensors = {k: torch.from_numpy(v) for k, v in terms.items()}
        if weights is None:
            return multi_reward_advantages(tensors, self.weights, group_size=self.group_size)
        row_weights = {k: torch.from_numpy(weights[k]) for k in terms}
        return routed_advantages(tensors, row_weights, group_size=self.group_size)

    def of_batch(
        self,
        terms: dict[str, np.ndarray],
        prompts: list[str],
        weights: dict[str, np.ndarray] | None = None,
    ) -> torch.Tensor:
        """Advantages of the global batch (terms already gathered, rank-major order)."""
        if self.mode == "group":
            return self.of_groups(terms, weights)
        total = torch.zeros(len(prompts))
        for k, v in terms.items():
            if weights is None:
                total += self.weights[k] * self.trackers[k].update(prompts, torch.from_numpy(v))
                continue
            rows = np.flatnonzero(weights[k] > 0)
            if rows.size:  # the tracker sees only the prompts this term scores
                adv = self.trackers[k].update([prompts[i] for i in rows], torch.from_numpy(v[rows]))
                total[torch.from_numpy(rows)] += torch.from_numpy(weights[k][rows]) * adv
        return total

    def state_dict(self) -> dict[str, Any]:
        return {k: t.state_dict() for k, t in self.trackers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, t in self.trackers.items():
            t.load_state_dict(state[k])


def update_after_scoring(
    rollout: Rollout,
    chunks: list[tuple[slice, PendingScores]],
    prompts: list[str],
    *,
    advantages: RewardAdvantages,
    best_of_n: BestOfNConfig,
    rank: int,
    update: UpdateFn,
) -> StepUpdate:
    """Waits for every reward, computes advantages of the global batch, then updates.

    Needed by ``rewards.advantage=per_prompt`` (the tracker sees the whole global batch
    at once), selected by ``train.pipeline_update=false``, and used when the last chunk
    is the only one that completes groups (e.g. one group per rank): nothing to overlap.
    """
    t0 = time.perf_counter()
    scores = Scores.concat([pending.result() for _, pending in chunks])
    wait_s = time.perf_counter() - t0
    all_terms = gather_columns(scores.terms)
    all_outputs = gather_columns(scores.outputs)
    all_weights = gather_columns(scores.weights) if scores.weights is not None else None
    all_prompts = dist_utils.flatten(dist_utils.all_gather_object(prompts))
    adv_all = advantages.of_batch(all_terms, all_prompts, all_weights)
    n_local = len(prompts)
    device = rollout.latents.device
    local = adv_all[rank * n_local : (rank + 1) * n_local].to(device)
    keep = None
    rows_per_group = advantages.group_size
    if best_of_n.enabled:
        keep = best_of_n_indices(
            local.cpu(),
            group_size=advantages.group_size,
            top_k=best_of_n.top_k,
            bottom_k=best_of_n.bottom_k,
        )
        rollout, local = rollout.select(keep), local[keep.to(device)]
        rows_per_group = best_of_n.top_k + best_of_n.bottom_k
    trained = advantages.kept_rows(scores.terms, rows_per_group, scores.weights)
    # Every rank holds the same number of samples (also after Best-of-N), so this rank's
    # slice of the global batch starts at rank * len(rollout).
    result = update(rollout, local, rank * len(rollout), trained)
    return StepUpdate(
        all_terms, all_outputs, all_prompts, adv_all, keep, result, wait_s, all_weights
    )


def update_as_scored(
    rollout: Rollout,
    chunks: list[tuple[slice, PendingScores]],
    parts: list[tuple[int, int]],
    prompts: list[str],
    *,
    advantages: RewardAdvantages,
    best_of_n: BestOfNConfig,
    rank: int,
    accumulator: Callable[[int], GradientAccumulator],
    grad_monitor: Any,
) -> StepUpdate:
    """Accumulates each chunk's whole prompt groups as soon as that chunk is scored.

    Group advantages (and Best-of-N's per-group selection) need only the group's own
    rewards, and the parameters do not move before the single optimiser step, so the
    gradient of a group is the same whenever it is computed: the remaining reward calls
    overlap with the backward passes of the groups already scored. Chunks are taken in
    order (a FIFO service answers in that order anyway), which keeps the step's
    arithmetic independent of reply timing, so runs and resumes stay bit-reproducible.
    Rewards are gathered across ranks afterwards, for logging only.

    Args:
        parts: the row range of the groups each chunk completes (``group_parts``).
        accumulator: ``num_samples ↦`` a fresh :class:`GradientAccumulator`.
        grad_monitor: the gradient-norm skip rule for the step.
    """
    g = advantages.group_size
    kept_per_group = best_of_n.top_k + best_of_n.bottom_k if best_of_n.enabled else g
    n_train = len(rollout) // g * kept_per_group
    acc = accumulator(n_train)
    scored: list[Scores] = []
    all_adv = torch.zeros(len(rollout))
    keeps: list[torch.Tensor] = []
    wait_s = 0.0
    for (_, pending), (start, stop) in zip(chunks, parts, strict=True):
        t0 = time.perf_counter()
        scored.append(pending.result())
        wait_s += time.perf_counter() - t0
        if start == stop:
            continue
        done = Scores.concat(scored)
        terms = {k: v[start:stop] for k, v in done.terms.items()}
        weights = None
        if done.weights is not None:
            weights = {k: v[start:stop] for k, v in done.weights.items()}
        adv = advantages.of_groups(terms, weights)
        all_adv[start:stop] = adv
        part = rollout.rows(start, stop)
        if best_of_n.enabled:
            keep = best_of_n_indices(
                adv, group_size=g, top_k=best_of_n.top_k, bottom_k=best_of_n.bottom_k
            )
            part, adv = part.select(keep), adv[keep]
            keeps.append(keep + start)
        offset = rank * n_train + start // g * kept_per_group
        trained = advantages.kept_rows(terms, kept_per_group, weights)
        acc.accumulate(part, adv.to(rollout.latents.device), sample_offset=offset, keep=trained)
    result = acc.step(grad_monitor)
    scores = Scores.concat(scored)
    return StepUpdate(
        terms=gather_columns(scores.terms),
        outputs=gather_columns(scores.outputs),
        prompts=dist_utils.flatten(dist_utils.all_gather_object(prompts)),
        advantages=dist_utils.all_gather_tensor(all_adv),
        keep=torch.cat(keeps) if best_of_n.enabled else None,
        result=result,
        wait_s=wait_s,
        weights=gather_columns(scores.weights) if scores.weights is not None else None,
    )
