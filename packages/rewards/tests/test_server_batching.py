"""The dynamic batcher in-process: merging, splitting, queue limits, deadlines, isolation."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from dancegrpo_rewards.base import RewardBatch, SampleError
from dancegrpo_rewards.batching import DynamicBatcher, ScoreError
from dancegrpo_testing.servers import ProbeReward


def _batch(values, prompts=None):
    media = [np.full((2, 2, 3), v, np.uint8) for v in values]
    n = len(values)
    return RewardBatch(prompts or ["p"] * n, media, [None] * n, [None] * n)


def _run(coro):
    return asyncio.run(coro)


async def _with_batcher(reward, body, **kwargs):
    settings = {"max_batch_size": 8, "max_queue_delay_s": 0.05, "max_queue_size": 64}
    settings.update(kwargs)
    batcher = DynamicBatcher(reward, **settings)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_concurrent_requests_merge_into_one_pass_and_split_in_order():
    async def body(batcher):
        return await asyncio.gather(
            *(batcher.submit(_batch([v, v + 1]), None) for v in (0, 10, 20))
        )

    results = _run(_with_batcher(ProbeReward("p", {}), body))
    for v, out in zip((0, 10, 20), results, strict=True):
        np.testing.assert_allclose(out["score"], np.array([v, v + 1]) / 255, rtol=1e-6)
        assert out["batch_size"].tolist() == [6.0, 6.0]  # all three merged


def test_oversized_request_is_split_into_max_batch_size_chunks():
    async def body(batcher):
        return await batcher.submit(_batch(list(range(11))), None)

    out = _run(_with_batcher(ProbeReward("p", {}), body, max_batch_size=4))
    np.testing.assert_allclose(out["score"], np.arange(11) / 255, rtol=1e-6)
    assert out["batch_size"].tolist() == [4] * 8 + [3] * 3


def test_full_queue_rejects_at_once_with_resource_exhausted():
    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(_batch([1]), None))
        await asyncio.sleep(0.05)  # first is running (slow), queue empty
        queued = asyncio.ensure_future(batcher.submit(_batch([1, 2]), None))
        await asyncio.sleep(0)
        with pytest.raises(ScoreError) as info:
            await batcher.submit(_batch([3]), None)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size 2" in info.value.message
        await asyncio.gather(first, queued)

    reward = ProbeReward("p", {"sleep_s": 0.2})
    _run(_with_batcher(reward, body, max_queue_size=2, max_queue_delay_s=0.0))


def test_expired_requests_are_dropped_before_running():
    async def body(batcher):
        loop = asyncio.get_running_loop()
        blocker = asyncio.ensure_future(batcher.submit(_batch([1]), None))
        await asyncio.sleep(0.02)
        late = batcher.submit(_batch([2]), loop.time() + 0.05)  # expires while queued
        with pytest.raises(ScoreError) as info:
            await late
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        out = await blocker
        assert out["batch_size"].tolist() == [1.0]

    _run(_with_batcher(ProbeReward("p", {"sleep_s": 0.2}), body, max_queue_delay_s=0.0))


def test_a_failing_request_does_not_poison_its_merged_batch():
    async def body(batcher):
        return await asyncio.gather(
            batcher.submit(_batch([1], ["ok"]), None),
            batcher.submit(_batch([2], ["boom"]), None),
            batcher.submit(_batch([3], ["ok"]), None),
            return_exceptions=True,
        )

    good1, bad, good2 = _run(_with_batcher(ProbeReward("p", {"fail_prompt": "boom"}), body))
    assert isinstance(bad, ScoreError) and bad.code == grpc.StatusCode.INTERNAL
    assert "probe failure" in bad.message
    assert good1["score"][0] == pytest.approx(1 / 255)
    assert good2["score"][0] == pytest.approx(3 / 255)


class _SampleCheckingProbe(ProbeReward):
    def score(self, batch):
        for i, prompt in enumerate(batch.prompts):
            if prompt == "bad":
                raise SampleError(i, "prompt", "rejected by the model")
        return super().score(batch)


def test_sample_errors_from_score_map_to_invalid_argument_with_request_index():
    async def body(batcher):
        return await batcher.submit(_batch([1, 2, 3, 4, 5], ["a", "a", "a", "a", "bad"]), None)

    with pytest.raises(ScoreError) as info:
        _run(_with_batcher(_SampleCheckingProbe("p", {}), body, max_batch_size=2))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("samples[4].prompt")


def test_wrong_output_shape_is_internal_and_closed_batcher_is_unavailable():
    class Broken(ProbeReward):
        def score(self, batch):
            return {"score": np.zeros(len(batch) + 1), "batch_size": np.zeros(len(batch))}

    async def body(batcher):
        with pytest.raises(ScoreError) as info:
            await batcher.submit(_batch([1]), None)
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "shape" in info.value.message
        await batcher.close()
        with pytest.raises(ScoreError) as info:
            await batcher.submit(_batch([1]), None)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE

    _run(_with_batcher(Broken("p", {}), body))


def test_an_empty_queue_rejects_a_request_larger_than_the_whole_queue():
    async def body(batcher):
        with pytest.raises(ScoreError) as info:
            await batcher.submit(_batch(list(range(5))), None)  # queue is empty
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "a request of 5 samples can never fit" in info.value.message
        assert "max_queue_size 4" in info.value.message
        return await batcher.submit(_batch(list(range(4))), None)  # a full queue's worth runs

    out = _run(_with_batcher(ProbeReward("p", {}), body, max_queue_size=4, max_batch_size=2))
    np.testing.assert_allclose(out["score"], np.arange(4) / 255, rtol=1e-6)


def test_a_lone_request_runs_at_once_when_the_worker_is_idle():
    async def body(batcher):
        loop = asyncio.get_running_loop()
        start = loop.time()
        out = await batcher.submit(_batch([7]), None)
        return out, loop.time() - start

    out, waited = _run(
        _with_batcher(ProbeReward("p", {}), body, max_queue_delay_s=2.0, dispatch_when_idle=True)
    )
    assert out["batch_size"].tolist() == [1.0]
    assert waited < 1.0  # did not wait out the 2 s delay

    # Default (off): the lone request waits out the delay for a fuller batch.
    out, waited = _run(
        _with_batcher(ProbeReward("p", {}), body, max_queue_delay_s=0.2, dispatch_when_idle=False)
    )
    assert waited >= 0.19


def test_a_request_still_arriving_holds_the_batch_so_they_merge():
    async def body(batcher):
        async def late():
            with batcher.arriving():  # e.g. still being decoded
                await asyncio.sleep(0.05)
            return await batcher.submit(_batch([2]), None)

        late_task = asyncio.ensure_future(late())
        await asyncio.sleep(0)  # the late request is now arriving
        first = await batcher.submit(_batch([1]), None)
        return first, await late_task

    first, second = _run(
        _with_batcher(ProbeReward("p", {}), body, max_queue_delay_s=2.0, dispatch_when_idle=True)
    )
    assert first["batch_size"].tolist() == [2.0]  # merged into one pass
    assert second["batch_size"].tolist() == [2.0]
