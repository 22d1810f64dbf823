"""Torch runtime helpers shared by the model-backed kinds: device/dtype and a text cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from dancegrpo_rewards.base import RewardConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``dtype`` option value (``fp32``/``bf16``/``fp16``)."""
    return _DTYPES[name]


def torch_device(name: str, *, reward_name: str) -> torch.device:
    """The torch device of a ``device`` option; fails if that device is not available."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RewardConfigError(
            f"reward {reward_name!r}: option 'device': {name!r} but CUDA is not available"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RewardConfigError(
            f"reward {reward_name!r}: option 'device': {name!r} but MPS is not available"
        )
    return device


class TextFeatureCache:
    """LRU cache of per-prompt text features (GRPO repeats each prompt ``G`` times).

    ``features(prompts, encode)`` returns ``[N, D]`` features, calling ``encode`` once on
    the prompts that are not cached (each distinct prompt once, in first-seen order).
    ``capacity == 0`` disables caching. Not thread-safe: a reward is scored from one
    worker thread at a time.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def features(
        self, prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]
    ) -> torch.Tensor:
        """``[N, D]`` features of ``prompts``; ``encode(list) -> [M, D]`` for cache misses."""
        found: dict[str, torch.Tensor] = {}
        for p in prompts:
            if p in self._entries and p not in found:
                self._entries.move_to_end(p)
                found[p] = self._entries[p]
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            encoded = encode(missing)
            for p, row in zip(missing, encoded, strict=True):
                found[p] = row
                if self.capacity:
                    self._entries[p] = row
                    self._entries.move_to_end(p)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return torch.stack([found[p] for p in prompts])
