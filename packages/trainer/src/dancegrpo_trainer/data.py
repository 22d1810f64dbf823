"""Prompts: loading prompt files and a deterministic, resumable prompt sampler."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dancegrpo_trainer.config import ConfigError, expand_env
from dancegrpo_trainer.geneval_prompts import geneval_metadata


@dataclasses.dataclass
class PromptRecord:
    """One prompt, with its conditioning image path for image-to-video tasks and its
    sample metadata (``{"geneval": {...}}`` from a GenEval row) for rewards that need it."""

    prompt: str
    condition_image: str | None = None
    metadata: dict[str, Any] | None = None


def prompt_record(row: Mapping[str, Any], base: Path, where: str) -> PromptRecord:
    """One JSONL prompt row: ``prompt``, optional ``condition_image`` (a path relative to
    ``base``, the file's folder) and optional GenEval spec (``tag``, ``include``,
    ``exclude``; see :mod:`dancegrpo_trainer.geneval_prompts`).

    ``where`` (e.g. ``data.train_prompts: p.jsonl:3``) prefixes error messages.
    """
    if "prompt" not in row:
        raise ValueError(f"{where}: no 'prompt' key")
    try:
        metadata = geneval_metadata(row)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    image = row.get("condition_image")
    if image is not None and not Path(image).is_absolute():
        image = str(base / image)
    return PromptRecord(str(row["prompt"]), image, metadata)


def load_prompts(source: str | Sequence[str], field: str) -> list[PromptRecord]:
    """Reads prompts from an inline list, a ``.txt`` file (one per line; blank lines and
    ``#`` comments skipped) or a ``.jsonl`` file (rows ``{"prompt": ..., "condition_image":
    ...}``, or GenEval's ``{"tag", "include", "exclude", "prompt"}`` rows, whose spec
    becomes the record's ``metadata``; see :func:`prompt_record`).

    ``field`` names the config field in error messages.
    """
    if not isinstance(source, str):
        return [PromptRecord(str(p)) for p in source]
    path = Path(expand_env(source, field))
    if not path.is_file():
        raise FileNotFoundError(f"{field}: prompt file {path} does not exist")
    records = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                where = f"{field}: {path}:{lineno}"
                records.append(prompt_record(json.loads(line), path.parent, where))
    else:
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                records.append(PromptRecord(line.strip()))
    if not records:
        raise ValueError(f"{field}: {path} contains no prompts")
    return records


def load_condition_images(records: Sequence[PromptRecord]) -> torch.Tensor | None:
    """``uint8 [N, H, W, 3]`` conditioning images of ``records`` (``None`` for text-only)."""
    paths = [r.condition_image for r in records]
    if all(p is None for p in paths):
        return None
    if any(p is None for p in paths):
        raise ValueError("either every prompt has a condition_image or none does")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    sizes = [image.shape[:2] for image in images]
    if len(set(sizes)) > 1:
        other = next(i for i, size in enumerate(sizes) if size != sizes[0])
        raise ValueError(
            f"condition images batched together must share one size: {paths[0]} is "
            f"{sizes[0][1]}x{sizes[0][0]}, {paths[other]} is {sizes[other][1]}x{sizes[other][0]}; "
            "resize the prompt file's images to one size (e.g. the training resolution; the "
            "policy resizes them to its own size before encoding)"
        )
    return torch.from_numpy(np.stack(images))


def repeat_metadata(
    records: Sequence[PromptRecord], repeats: int
) -> list[dict[str, Any] | None] | None:
    """Per-sample metadata of ``records``, each repeated ``repeats`` times (prompt-major,
    the order of the samples rolled out from them); ``None`` when no record has any."""
    if all(r.metadata is None for r in records):
        return None
    return [r.metadata for r in records for _ in range(repeats)]


def require_metadata(records: Sequence[PromptRecord], field: str, asked_by: str) -> None:
    """Raises ``ConfigError`` naming ``asked_by`` (e.g. ``rewards.endpoints[0].metadata``)
    and ``field`` when a prompt of ``records`` (read from ``field``) carries no metadata."""
    missing = [r.prompt for r in records if r.metadata is None]
    if missing:
        raise ConfigError(
            f"{asked_by}: is true, but {len(missing)} of the {len(records)} prompts of "
            f"{field} carry no metadata (first: {missing[0]!r}); give {field} a .jsonl "
            'file of GenEval rows ({"tag", "include", "exclude", "prompt"})'
        )


class PromptSampler:
    """Deterministic epochs over a prompt list: a seeded permutation per epoch.

    ``position`` counts prompts handed out so far (across all ranks); saving it is all a
    checkpoint needs to continue the exact same sequence.
    """

    def __init__(self, num_prompts: int, seed: int, shuffle: bool = True) -> None:
        self.num_prompts = num_prompts
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` prompt indices (wrapping into new epochs as needed)."""
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.position, self.num_prompts)
            order = self._order(epoch)
            take = min(count - len(out), self.num_prompts - offset)
            out.extend(order[offset : offset + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(
                f"the checkpoint was trained on {state['num_prompts']} prompts, "
                f"data.train_prompts now has {self.num_prompts}"
            )
        self.position = int(state["position"])
