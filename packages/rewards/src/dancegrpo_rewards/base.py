"""The reward interface every reward kind implements.

A reward receives a validated, decoded batch (``RewardBatch``) and returns one float32
array of shape ``(N,)`` per declared output. The server owns decoding, validation of
the wire format, batching and error mapping; a reward only adds its own checks (e.g.
"requires metadata") by raising ``SampleError``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

Modality = Literal["image", "video"]


class SampleError(ValueError):
    """A sample is malformed; mapped to gRPC ``INVALID_ARGUMENT``.

    ``index`` is the sample's index in its request, ``field`` the offending field
    (e.g. ``"media.raw.shape"``, ``"prompt"``, ``"metadata.geneval"``) and ``description``
    what is wrong with it (sent to clients as a ``google.rpc.BadRequest`` field violation).
    """

    def __init__(self, index: int, field: str, message: str) -> None:
        super().__init__(f"samples[{index}].{field}: {message}")
        self.index = index
        self.field = field
        self.description = message


class RewardConfigError(ValueError):
    """A reward's options are wrong; raised at start-up with the offending key or file."""


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """A decoded batch of samples.

    Attributes:
        prompts: one prompt per sample (may be empty strings when not required).
        media: one ``uint8`` array per sample, ``[H, W, 3]`` for images or
            ``[T, H, W, 3]`` for videos. Sizes may differ between samples. The server passes
            read-only views of the request bytes: copy before modifying in place.
        condition_images: per sample a ``uint8 [H, W, 3]`` conditioning image or ``None``.
        metadata: per sample a plain dict (``{"geneval": {...}, "attributes": {...}}``)
            or ``None``.
        group_sizes: the consecutive groups of the batch (each >= 1, summing to its
            length) for group-wise rewards, whose batches always carry them (the server
            merges whole groups only); ``None`` for per-sample rewards.
    """

    prompts: Sequence[str]
    media: Sequence[np.ndarray]
    condition_images: Sequence[np.ndarray | None]
    metadata: Sequence[Mapping[str, Any] | None]
    group_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not (len(self.media) == len(self.condition_images) == len(self.metadata) == n):
            raise ValueError("RewardBatch fields must all have one entry per sample")
        if self.group_sizes is not None:
            sizes = tuple(int(s) for s in self.group_sizes)
            if any(s < 1 for s in sizes) or sum(sizes) != n:
                raise ValueError(f"group_sizes {list(sizes)} must be >= 1 and sum to {n}")
            object.__setattr__(self, "group_sizes", sizes)

    def __len__(self) -> int:
        return len(self.prompts)

    def group_spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each group (the whole batch when it has no groups)."""
        sizes = self.group_sizes if self.group_sizes is not None else (len(self),)
        bounds = np.cumsum((0, *sizes)).tolist()
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def select(self, indices: Sequence[int]) -> RewardBatch:
        """The sub-batch at ``indices`` (in that order), without groups."""
        return RewardBatch(
            prompts=[self.prompts[i] for i in indices],
            media=[self.media[i] for i in indices],
            condition_images=[self.condition_images[i] for i in indices],
            metadata=[self.metadata[i] for i in indices],
        )

    def groups(self, first: int, stop: int) -> RewardBatch:
        """The sub-batch of whole groups ``first..stop-1`` (a group-wise batch's chunk)."""
        spans = self.group_spans()
        assert self.group_sizes is not None and 0 <= first < stop <= len(spans)
        chunk = self.select(range(spans[first][0], spans[stop - 1][1]))
        return dataclasses.replace(chunk, group_sizes=self.group_sizes[first:stop])

    @staticmethod
    def concat(batches: Sequence[RewardBatch]) -> RewardBatch:
        """Concatenates batches in order (what the dynamic batcher does); groups stay whole
        (the result has groups when every part has them)."""
        grouped = all(b.group_sizes is not None for b in batches)
        return RewardBatch(
            prompts=[p for b in batches for p in b.prompts],
            media=[m for b in batches for m in b.media],
            condition_images=[c for b in batches for c in b.condition_images],
            metadata=[d for b in batches for d in b.metadata],
            group_sizes=tuple(s for b in batches for s in b.group_sizes or ()) if grouped else None,
        )


class Reward(abc.ABC):
    """Base class of every reward kind.

    Subclasses set the class attributes, parse their options in ``__init__`` (raising
    ``RewardConfigError`` that names the key or file), load weights in ``load()`` and
    implement ``score()``. ``score`` must be deterministic and batch-invariant: scoring
    a batch equals scoring its samples one by one.

    Lifecycle (driven by the server): ``__init__(name, options)`` → ``load()`` →
    ``warmup()`` → many ``score()`` calls from one worker thread at a time.
    """

    #: The ``kind:`` value in the service YAML.
    kind: ClassVar[str]
    #: The media the reward scores.
    modality: ClassVar[Modality] = "image"
    #: Human-readable one-liner shown by ``ListRewards``.
    description: ClassVar[str] = ""
    #: Whether a non-empty prompt is required for every sample.
    requires_prompt: ClassVar[bool] = False
    #: Whether a conditioning image is required for every sample.
    requires_condition_image: ClassVar[bool] = False
    #: Whether metadata is required for every sample.
    requires_metadata: ClassVar[bool] = False
    #: Whether ``metadata.geneval`` may be sent (always true when ``requires_metadata``).
    accepts_geneval: ClassVar[bool] = False
    #: ``metadata.attributes`` keys the reward documents; the server rejects any other key.
    attribute_keys: ClassVar[frozenset[str]] = frozenset()
    #: Prompt of the warm-up sample (rewards that parse prompts override it).
    warmup_prompt: ClassVar[str] = "a photo"
    #: Group-wise reward (``SCORING_SCOPE_GROUP``): a sample's outputs depend on its whole
    #: group (``RewardBatch.group_sizes``). ``score`` must score each group on its own:
    #: scoring several groups in one batch equals scoring them one by one.
    group_wise: ClassVar[bool] = False
    #: Group-wise rewards: the smallest group ``score`` accepts (smaller ones are rejected
    #: with ``INVALID_ARGUMENT`` on ``group_sizes[k]`` before they reach a batch).
    min_group_size: ClassVar[int] = 1

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = dict(options)

    @property
    @abc.abstractmethod
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs ``score`` returns, e.g. ``("score",)``."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """A stable version string: checkpoint digest, or digest of the options."""

    def load(self) -> None:  # noqa: B027 - optional hook
        """Loads weights (called once before serving). Weight-free rewards do nothing."""

    def warmup(self) -> None:
        """Runs one tiny batch (one sample, or one smallest group) so the first real
        request is not slow."""
        size = 64
        media = np.zeros((size, size, 3), np.uint8)
        if self.modality == "video":
            media = np.zeros((2, size, size, 3), np.uint8)
        meta = self.warmup_metadata()
        cond = np.zeros((size, size, 3), np.uint8) if self.requires_condition_image else None
        n = max(1, self.min_group_size) if self.group_wise else 1
        groups = (n,) if self.group_wise else None
        self.score(
            RewardBatch([self.warmup_prompt] * n, [media] * n, [cond] * n, [meta] * n, groups)
        )

    def warmup_metadata(self) -> Mapping[str, Any] | None:
        """Metadata used for the warm-up sample (rewards that require metadata override)."""
        return None

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        """Reward-specific checks on one decoded sample; raise ``SampleError``."""
        del index, prompt, media, metadata

    @abc.abstractmethod
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """Scores a batch: returns ``{output_name: float32 array of shape (N,)}``."""


#: What a sample must or may carry for a reward, per :class:`Reward`'s class attributes.
SAMPLE_REQUIREMENTS = (
    "requires_prompt",
    "requires_condition_image",
    "requires_metadata",
    "accepts_geneval",
    "attribute_keys",
)


def mirror_sample_requirements(outer: Reward, inner: Reward) -> None:
    """Gives ``outer`` (a reward that passes its samples on to ``inner``) ``inner``'s
    :data:`SAMPLE_REQUIREMENTS`: the server checks them per sample against ``outer``, so a
    wrapper needs, and accepts, what its inner reward does."""
    for name in SAMPLE_REQUIREMENTS:
        setattr(outer, name, getattr(inner, name))
