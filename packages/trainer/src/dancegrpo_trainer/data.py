"""Prompts: loading prompt files (one source, or ``data.sources``) and deterministic,
resumable prompt samplers (one pooled list, or a share-weighted mixture of sources)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dancegrpo_trainer.config import ConfigError, DataConfig, expand_env
from dancegrpo_trainer.geneval_prompts import geneval_metadata


@dataclasses.dataclass
class PromptRecord:
    """One prompt, with its conditioning image path for image-to-video tasks and its
    sample metadata (``{"geneval": {...}}`` from a GenEval row) for rewards that need it."""

    prompt: str
    condition_image: str | None = None
    metadata: dict[str, Any] | None = None
    #: the ``data.sources`` entry it came from (``None`` without sources).
    source: str | None = None


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


def load_prompt_sets(data: DataConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """``(train, eval)`` records of ``data``: its two prompt files, or every source's in
    ``data.sources`` order (each record tagged with its source's name)."""
    if not data.sources:
        train = load_prompts(data.train_prompts, "data.train_prompts")
        evals = load_prompts(data.eval_prompts, "data.eval_prompts") if data.eval_prompts else []
        return train, evals
    train, evals = [], []
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}]"
        for records, key in ((train, "train_prompts"), (evals, "eval_prompts")):
            if getattr(source, key):
                for record in load_prompts(getattr(source, key), f"{where}.{key}"):
                    records.append(dataclasses.replace(record, source=source.name))
    return train, evals


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
        self._epoch_order: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(self.num_prompts, generator=g).tolist())
        return self._epoch_order[1]

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


class MixtureSampler:
    """Prompts from several sources with fixed sampling shares (``data.sources[*].share``).

    Draw ``k`` (counted over the whole run, all ranks) picks source ``s`` with probability
    ``share_s / Σ share`` from a generator seeded by ``(seed, k)``, then takes that source's
    next prompt from its own :class:`PromptSampler` (seeded epochs over the source).
    Indices are into the sources' records concatenated in order. The state is the draw
    count and each source's position, so a resumed run continues the same sequence.

    Args:
        sizes: prompts per source.
        shares: sampling share per source (> 0).
    """

    def __init__(
        self, sizes: Sequence[int], shares: Sequence[float], seed: int, shuffle: bool = True
    ) -> None:
        if len(sizes) != len(shares) or not sizes:
            raise ValueError("one share per source, at least one source")
        self.sizes = [int(s) for s in sizes]
        self.seed = seed
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.cumulative = np.cumsum(shares) / float(np.sum(shares))
        self.sources = [
            PromptSampler(size, seed * 1_000_033 + i, shuffle) for i, size in enumerate(sizes)
        ]
        self.position = 0

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` prompt indices (into the concatenated sources)."""
        out = []
        for _ in range(count):
            u = np.random.default_rng((self.seed, 0x50524F4D, self.position)).random()
            s = min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.sizes) - 1)
            out.append(self.offsets[s] + self.sources[s].next_indices(1)[0])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "num_prompts": self.sizes,
            "source_positions": [s.position for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("num_prompts", [])) != self.sizes:
            raise ValueError(
                f"the checkpoint was trained on sources of {state.get('num_prompts')} prompts, "
                f"data.sources now have {self.sizes}"
            )
        self.position = int(state["position"])
        for sampler, position in zip(self.sources, state["source_positions"], strict=True):
            sampler.position = int(position)


def prompt_sampler(data: DataConfig, records: Sequence[PromptRecord], seed: int) -> Any:
    """The run's prompt sampler: a :class:`MixtureSampler` when ``data.sources`` set
    shares, else one :class:`PromptSampler` over all records (sources pooled)."""
    if data.sources and data.sources[0].share is not None:
        sizes = [sum(r.source == s.name for r in records) for s in data.sources]
        return MixtureSampler(sizes, [s.share for s in data.sources], seed, data.shuffle)
    return PromptSampler(len(records), seed, data.shuffle)
