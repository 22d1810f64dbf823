"""Group-relative advantages (GRPO) and multi-reward aggregation (DanceGRPO)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def group_ids_from_size(
    num_samples: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Group ids ``[0,0,..,1,1,..]`` for ``num_samples`` samples in contiguous groups of ``group_size``."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_samples % group_size != 0:
        raise ValueError(
            f"number of rewards ({num_samples}) is not a multiple of group_size ({group_size})"
        )
    return torch.arange(num_samples // group_size, device=device).repeat_interleave(group_size)


def _resolve_groups(
    rewards: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [N], got {tuple(rewards.shape)}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size or group_ids")
    if group_ids is None:
        assert group_size is not None
        ids = group_ids_from_size(rewards.shape[0], group_size, rewards.device)
    else:
        if group_ids.shape != rewards.shape:
            raise ValueError(
                f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}"
            )
        ids = group_ids.to(rewards.device)
    _, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
) -> torch.Tensor:
    """GRPO advantages ``A_i = (r_i − mean_g) / (std_g + eps)`` within each prompt group.

    DanceGRPO (Xue et al. 2025) eq. 5 / ``train_grpo_flux.py`` (``torch.std``, unbiased,
    ``eps = 1e-8``); DeepSeekMath GRPO (Shao et al. 2024). With ``global_std`` the
    denominator is the std of *all* rewards (Flow-GRPO's ``global_std`` option) while the
    mean stays per group.

    Degenerate groups — all rewards equal, or a single sample (whose unbiased std is
    undefined) — get advantage exactly 0 (never NaN or ``±r/eps``).

    Args:
        rewards: ``[N]`` rewards (any float dtype).
        group_size: ``G``; samples ``[kG, (k+1)G)`` share a prompt. Exclusive with ``group_ids``.
        group_ids: ``[N]`` integer group label per sample (any order). Exclusive with ``group_size``.
        eps: added to the std.
        unbiased: Bessel-corrected std (DanceGRPO, ``torch.std``) or biased (DDPO/Flow-GRPO, ``np.std``).
        global_std: normalise by the std over all ``N`` rewards instead of per group.

    Returns:
        float32 ``[N]`` advantages.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.detach().to(torch.float32)
    inverse, num_groups = _resolve_groups(r, group_size, group_ids)
    counts = torch.zeros(num_groups, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    sums = torch.zeros(num_groups, device=r.device).index_add_(0, inverse, r)
    means = sums / counts
    centred = r - means[inverse]

    if global_std:
        std = (
            r.std(unbiased=unbiased)
            if r.numel() > int(unbiased)
            else torch.zeros((), device=r.device)
        )
        stds = std.expand(num_groups)
    else:
        sq = torch.zeros(num_groups, device=r.device).index_add_(0, inverse, centred**2)
        dof = counts - 1 if unbiased else counts
        stds = torch.sqrt(sq / dof.clamp(min=1))

    high = torch.full((num_groups,), -torch.inf, device=r.device).scatter_reduce(
        0, inverse, r, "amax"
    )
    low = torch.full((num_groups,), torch.inf, device=r.device).scatter_reduce(
        0, inverse, r, "amin"
    )
    degenerate = (high == low) | (counts <= int(unbiased))
    advantages = centred / (stds[inverse] + eps)
    return torch.where(degenerate[inverse], torch.zeros_like(advantages), advantages)


def multi_reward_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
) -> torch.Tensor:
    """``Σ_k w_k · A_k``: each reward's group advantages computed separately, then weighted.

    DanceGRPO (Xue et al. 2025) §3.3, multiple reward models: normalising each reward
    separately keeps one reward's scale from dominating (e.g. HPS-v2.1 + CLIP score, or
    VideoAlign's VQ + MQ).

    Args:
        rewards: name → ``[N]`` rewards.
        weights: name → weight; must have exactly the keys of ``rewards``.
        group_size, group_ids, eps, unbiased, global_std: as in :func:`group_advantages`.

    Returns:
        float32 ``[N]`` aggregated advantages.
    """
    if not rewards:
        raise ValueError("rewards must contain at least one reward")
    if set(rewards) != set(weights):
        raise ValueError(
            f"weights keys {sorted(weights)} must equal rewards keys {sorted(rewards)}"
        )
    total: torch.Tensor | None = None
    for name, values in rewards.items():
        adv = weights[name] * group_advantages(
            values,
            group_size=group_size,
            group_ids=group_ids,
            eps=eps,
            unbiased=unbiased,
            global_std=global_std,
        )
        total = adv if total is None else total + adv
    assert total is not None
    return total


def routed_advantages(
    rewards: Mapping[str, torch.Tensor],
    row_weights: Mapping[str, torch.Tensor],
    *,
    group_size: int,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> torch.Tensor:
    """``A_i = Σ_k w_k[i] · A_k[i]`` when each prompt group is scored by its own rewards.

    Routed multi-reward runs (``data.sources``): reward ``k`` scores only the groups routed
    to it; it is normalised within each of those groups (:func:`group_advantages`, as in
    :func:`multi_reward_advantages`) and weighted by the group's own weight of it. A group
    not routed to ``k`` (weight 0, reward NaN) gets no term from it. With every weight
    equal to its reward's constant weight this is :func:`multi_reward_advantages`.

    Args:
        rewards: name → ``[N]`` rewards, NaN where the sample is not routed to that reward.
        row_weights: name → ``[N]`` weights ``>= 0`` (same keys), 0 exactly where not
            routed; constant within each group (a group shares its prompt's route).
        group_size: ``G``; samples ``[kG, (k+1)G)`` share a prompt.
        eps, unbiased: as in :func:`group_advantages`.

    Returns:
        float32 ``[N]`` advantages.
    """
    if not rewards or set(rewards) != set(row_weights):
        raise ValueError(
            f"row_weights keys {sorted(row_weights)} must equal rewards keys {sorted(rewards)}"
        )
    total: torch.Tensor | None = None
    for name, values in rewards.items():
        r = values.detach().to(torch.float32)
        w = row_weights[name].detach().to(torch.float32).to(r.device)
        if w.shape != r.shape or (w < 0).any():
            raise ValueError(f"row_weights[{name!r}] must be [N] >= 0 like its rewards")
        routed = w > 0
        if torch.isnan(r[routed]).any():
            raise ValueError(f"reward {name!r} is NaN for a sample routed to it")
        per_group = w.view(-1, group_size) if w.numel() % group_size == 0 else None
        if per_group is None or not (per_group == per_group[:, :1]).all():
            raise ValueError(f"row_weights[{name!r}] must be constant within each group")
        adv = group_advantages(
            torch.where(routed, r, torch.zeros_like(r)),
            group_size=group_size,
            eps=eps,
            unbiased=unbiased,
        )
        term = w * adv  # unrouted groups: all-zero rewards give advantage exactly 0
        total = term if total is None else total + term
    assert total is not None
    return total
