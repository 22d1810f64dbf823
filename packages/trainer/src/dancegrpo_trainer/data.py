"""Prompts: loading prompt files and a deterministic, resumable prompt sampler."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dancegrpo_trainer.config import expand_env


@dataclasses.dataclass
class PromptRecord:
    """One prompt, with its conditioning image path for image-to-video tasks."""

    prompt: str
    condition_image: str | None = None


def load_prompts(source: str | Sequence[str], field: str) -> list[PromptRecord]:
    """Reads prompts from an inline list, a ``.txt`` file (one per line; blank lines and
    ``#`` comments skipped) or a ``.jsonl`` file (``{"prompt": ..., "condition_image": ...}``).

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
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{field}: {path}:{lineno} has no 'prompt' key")
            image = row.get("condition_image")
            if image is not None and not Path(image).is_absolute():
                image = str(path.parent / image)
            records.append(PromptRecord(row["prompt"], image))
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
    return torch.from_numpy(np.stack(images))


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
