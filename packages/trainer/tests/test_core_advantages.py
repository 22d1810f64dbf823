"""Group advantages, multi-reward aggregation and the per-prompt stat tracker."""

import pytest
import torch

from dancegrpo_trainer import PerPromptStatTracker, group_advantages, multi_reward_advantages


def test_group_advantages_are_zero_mean_unit_std_per_group():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0, 0.5, -1.0, 3.0, 2.5])
    adv = group_advantages(rewards, group_size=4, eps=0.0).reshape(2, 4)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(dim=1), torch.ones(2))
    # Exact values for the first group: mean 3.5, unbiased std √(21/3) = √7.
    expected = (torch.tensor([1.0, 2.0, 4.0, 7.0]) - 3.5) / 7.0**0.5
    torch.testing.assert_close(adv[0], expected)


def test_biased_std_option():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0, unbiased=False)
    torch.testing.assert_close(adv.std(unbiased=False), torch.tensor(1.0))


def test_group_ids_in_any_order_equal_contiguous_groups():
    rewards = torch.tensor([1.0, 5.0, 2.0, 9.0, 4.0, 3.0])
    ids = torch.tensor([7, 3, 7, 3, 7, 3])
    adv = group_advantages(rewards, group_ids=ids)
    contiguous = group_advantages(rewards[[0, 2, 4, 1, 3, 5]], group_size=3)
    torch.testing.assert_close(adv[[0, 2, 4, 1, 3, 5]], contiguous)


def test_degenerate_and_singleton_groups_give_exact_zeros():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 3.0])
    adv = group_advantages(rewards, group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3))
    torch.testing.assert_close(adv[3:], torch.tensor([-1.0, 0.0, 1.0]))  # std 1
    single = group_advantages(torch.tensor([3.0, 4.0]), group_size=1)
    assert torch.equal(single, torch.zeros(2))
    assert torch.isfinite(
        group_advantages(torch.full((4,), 0.3), group_size=4, global_std=True)
    ).all()


def test_global_std_uses_all_rewards():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    adv = group_advantages(rewards, group_size=2, eps=0.0, global_std=True)
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / rewards.std()
    torch.testing.assert_close(adv, expected)


def test_multi_reward_normalises_each_then_weights():
    hps = torch.tensor([0.20, 0.30, 0.25, 0.35])
    clip = torch.tensor([30.0, 10.0, 20.0, 50.0])
    adv = multi_reward_advantages(
        {"hps": hps, "clip": clip}, {"hps": 1.0, "clip": 0.5}, group_size=2
    )
    expected = group_advantages(hps, group_size=2) + 0.5 * group_advantages(clip, group_size=2)
    torch.testing.assert_close(adv, expected)
    # Scale-free: multiplying one reward by 1000 does not change the result.
    scaled = multi_reward_advantages(
        {"hps": 1000 * hps, "clip": clip}, {"hps": 1.0, "clip": 0.5}, group_size=2
    )
    torch.testing.assert_close(scaled, adv)


def test_advantage_arguments_are_validated():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="weights"):
        multi_reward_advantages({"a": torch.zeros(2)}, {"b": 1.0}, group_size=2)


def test_tracker_uses_batch_stats_until_min_count_then_prompt_history():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3, eps=0.0)
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    # Fewer than 3 stored per prompt: the batch's global (biased) statistics.
    torch.testing.assert_close(adv, (rewards - rewards.mean()) / rewards.std(unbiased=False))

    adv2 = tracker.update(["a", "a"], torch.tensor([5.0, 7.0]))
    history = torch.tensor([1.0, 3.0, 5.0, 7.0])
    expected = (torch.tensor([5.0, 7.0]) - history.mean()) / history.std(unbiased=False)
    torch.testing.assert_close(adv2, expected)

    tracker.update(["a"], torch.tensor([9.0]))  # the FIFO drops the oldest (1.0)
    assert tracker.state_dict()["buffers"]["a"] == [3.0, 5.0, 7.0, 9.0]


def test_tracker_constant_history_gives_zero_and_state_round_trips():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    assert torch.equal(tracker.update(["p", "p"], torch.tensor([0.5, 0.5])), torch.zeros(2))
    tracker.update(["q", "q", "q"], torch.tensor([1.0, 2.0, 4.0]))

    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
    batch = torch.tensor([3.0, 0.0])
    torch.testing.assert_close(
        restored.update(["q", "q"], batch), tracker.update(["q", "q"], batch)
    )


def test_tracker_arguments_are_validated():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=4, min_count=5)
    with pytest.raises(ValueError, match="rewards"):
        PerPromptStatTracker().update(["a"], torch.zeros(2))
