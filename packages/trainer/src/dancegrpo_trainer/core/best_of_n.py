"""Best-of-N trajectory selection: keep the best and worst samples of each prompt group."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def best_of_n_indices(
    rewards: torch.Tensor, *, group_size: int, top_k: int, bottom_k: int
) -> torch.Tensor:
    """Global indices of the ``top_k`` highest and ``bottom_k`` lowest rewards in each group.

    DanceGRPO (Xue et al. 2025) §3.4 "Best-of-N inference scaling": from ``N = 24`` samples
    per prompt, train on the best 4 and the worst 4, which keep most of the advantage signal.

    Both sets come from one stable descending sort (ties ranked by the lower index first),
    so the result is deterministic and the top and bottom sets never share a sample.

    Args:
        rewards: ``[P·G]`` rewards in contiguous groups of ``group_size`` (one per prompt).
        group_size: ``G`` samples per prompt.
        top_k: how many of the highest rewards to keep per group.
        bottom_k: how many of the lowest rewards to keep per group.

    Returns:
        int64 ``[P·(top_k + bottom_k)]``: per group, the top-k in descending reward order,
        then the bottom-k in ascending order; groups in their original order.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [N], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must be >= 1 and divide the number of rewards ({rewards.shape[0]}), "
            f"got {group_size}"
        )
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k == 0:
        raise ValueError(
            f"top_k and bottom_k must be >= 0 with a positive sum, got {top_k}, {bottom_k}"
        )
    if top_k + bottom_k > group_size:
        raise ValueError(
            f"top_k + bottom_k ({top_k + bottom_k}) must be <= group_size ({group_size})"
        )
    groups = rewards.detach().reshape(-1, group_size)
    # One stable sort, top from its head and bottom from its tail: the two never overlap.
    descending = torch.sort(groups, dim=1, descending=True, stable=True).indices
    bottom = descending[:, group_size - bottom_k :].flip(1)
    local = torch.cat([descending[:, :top_k], bottom], dim=1)
    offsets = torch.arange(groups.shape[0], device=rewards.device)[:, None] * group_size
    return (local + offsets).reshape(-1)


def gather_trajectories(
    trajectories: Mapping[str, torch.Tensor], indices: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Selects rows ``indices`` from every batch-first tensor of a rollout.

    Args:
        trajectories: name → tensor ``[N, ...]`` (latents ``[N, T+1, ...]``, log-probs
            ``[N, T]``, rewards ``[N]``, advantages, ...), all with the same ``N``.
        indices: int64 ``[M]``, e.g. from :func:`best_of_n_indices`.

    Returns:
        name → ``[M, ...]``.
    """
    sizes = {name: t.shape[0] for name, t in trajectories.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"all trajectory tensors must share the batch size, got {sizes}")
    return {name: t[indices.to(t.device)] for name, t in trajectories.items()}
