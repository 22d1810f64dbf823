"""Group-wise rewards in the dynamic batcher: a group is never split across ``score`` calls,
whatever the concurrency, request sizes and ``max_batch_size``; outputs return in order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.batching import DynamicBatcher


class GroupProbe(Reward):
    """Group-wise test reward. Prompts are ``"<request>/<group>/<index>/<size>"``; ``score``
    checks that every group it receives is whole and in order, and returns each sample's
    group size as seen in the batch and the batch size."""

    kind = "group_probe"
    group_wise = True
    min_group_size = 1

    def __init__(self, name: str = "probe", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, options or {})
        self.batches: list[tuple[int, ...]] = []
        self.violations: list[str] = []

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("group_size", "batch_size", "index")

    @property
    def version(self) -> str:
        return "probe-1"

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        assert batch.group_sizes is not None
        self.batches.append(batch.group_sizes)
        seen = np.zeros(len(batch), np.float32)
        index = np.zeros(len(batch), np.float32)
        for start, stop in batch.group_spans():
            tags = [p.split("/") for p in batch.prompts[start:stop]]
            request_group = {(t[0], t[1]) for t in tags}
            indices = [int(t[2]) for t in tags]
            size = int(tags[0][3])
            if len(request_group) != 1 or indices != list(range(size)) or stop - start != size:
                self.violations.append(f"{batch.prompts[start:stop]}")
            seen[start:stop] = stop - start
            index[start:stop] = indices
        return {
            "group_size": seen,
            "batch_size": np.full(len(batch), len(batch), np.float32),
            "index": index,
        }


def _request(request: int, sizes: list[int]) -> RewardBatch:
    prompts = [f"{request}/{g}/{i}/{size}" for g, size in enumerate(sizes) for i in range(size)]
    n = len(prompts)
    media = [np.zeros((2, 2, 3), np.uint8)] * n
    return RewardBatch(prompts, media, [None] * n, [None] * n, tuple(sizes))


async def _concurrent(reward: Reward, requests: list[list[int]], **settings: Any) -> list[dict]:
    batcher = DynamicBatcher(reward, **settings)
    batcher.start()
    try:
        rng = random.Random(0)

        async def one(r: int, sizes: list[int]) -> dict:
            await asyncio.sleep(rng.random() * 0.01)  # staggered arrivals
            return await batcher.submit(_request(r, sizes), None)

        return await asyncio.gather(*(one(r, s) for r, s in enumerate(requests)))
    finally:
        await batcher.close()


def test_groups_are_never_split_under_concurrent_requests() -> None:
    rng = random.Random(7)
    max_batch = 7
    # 40 requests of 1-4 groups of 1-7 samples: many exceed max_batch_size as a whole.
    requests = [[rng.randint(1, max_batch) for _ in range(rng.randint(1, 4))] for _ in range(40)]
    reward = GroupProbe()
    results = asyncio.run(
        _concurrent(
            reward, requests, max_batch_size=max_batch, max_queue_delay_s=0.003, max_queue_size=1000
        )
    )
    assert reward.violations == []
    assert all(sum(b) <= max_batch for b in reward.batches)
    assert sum(len(b) for b in reward.batches) == sum(len(s) for s in requests)
    assert any(len(b) > 1 for b in reward.batches)  # groups of different requests merged
    for sizes, out in zip(requests, results, strict=True):
        expected = [float(s) for s in sizes for _ in range(s)]
        assert out["group_size"].tolist() == expected  # each sample's own, whole group
        assert out["index"].tolist() == [float(i) for s in sizes for i in range(s)]


def test_a_request_larger_than_max_batch_size_is_cut_between_groups_only() -> None:
    reward = GroupProbe()
    (out,) = asyncio.run(
        _concurrent(
            reward, [[3, 3, 2, 4, 1]], max_batch_size=6, max_queue_delay_s=0.0, max_queue_size=64
        )
    )
    assert reward.violations == []
    assert reward.batches == [(3, 3), (2, 4), (1,)]
    assert out["batch_size"].tolist() == [6.0] * 6 + [6.0] * 6 + [1.0]


def test_reward_batch_groups_select_and_concat_keep_whole_groups() -> None:
    batch = _request(0, [2, 3, 1])
    assert batch.group_spans() == [(0, 2), (2, 5), (5, 6)]
    middle = batch.groups(1, 3)
    assert middle.group_sizes == (3, 1) and list(middle.prompts) == list(batch.prompts[2:])
    merged = RewardBatch.concat([batch.groups(0, 1), middle])
    assert merged.group_sizes == (2, 3, 1) and list(merged.prompts) == list(batch.prompts)
    assert batch.select([0, 1]).group_sizes is None
