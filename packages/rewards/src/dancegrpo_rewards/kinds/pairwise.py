"""``pairwise_preference``: a group-wise reward, each sample's win rate against the others
of its prompt group under a pairwise preference judge (Pref-GRPO, Wang et al. 2025,
"Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement Learning",
github.com/CodeGoat24/Pref-GRPO).

Pref-GRPO replaces a pointwise score with a relative one: within a group of G samples of
one prompt every unordered pair ``(i, j), i < j`` is shown to a judge with sample ``i`` as
"Image 1"; the winner gains 1, an undecided judgement gives each ½ (its
``_pairwise_win_rate``, ``fastvideo/rewards/unifiedreward_think.py``), and a sample's
reward is ``wins / comparisons`` = ``wins / (G - 1)``. Win rates of a group always average
½ (each pair hands out exactly one win), so group normalisation sees only their spread.
Pref-GRPO rounds each rate to 3 decimals; we keep float32 (a difference below 5e-4).

A judge answers, per ordered pair, the probability that the first sample beats the second
(1, 0 or ½ for hard judges). ``both_orders: true`` also asks ``(j, i)`` and counts both
(2(G-1) comparisons per sample), cancelling a judge's position bias; Pref-GRPO asks once.

Judges (option ``judge.type``, code in :mod:`dancegrpo_rewards.kinds.pairwise_judges`):

- ``score``: compares two samples by any per-sample reward (``judge.reward``, a nested
  ``{kind: ..., <its options>}`` as ``threshold`` takes it): the first wins when its
  ``output`` exceeds the other's by more than ``margin``, ties within it. Weight-free with
  a weight-free inner reward; each sample is scored once, not once per pair.
- ``vlm``: a pairwise VLM judge behind an OpenAI-compatible API (the ``vlm_judge`` kind's
  client), by default UnifiedReward-Think's pairwise image prompt and answer format.

Groups come from ``ScoreRequest.group_sizes``; the server never splits one across
batches, and each group is judged on its own, so results do not depend on batching.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dancegrpo_rewards.base import (
    Reward,
    RewardBatch,
    RewardConfigError,
    mirror_sample_requirements,
)
from dancegrpo_rewards.kinds.checkpoints import version_string
from dancegrpo_rewards.kinds.options import OptionError, parse_options
from dancegrpo_rewards.kinds.pairwise_judges import JUDGE_TYPES, PairwiseJudge

DOCS_SECTION = "pairwise_preference"


def pair_schedule(group_sizes: Sequence[int], *, both_orders: bool) -> list[tuple[int, int]]:
    """The ordered ``(first, second)`` batch indices compared: every pair ``i < j`` of each
    group (consecutive runs of ``group_sizes``), and ``(j, i)`` too with ``both_orders``."""
    pairs: list[tuple[int, int]] = []
    start = 0
    for size in group_sizes:
        for i, j in itertools.combinations(range(start, start + size), 2):
            pairs.append((i, j))
            if both_orders:
                pairs.append((j, i))
        start += size
    return pairs


def win_rates(
    num_items: int, pairs: Sequence[tuple[int, int]], first_wins: Sequence[float]
) -> np.ndarray:
    """Pref-GRPO's win rate: ``wins_i / comparisons_i`` per item (float64 ``(N,)``).

    Args:
        num_items: ``N``.
        pairs: the compared ``(first, second)`` item indices.
        first_wins: per pair, the first item's share of the win in [0, 1] (1: it won,
            0: it lost, ½: a tie); the second item gets ``1 - first_wins``.

    An item never compared has no win rate: ``ValueError``.
    """
    wins = np.zeros(num_items, np.float64)
    counts = np.zeros(num_items, np.int64)
    for (i, j), p in zip(pairs, first_wins, strict=True):
        if not 0.0 <= p <= 1.0:
            raise ValueError(
                f"a judge's first_wins must lie in [0, 1], got {p} for pair ({i}, {j})"
            )
        wins[i] += p
        wins[j] += 1.0 - p
        counts[i] += 1
        counts[j] += 1
    if (counts == 0).any():
        raise ValueError(f"items {np.flatnonzero(counts == 0).tolist()} were never compared")
    return wins / counts


@dataclasses.dataclass(frozen=True)
class PairwisePreferenceOptions:
    """Options of ``pairwise_preference``.

    Attributes:
        judge: the pairwise judge, ``{type: score | vlm, <its options>}``.
        both_orders: judge every pair in both orders (cancels position bias; twice the calls).
    """

    judge: dict[str, Any] | None = None
    both_orders: bool = False

    def __post_init__(self) -> None:
        if not self.judge:
            raise OptionError("judge", "required: {type: score | vlm, <its options>}")
        kind = self.judge.get("type")
        if kind not in JUDGE_TYPES:
            raise OptionError("judge.type", f"must be one of {sorted(JUDGE_TYPES)}, got {kind!r}")


class PairwisePreferenceReward(Reward):
    """Group-wise reward: each sample's pairwise win rate within its group (``win_rate``,
    in [0, 1], a group's mean is ½)."""

    kind = "pairwise_preference"
    description = "pairwise win rate within each prompt group (Pref-GRPO), group-wise"
    group_wise = True
    min_group_size = 2

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(PairwisePreferenceOptions, options, reward_name=name)
        assert self.config.judge is not None
        spec = {k: v for k, v in self.config.judge.items() if k != "type"}
        try:
            self.judge: PairwiseJudge = JUDGE_TYPES[self.config.judge["type"]](
                f"{name}.judge", spec
            )
        except OptionError as err:
            raise RewardConfigError(f"reward {name!r}: judge {err}") from None
        inner = self.judge.requirements
        self.modality = inner.modality  # type: ignore[misc]
        mirror_sample_requirements(self, inner)
        self.warmup_prompt = inner.warmup_prompt  # type: ignore[misc]
        self._version = version_string(
            self.kind, {"judge": self.judge.version}, {"both_orders": self.config.both_orders}
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("win_rate",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        self.judge.load()

    def warmup_metadata(self) -> Mapping[str, Any] | None:
        return self.judge.requirements.warmup_metadata()

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        self.judge.requirements.validate_sample(index, prompt, media, metadata)

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """Win rate of every sample within its group (one judge call for the batch)."""
        sizes = batch.group_sizes if batch.group_sizes is not None else (len(batch),)
        pairs = pair_schedule(sizes, both_orders=self.config.both_orders)
        first_wins = self.judge.compare(batch, pairs)
        return {"win_rate": win_rates(len(batch), pairs, first_wins).astype(np.float32)}
