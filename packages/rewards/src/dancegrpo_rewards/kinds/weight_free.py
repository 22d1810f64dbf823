"""Weight-free rewards: deterministic pixel statistics for demos, tests and DDPO's compressibility.

Every kind accepts the option ``modality: image | video`` (default ``image``). For videos
the per-frame statistic is averaged over frames, so scores stay comparable across lengths.

- ``jpeg_compressibility`` — DDPO (Black et al. 2023, "Training Diffusion Models with
  Reinforcement Learning"): ``score = -(JPEG size in kB)`` at a fixed quality
  (``quality``, default 95; 1 kB = 1000 bytes). Higher is more compressible.
- ``brightness`` — mean Rec. 601 luma ``(0.299 R + 0.587 G + 0.114 B) / 255`` in ``[0, 1]``.
- ``color_match`` — the prompt names a colour; ``score = 1 - ||m - c||_2 / sqrt(3)`` in
  ``[0, 1]``, where ``m`` is the image's mean RGB and ``c`` the named colour, both scaled to
  ``[0, 1]``. Smooth in the pixels (no threshold), 1 only for a uniform image of exactly
  that colour. See ``COLOR_TABLE``; the first colour word of the prompt counts.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError, SampleError

#: Named colours understood by ``color_match`` (sRGB, 0-255). "grey" is an alias of "gray".
COLOR_TABLE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "brown": (139, 69, 19),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}

_WORD = re.compile(r"[a-z]+")
_LUMA = np.array([0.299, 0.587, 0.114])


def prompt_color(prompt: str) -> str | None:
    """The first word of ``prompt`` (case-insensitive) that names a colour in ``COLOR_TABLE``."""
    for word in _WORD.findall(prompt.lower()):
        if word in COLOR_TABLE:
            return word
    return None


def mean_rgb(frames: np.ndarray) -> np.ndarray:
    """Mean colour of ``uint8 [H, W, 3]`` or ``[T, H, W, 3]`` frames, in ``[0, 1]``, shape (3,)."""
    # Exact integer sums, row by row: numpy reduces a contiguous [rows, W * 3] array over
    # its first axis with vector adds, ~15x faster than ``reshape(-1, 3).mean(0)``'s
    # strided 3-wide reduction (5 ms -> 0.4 ms for 512 x 512).
    row_sums = frames.reshape(-1, frames.shape[-2] * 3).sum(axis=0, dtype=np.uint64)
    totals = row_sums.reshape(-1, 3).sum(axis=0)
    return totals / (255.0 * (frames.size // 3))


def color_match_score(frames: np.ndarray, color: str) -> float:
    """``1 - ||mean_rgb(frames) - COLOR_TABLE[color] / 255||_2 / sqrt(3)``, in ``[0, 1]``."""
    target = np.asarray(COLOR_TABLE[color], dtype=np.float64) / 255.0
    return float(1.0 - np.linalg.norm(mean_rgb(frames) - target) / math.sqrt(3.0))


def brightness_score(frames: np.ndarray) -> float:
    """Mean Rec. 601 luma of the frames, in ``[0, 1]``."""
    return float(mean_rgb(frames) @ _LUMA)


def jpeg_kilobytes(image: np.ndarray, quality: int) -> float:
    """Size in kB (1000 bytes) of ``uint8 [H, W, 3]`` encoded as JPEG at ``quality``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.tell() / 1000.0


class _WeightFreeReward(Reward):
    """Shared option parsing: ``modality`` plus each kind's own keys."""

    #: Option keys the kind accepts besides ``modality``, with their defaults.
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        known = {"modality", *self.option_defaults}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise RewardConfigError(
                f"rewards.{name}.options.{unknown[0]}: unknown option for kind {self.kind!r}; "
                f"known options: {', '.join(sorted(known))}"
            )
        modality = self.options.get("modality", "image")
        if modality not in ("image", "video"):
            raise RewardConfigError(
                f"rewards.{name}.options.modality: must be 'image' or 'video', got {modality!r}"
            )
        self.modality = modality
        self.settings = {**self.option_defaults, **self.options, "modality": modality}
        payload = json.dumps({"kind": self.kind, **self.settings}, sort_keys=True)
        # Computed once: the server echoes the version in every ScoreResponse.
        self._version = f"{self.kind}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score",)

    @property
    def version(self) -> str:
        return self._version

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        values = [self.score_one(m, p) for m, p in zip(batch.media, batch.prompts, strict=True)]
        return {"score": np.asarray(values, dtype=np.float32)}

    @abc.abstractmethod
    def score_one(self, frames: np.ndarray, prompt: str) -> float:
        """The score of one sample (``[H, W, 3]`` or ``[T, H, W, 3]``)."""


class JpegCompressibility(_WeightFreeReward):
    """DDPO's compressibility: negative JPEG size in kB (videos: mean over frames)."""

    kind = "jpeg_compressibility"
    description = "Negative JPEG size in kB at a fixed quality (DDPO compressibility)"
    option_defaults: ClassVar[dict[str, Any]] = {"quality": 95}

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        quality = self.settings["quality"]
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise RewardConfigError(
                f"rewards.{name}.options.quality: must be an integer in [1, 95], got {quality!r}"
            )
        self.quality = quality

    def score_one(self, frames: np.ndarray, prompt: str) -> float:
        if frames.ndim == 3:
            return -jpeg_kilobytes(frames, self.quality)
        return -float(np.mean([jpeg_kilobytes(f, self.quality) for f in frames]))


class Brightness(_WeightFreeReward):
    """Mean Rec. 601 luma in ``[0, 1]``."""

    kind = "brightness"
    description = "Mean Rec. 601 luma in [0, 1]"

    def score_one(self, frames: np.ndarray, prompt: str) -> float:
        return brightness_score(frames)


class ColorMatch(_WeightFreeReward):
    """Closeness of the mean colour to the colour the prompt names, in ``[0, 1]``."""

    kind = "color_match"
    description = "1 - |mean RGB - colour named in the prompt| / sqrt(3), in [0, 1]"
    requires_prompt = True
    warmup_prompt = "a red square"

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        if prompt_color(prompt) is None:
            raise SampleError(
                index,
                "prompt",
                f"names no known colour (known: {', '.join(COLOR_TABLE)}): {prompt[:80]!r}",
            )

    def score_one(self, frames: np.ndarray, prompt: str) -> float:
        color = prompt_color(prompt)
        if color is None:  # the server validated already; direct callers get the same error
            raise SampleError(0, "prompt", f"names no known colour: {prompt[:80]!r}")
        return color_match_score(frames, color)
