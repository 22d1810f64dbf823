"""``RednessScorer``: the in-process stand-in for a reward service that the trainer tests
hand to ``Trainer(..., scorer=...)``, written once.

It scores each image by its mean red minus its mean blue (pixels scaled to ``[0, 1]``):
weight-free, deterministic, and something a few GRPO steps on a tiny policy can move. It
keeps the scorer contract of ``dancegrpo_trainer.scoring``: ``submit`` returns a resolved
future of ``Scores``, ``close`` does nothing.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

import numpy as np

from dancegrpo_trainer.scoring import Scores


class RednessScorer:
    """Mean red minus mean blue of each ``[H, W, 3]`` frame, reported under ``label`` (as
    its term and its output), except that a prompt containing a word of ``constant``
    scores 0.5 whatever the frames (so a group of those has all-equal rewards). Remembers
    the shape of every batch of frames it was sent (``shapes``)."""

    def __init__(self, constant: Sequence[str] = (), label: str = "r/score") -> None:
        self.constant = tuple(constant)
        self.label = label
        self.shapes: list[tuple[int, ...]] = []

    def submit(
        self,
        frames: Any,
        prompts: Sequence[str],
        condition_images: Any = None,
        metadata: Any = None,
    ) -> concurrent.futures.Future:
        x = np.asarray(frames, dtype=np.float32) / 255.0
        self.shapes.append(x.shape)
        score = (x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2))).astype(np.float32)
        for j, prompt in enumerate(prompts):
            if any(word in prompt for word in self.constant):
                score[j] = 0.5
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(Scores({self.label: score}, {self.label: score}))
        return future

    def close(self) -> None:
        pass
