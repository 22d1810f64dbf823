"""Per-prompt running reward statistics for advantages with small groups (DDPO)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch


class PerPromptStatTracker:
    """Normalises rewards by per-prompt running mean/std over the last ``buffer_size`` rewards.

    DDPO (Black et al. 2023) ``PerPromptStatTracker``: each prompt keeps a FIFO of its most
    recent rewards (this batch included); while a prompt has fewer than ``min_count``
    stored rewards, the batch's global mean/std are used instead. The std is biased
    (``np.std``), plus ``eps``. A prompt whose statistics set is constant gets advantage 0.

    The state (``state_dict``/``load_state_dict``) is plain Python data, safe to put in a
    checkpoint.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"min_count must be in [1, buffer_size={buffer_size}], got {min_count}"
            )
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self._buffers: dict[str, collections.deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Adds this batch's rewards to the buffers and returns their advantages.

        Args:
            prompts: ``N`` prompt strings (the grouping key).
            rewards: ``[N]`` rewards.

        Returns:
            float32 ``[N]`` advantages on ``rewards.device``.
        """
        if rewards.ndim != 1 or rewards.shape[0] != len(prompts):
            raise ValueError(
                f"rewards must have shape [N]=[{len(prompts)}] (one per prompt), "
                f"got {tuple(rewards.shape)}"
            )
        r = rewards.detach().to(torch.float32)
        values = r.cpu().tolist()
        advantages = torch.zeros_like(r)
        batch_stats = (
            r.mean(),
            r.std(unbiased=False),
            bool((r == r[0]).all()) if r.numel() else True,
        )
        by_prompt: dict[str, list[int]] = collections.defaultdict(list)
        for i, prompt in enumerate(prompts):
            by_prompt[prompt].append(i)
        for prompt, idx in by_prompt.items():
            buffer = self._buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(values[i] for i in idx)
            if len(buffer) < self.min_count:
                mean, std, constant = batch_stats
            else:
                stats = torch.tensor(list(buffer), dtype=torch.float32, device=r.device)
                mean, std = stats.mean(), stats.std(unbiased=False)
                constant = bool((stats == stats[0]).all())
            if constant:
                continue  # every reward in the statistics set is equal: advantage 0
            index = torch.tensor(idx, device=r.device)
            advantages[index] = (r[index] - mean) / (std + self.eps)
        return advantages

    def state_dict(self) -> dict[str, Any]:
        """The tracker's configuration and buffers as plain Python data."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "eps": self.eps,
            "buffers": {prompt: list(buf) for prompt, buf in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (configuration and buffers)."""
        restored = PerPromptStatTracker(state["buffer_size"], state["min_count"], state["eps"])
        self.buffer_size, self.min_count, self.eps = (
            restored.buffer_size,
            restored.min_count,
            restored.eps,
        )
        self._buffers = {
            prompt: collections.deque((float(v) for v in values), maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }

    def clear(self) -> None:
        """Forgets every prompt's history."""
        self._buffers.clear()
