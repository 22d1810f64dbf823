"""Rewards built from another reward: ``video_frames`` and ``threshold``.

Both take the inner reward as a nested spec in their options — the same mapping a
top-level reward's options would be, plus its ``kind``::

    options:
      reward: {kind: hps, checkpoint: ..., device: cuda}

The inner reward is constructed (and named ``<outer>.reward``) when the outer one is,
so its option and checkpoint errors surface at start-up too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dancegrpo_rewards.base import (
    Reward,
    RewardBatch,
    RewardConfigError,
    mirror_sample_requirements,
)
from dancegrpo_rewards.kinds.checkpoints import version_string
from dancegrpo_rewards.kinds.options import OptionError, check_positive, parse_options


def build_inner_reward(outer_name: str, spec: Mapping[str, Any]) -> Reward:
    """Constructs the reward described by a nested ``{kind: ..., **options}`` spec."""
    from dancegrpo_rewards.registry import reward_class

    kind = spec.get("kind")
    if not isinstance(kind, str) or not kind:
        raise RewardConfigError(
            f"reward {outer_name!r}: option 'reward.kind' must name a reward kind, got {kind!r}"
        )
    try:
        cls = reward_class(kind)
    except KeyError as err:
        raise RewardConfigError(
            f"reward {outer_name!r}: option 'reward.kind': {err.args[0]}"
        ) from None
    return cls(f"{outer_name}.reward", {k: v for k, v in spec.items() if k != "kind"})


def _check_spec(spec: dict[str, Any] | None) -> None:
    if not spec:
        raise OptionError("reward", "required: the inner reward as {kind: ..., <its options>}")


def _mirror_requirements(outer: Reward, inner: Reward) -> None:
    if inner.group_wise:  # the wrappers score per sample (video_frames even per frame)
        raise RewardConfigError(
            f"reward {outer.name!r}: option 'reward': kind {inner.kind!r} is group-wise; "
            f"{outer.kind} needs a per-sample reward"
        )
    mirror_sample_requirements(outer, inner)


def sample_frame_indices(num_frames: int, k: int) -> np.ndarray:
    """``min(k, T)`` evenly spaced frame indices of a ``T``-frame video, first and last included.

    ``round(linspace(0, T-1, k))``; for ``T >= k`` the spacing is ≥ 1 so indices are distinct.
    """
    count = min(k, num_frames)
    return np.round(np.linspace(0, num_frames - 1, count)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class VideoFramesOptions:
    """Options of ``video_frames``.

    Attributes:
        reward: the inner *image* reward, ``{kind: ..., <its options>}``.
        num_frames: frames scored per video (evenly spaced; all frames if fewer).
        frame_batch_size: frames per inner ``score`` call (memory bound, not numerics).
    """

    reward: dict[str, Any] | None = None
    num_frames: int = 8
    frame_batch_size: int = 64

    def __post_init__(self) -> None:
        _check_spec(self.reward)
        check_positive("num_frames", self.num_frames)
        check_positive("frame_batch_size", self.frame_batch_size)


class VideoFramesReward(Reward):
    """Any image reward averaged over ``num_frames`` frames of each video (e.g. HPS on frames).

    Outputs: the inner reward's outputs, each the mean over the sampled frames.
    """

    kind = "video_frames"
    modality = "video"
    description = "an image reward averaged over evenly sampled video frames"

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(VideoFramesOptions, options, reward_name=name)
        assert self.config.reward is not None
        self.inner = build_inner_reward(name, self.config.reward)
        if self.inner.modality != "image":
            raise RewardConfigError(
                f"reward {name!r}: option 'reward': kind {self.inner.kind!r} scores {self.inner.modality}, "
                "video_frames needs an image reward"
            )
        _mirror_requirements(self, self.inner)
        self._version = version_string(
            self.kind, {"reward": self.inner.version}, {"num_frames": self.config.num_frames}
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.inner.output_names

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        self.inner.load()

    def warmup_metadata(self) -> Mapping[str, Any] | None:
        return self.inner.warmup_metadata()

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        # Every sampled frame shares the video's prompt and metadata; check them once.
        self.inner.validate_sample(index, prompt, media[0], metadata)

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """Scores the sampled frames of every video in one flattened inner batch, then averages."""
        owners: list[int] = []
        frames: list[np.ndarray] = []
        for i, video in enumerate(batch.media):
            for t in sample_frame_indices(video.shape[0], self.config.num_frames):
                owners.append(i)
                frames.append(video[t])
        flat = RewardBatch(
            prompts=[batch.prompts[i] for i in owners],
            media=frames,
            condition_images=[batch.condition_images[i] for i in owners],
            metadata=[batch.metadata[i] for i in owners],
        )
        step = self.config.frame_batch_size
        chunks = [
            self.inner.score(flat.select(range(s, min(s + step, len(flat)))))
            for s in range(0, len(flat), step)
        ]
        owner_index = np.asarray(owners, dtype=np.int64)
        counts = np.bincount(owner_index, minlength=len(batch)).astype(np.float64)
        result = {}
        for out in self.output_names:
            values = np.concatenate([c[out] for c in chunks]).astype(np.float64)
            sums = np.bincount(owner_index, weights=values, minlength=len(batch))
            result[out] = (sums / counts).astype(np.float32)
        return result


@dataclasses.dataclass(frozen=True)
class ThresholdOptions:
    """Options of ``threshold``.

    Attributes:
        reward: the inner reward, ``{kind: ..., <its options>}``.
        threshold: ``binary = 1 if raw >= threshold else 0`` (paper: HPS at 0.28).
        output: which inner output is thresholded (default: its first output).
    """

    reward: dict[str, Any] | None = None
    threshold: float | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        _check_spec(self.reward)
        if self.threshold is None:
            raise OptionError("threshold", "required: binary = 1 if the inner output >= threshold")
        if not np.isfinite(self.threshold):
            raise OptionError("threshold", f"must be finite, got {self.threshold}")


class ThresholdReward(Reward):
    """Sparse binary reward: ``binary = 1.0 if raw >= threshold else 0.0``; ``raw`` passes through."""

    kind = "threshold"
    description = "binary reward: 1 if an inner reward's output >= threshold, else 0"

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(ThresholdOptions, options, reward_name=name)
        assert self.config.reward is not None and self.config.threshold is not None
        self.inner = build_inner_reward(name, self.config.reward)
        self.output = self.config.output or self.inner.output_names[0]
        if self.output not in self.inner.output_names:
            raise RewardConfigError(
                f"reward {name!r}: option 'output': {self.output!r} is not an output of kind "
                f"{self.inner.kind!r} (outputs: {', '.join(self.inner.output_names)})"
            )
        self.threshold = float(self.config.threshold)
        self.modality = self.inner.modality  # type: ignore[misc]
        _mirror_requirements(self, self.inner)
        self._version = version_string(
            self.kind,
            {"reward": self.inner.version},
            {"threshold": self.threshold, "output": self.output},
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("binary", "raw")

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        self.inner.load()

    def warmup_metadata(self) -> Mapping[str, Any] | None:
        return self.inner.warmup_metadata()

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        self.inner.validate_sample(index, prompt, media, metadata)

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``raw`` = the inner output, ``binary`` = ``raw >= threshold`` as float32 0/1."""
        raw = np.asarray(self.inner.score(batch)[self.output], dtype=np.float32)
        return {"binary": (raw >= self.threshold).astype(np.float32), "raw": raw}
