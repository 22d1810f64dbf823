"""``data:``: the prompts (:class:`DataConfig`), from one source or several prompt
sources each scored by its own reward terms (:class:`PromptSource`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from dancegrpo_trainer.config.errors import _check
from dancegrpo_trainer.config.rewards import RewardEndpoint

_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass
class PromptSource:
    """One prompt source of a routed run (``data.sources``): its prompts and the reward
    terms that score them.

    Attributes:
        name: the source's name in metrics (``source/<name>/...``); letters, digits, ``_.-``.
        train_prompts, eval_prompts: as ``data.train_prompts`` / ``data.eval_prompts``.
        rewards: the ``rewards.endpoints`` labels that score this source's prompts, as a
            list (each at its endpoint's ``weight``) or a mapping ``label: weight``. Only
            these endpoints are called for its samples; a group's advantage is the weighted
            sum of its own rewards' group-normalised advantages.
        share: sampling share of the source (then every source sets one): each prompt
            comes from a source drawn with probability ``share / Σ share``. Unset: the
            sources' prompts are pooled, each prompt equally likely.
    """

    name: str = ""
    train_prompts: str | list[str] = dataclasses.field(default_factory=list)
    eval_prompts: str | list[str] = dataclasses.field(default_factory=list)
    rewards: list[str] | dict[str, float] = dataclasses.field(default_factory=list)
    share: float | None = None

    def reward_weights(self, endpoints: Sequence[RewardEndpoint]) -> dict[str, float]:
        """``label → weight`` of the terms that score this source."""
        if isinstance(self.rewards, dict):
            return {str(k): float(v) for k, v in self.rewards.items()}
        weight = {ep.label: ep.weight for ep in endpoints}
        return {label: weight[label] for label in self.rewards}

    def validate(self, where: str, endpoints: Sequence[RewardEndpoint]) -> None:
        _check(
            bool(_SOURCE_NAME.fullmatch(self.name)),
            f"{where}.name",
            f"is required: letters, digits, '_', '.', '-' (used in metric names), got {self.name!r}",
        )
        _check(
            bool(self.train_prompts),
            f"{where}.train_prompts",
            "is required: a prompt file (.txt/.jsonl) or a list of prompts",
        )
        _check(
            bool(self.rewards),
            f"{where}.rewards",
            "is required: the rewards.endpoints labels that score this source's prompts",
        )
        labels = [ep.label for ep in endpoints]
        names = list(self.rewards)
        _check(
            len(set(names)) == len(names),
            f"{where}.rewards",
            f"lists a label twice: {names}",
        )
        for label in names:
            _check(
                label in labels,
                f"{where}.rewards",
                f"{label!r} is not a rewards.endpoints label (labels: {labels}; an endpoint's "
                "label is its name, or reward/output)",
            )
        if isinstance(self.rewards, dict):
            for label, weight in self.rewards.items():
                _check(
                    isinstance(weight, (int, float))
                    and not isinstance(weight, bool)
                    and weight > 0,
                    f"{where}.rewards.{label}",
                    f"weight must be a number > 0 (drop the label to disable it), got {weight!r}",
                )
        if self.share is not None:
            _check(self.share > 0, f"{where}.share", f"must be > 0, got {self.share}")


@dataclasses.dataclass
class DataConfig:
    """Prompts.

    Attributes:
        train_prompts: a ``.txt`` file (one prompt per line), a ``.jsonl`` file (rows with
            ``prompt`` and optional ``condition_image`` path for I2V, or GenEval's rows
            ``{"tag", "include", "exclude", "prompt"}``, whose spec becomes the prompt's
            metadata, sent to endpoints with ``metadata: true``), or an inline list.
        eval_prompts: the same, for held-out evaluation (may be empty to skip eval).
        sources: instead of ``train_prompts``/``eval_prompts``, several prompt sources,
            each scored by the reward terms it names (:class:`PromptSource`), e.g. GenEval
            prompts by ``geneval`` and OCR prompts by ``ocr`` in one run.
        embedding_cache: folder written by ``dancegrpo-train preprocess``; when set,
            prompt conditioning is read from it instead of running text encoders.
        shuffle: reshuffle training prompts every epoch (seeded).
    """

    train_prompts: str | list[str] = dataclasses.field(default_factory=list)
    eval_prompts: str | list[str] = dataclasses.field(default_factory=list)
    sources: list[PromptSource] = dataclasses.field(default_factory=list)
    embedding_cache: str | None = None
    shuffle: bool = True

    def validate(self, endpoints: Sequence[RewardEndpoint] = ()) -> None:
        if not self.sources:
            _check(
                bool(self.train_prompts),
                "data.train_prompts",
                "is required: a prompt file (.txt/.jsonl) or a list of prompts (or data.sources)",
            )
            return
        for key in ("train_prompts", "eval_prompts"):
            _check(
                not getattr(self, key),
                f"data.{key}",
                f"must be empty when data.sources is set (each source names its own {key})",
            )
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]", endpoints)
        names = [s.name for s in self.sources]
        _check(len(set(names)) == len(names), "data.sources", f"names must be unique, got {names}")
        shares = [s.share is not None for s in self.sources]
        _check(
            all(shares) or not any(shares),
            f"data.sources[{shares.index(False) if not all(shares) else 0}].share",
            "set share on every source or on none (none: the sources' prompts are pooled)",
        )
        used = {label for s in self.sources for label in s.rewards}
        for i, ep in enumerate(endpoints):
            _check(
                ep.label in used,
                f"rewards.endpoints[{i}]",
                f"{ep.label!r} scores no prompt source: add it to a data.sources[*].rewards "
                "or drop the endpoint",
            )
