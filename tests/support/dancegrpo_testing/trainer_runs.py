"""What the trainer tests inspect of a training run, written once.

- ``trainable_state``: a copy of the weights a ``Trainer`` trains (``requires_grad``);
- ``RecordingTrainer``: the ``Trainer``, remembering the last one built and its initial
  trainable weights; patch it in as ``dancegrpo_trainer.trainer.Trainer`` to inspect what
  ``train_main`` (the CLI) builds;
- ``records``: the rows of one split of a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from dancegrpo_trainer.trainer import Trainer


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable module's parameters that require gradients."""
    module = trainer.policy.trainable_module()
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class RecordingTrainer(Trainer):
    """The CLI's Trainer, remembering itself (``last``) and its initial trainable weights
    (``initial``)."""

    last: ClassVar[RecordingTrainer | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial = trainable_state(self)
        RecordingTrainer.last = self


def records(run_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows of ``run_dir`` whose ``split`` is ``split``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]
