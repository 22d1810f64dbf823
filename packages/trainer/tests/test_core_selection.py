"""Timestep subsampling and Best-of-N selection."""

import pytest
import torch

from dancegrpo_trainer import (
    best_of_n_indices,
    gather_steps,
    gather_trajectories,
    num_train_timesteps,
    select_timesteps,
)


def test_select_timesteps_size_distinct_and_reproducible():
    first = select_timesteps(
        5, 10, timestep_fraction=0.6, generator=torch.Generator().manual_seed(0)
    )
    again = select_timesteps(
        5, 10, timestep_fraction=0.6, generator=torch.Generator().manual_seed(0)
    )
    other = select_timesteps(
        5, 10, timestep_fraction=0.6, generator=torch.Generator().manual_seed(1)
    )
    assert first.shape == (5, 6) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    for row in first:
        assert len(set(row.tolist())) == 6 and int(row.min()) >= 0 and int(row.max()) < 10
    # Rows differ in order/content: an independent permutation per sample.
    assert len({tuple(r) for r in first.tolist()}) > 1


def test_full_fraction_is_a_permutation_and_skip_last_excludes_final_step():
    full = select_timesteps(3, 8, timestep_fraction=1.0, generator=torch.Generator().manual_seed(2))
    for row in full:
        assert sorted(row.tolist()) == list(range(8))
    skip = select_timesteps(
        20, 8, timestep_fraction=1.0, skip_last=True, generator=torch.Generator().manual_seed(2)
    )
    assert skip.shape == (20, 7) and int(skip.max()) == 6


def test_num_train_timesteps_rounding_and_validation():
    assert num_train_timesteps(10, 0.6) == 6
    assert num_train_timesteps(16, 0.6) == 9
    assert num_train_timesteps(3, 0.1) == 1
    assert num_train_timesteps(10, 0.6, skip_last=True) == 5
    with pytest.raises(ValueError, match="timestep_fraction"):
        num_train_timesteps(10, 0.0)
    with pytest.raises(ValueError, match="skip_last"):
        num_train_timesteps(1, 1.0, skip_last=True)


def test_gather_steps_picks_rows_per_sample():
    per_step = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 2]])
    out = gather_steps(per_step, idx)
    assert torch.equal(out, torch.stack([per_step[0, [3, 0]], per_step[1, [1, 2]]]))


def test_best_of_n_picks_top_and_bottom_per_group():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 2.0, 1.0, 3.0, 0.0, 5.0, 4.0])
    idx = best_of_n_indices(rewards, group_size=6, top_k=2, bottom_k=2)
    # Group 0: top 0.9 (1), 0.8 (5); bottom 0.1 (2), 0.3 (4). Group 1 (offset 6): top 5.0 (10),
    # 4.0 (11); bottom 0.0 (9), 1.0 (7).
    assert idx.tolist() == [1, 5, 2, 4, 10, 11, 9, 7]


def test_best_of_n_ties_never_overlap_and_gather():
    rewards = torch.zeros(4)
    idx = best_of_n_indices(rewards, group_size=4, top_k=2, bottom_k=2)
    assert sorted(idx.tolist()) == [0, 1, 2, 3]
    traj = {"latents": torch.arange(4 * 3 * 2).reshape(4, 3, 2), "rewards": torch.arange(4.0)}
    out = gather_trajectories(traj, torch.tensor([2, 0]))
    assert torch.equal(out["latents"], traj["latents"][[2, 0]])
    assert out["rewards"].tolist() == [2.0, 0.0]


def test_best_of_n_validation():
    with pytest.raises(ValueError, match="group_size"):
        best_of_n_indices(torch.zeros(5), group_size=2, top_k=1, bottom_k=1)
    with pytest.raises(ValueError, match="top_k"):
        best_of_n_indices(torch.zeros(4), group_size=4, top_k=3, bottom_k=2)
    with pytest.raises(ValueError, match="batch size"):
        gather_trajectories({"a": torch.zeros(2), "b": torch.zeros(3)}, torch.tensor([0]))
