"""Per-reward dynamic batching on the asyncio event loop, with the model on a worker thread.

Requests wait in a bounded queue until ``max_batch_size`` samples are queued or the oldest
has waited ``max_queue_delay_ms``; they then run as one ``Reward.score`` call on the
reward's single worker thread (the event loop keeps accepting and queueing meanwhile) and
the outputs are split back in request order.

- The delay only bounds the wait for *more work*: when the worker is idle and no other
  request is on its way in (``arriving()``: received, still being decoded), whatever is
  queued runs at once (``dispatch_when_idle``; off by default: see docs/serving.md). Under load the worker is busy,
  requests pile up meanwhile and still merge; a request that is still being decoded when
  the batch would start keeps the batch waiting for it (up to the delay).

- A request larger than ``max_batch_size`` is split into chunks of at most that size which
  queue (and may merge with other requests) like ordinary requests; its outputs are
  reassembled in order. It fails as a whole if any chunk fails.
- Group-wise rewards (``RewardBatch.group_sizes``): a group is never split. Chunks are
  made of whole groups (the decoder has already rejected a group above
  ``max_batch_size``), and batches merge whole queued chunks only, so every ``score`` call
  sees whole groups.
- ``max_queue_size`` counts queued samples. A request that would push the queue past it is
  rejected at once with ``RESOURCE_EXHAUSTED`` (one larger than the whole queue always is;
  the server's config caps ``max_samples_per_request`` at ``max_queue_size``, so it rejects
  such requests earlier with ``INVALID_ARGUMENT``).
- Requests whose deadline has passed, or whose caller cancelled, are dropped before running.
- If a merged batch raises, each request in it is re-run alone so only the culprit fails.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping

import grpc
import numpy as np

from dancegrpo_rewards.base import Reward, RewardBatch, SampleError
from dancegrpo_rewards.metrics import ServiceMetrics
from dancegrpo_rewards.rich_status import ScoreError, invalid_argument

__all__ = ["DynamicBatcher", "ScoreError", "check_outputs"]

log = logging.getLogger("dancegrpo_rewards.batching")

#: ``RetryInfo`` delay suggested while the server shuts down (retry soon, elsewhere).
SHUTDOWN_RETRY_S = 0.1


@dataclasses.dataclass
class _Item:
    batch: RewardBatch
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float | None  # event-loop time, or None for no deadline
    enqueued: float
    offset: int  # index of the chunk's first sample in its request


def check_outputs(
    outputs: Mapping[str, np.ndarray], names: tuple[str, ...], n: int
) -> dict[str, np.ndarray]:
    """Validates a reward's return value: every declared output, float, shape ``(n,)``."""
    if not isinstance(outputs, Mapping):
        raise TypeError(f"score() returned {type(outputs).__name__}, expected a dict")
    checked = {}
    for name in names:
        if name not in outputs:
            raise ValueError(f"score() did not return the declared output {name!r}")
        values = np.asarray(outputs[name], dtype=np.float32)
        if values.shape != (n,):
            raise ValueError(f"score() output {name!r} has shape {values.shape}, expected ({n},)")
        checked[name] = values
    return checked


class DynamicBatcher:
    """Merges concurrent requests for one reward into batched ``score`` calls.

    Args:
        reward: a loaded, warmed-up reward.
        max_batch_size: most samples per ``score`` call.
        max_queue_delay_s: longest the oldest queued request waits for a fuller batch.
        max_queue_size: most queued samples before new requests are rejected.
        metrics: where to record batch sizes, latency and queue depth (optional).
        dispatch_when_idle: run at once, without waiting out the delay, when nothing else
            is queued or arriving (the worker is always idle when the loop decides).
    """

    def __init__(
        self,
        reward: Reward,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        metrics: ServiceMetrics | None = None,
        dispatch_when_idle: bool = False,
    ) -> None:
        self.reward = reward
        self.name = reward.name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self.dispatch_when_idle = dispatch_when_idle
        self._arriving = 0  # requests received but not yet submitted (decoding)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_samples = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._running = False  # a score() call is on the worker thread
        # Smoothed forward-pass seconds: the RetryInfo delay of a queue-full rejection
        # (about when the next batch leaves the queue); the delay bound until measured.
        self._batch_seconds = max(max_queue_delay_s, 0.01)
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"reward-{self.name}"
        )

    @property
    def queued_samples(self) -> int:
        """Samples waiting (not yet running)."""
        return self._queued_samples

    def retry_after_s(self) -> float:
        """Suggested wait before retrying a queue-full rejection (about one batch)."""
        return min(max(self._batch_seconds, 0.01), 5.0)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request as on its way (decoding) so a batch waits for it, up to the delay.

        Wrap everything between receiving a request and calling ``submit`` (with no await
        between leaving the block and ``submit``).
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wake.set()

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"batcher-{self.name}"
        )

    async def close(self, timeout_s: float | None = None) -> bool:
        """Stops accepting, runs everything already queued, then stops the worker thread.

        With ``timeout_s``, gives up waiting after that long: queued work is dropped and
        a ``score`` call still running is left to finish on its own (a thread cannot be
        interrupted). Returns whether the worker finished (``False``: still running).
        """
        self._closing = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                self._task.cancel()
                for item in self._queue:
                    _fail(item, _shutting_down())
        self._executor.shutdown(wait=False, cancel_futures=True)
        return not self._running

    async def submit(self, batch: RewardBatch, deadline: float | None) -> dict[str, np.ndarray]:
        """Queues ``batch`` and returns its outputs (float32 ``(N,)`` per output name).

        Raises ``ScoreError`` (UNAVAILABLE when closing, RESOURCE_EXHAUSTED when the queue is
        full, DEADLINE_EXCEEDED, INVALID_ARGUMENT, INTERNAL).
        """
        if self._closing:
            raise _shutting_down()
        n = len(batch)
        if n > self.max_queue_size:
            raise ScoreError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reward {self.name!r}: a request of {n} samples can never fit its queue "
                f"(max_queue_size {self.max_queue_size}); send at most {self.max_queue_size} "
                "samples per request",
            )
        if self._queued_samples + n > self.max_queue_size:
            raise ScoreError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reward {self.name!r} queue is full ({self._queued_samples} samples queued, "
                f"max_queue_size {self.max_queue_size}); retry with backoff",
                retry_after_s=self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for start, chunk in self._chunks(batch):
            item = _Item(chunk, loop.create_future(), deadline, now, start)
            self._queue.append(item)
            futures.append(item.future)
        self._queued_samples += n
        self._set_depth()
        self._wake.set()
        try:
            results = await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()  # no-op when done; otherwise the loop skips it
        if len(results) == 1:
            return results[0]
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    # ------------------------------------------------------------------ internals

    def _chunks(self, batch: RewardBatch) -> list[tuple[int, RewardBatch]]:
        """``(first sample, chunk)`` pieces of at most ``max_batch_size`` samples; a batch
        with groups is cut only between groups."""
        n, limit = len(batch), self.max_batch_size
        if n <= limit:
            return [(0, batch)]
        if batch.group_sizes is None:
            return [(s, batch.select(range(s, min(s + limit, n)))) for s in range(0, n, limit)]
        chunks, first, start, total = [], 0, 0, 0
        for k, size in enumerate(batch.group_sizes):
            if total and total + size > limit:
                chunks.append((start, batch.groups(first, k)))
                first, start, total = k, start + total, 0
            total += size
        chunks.append((start, batch.groups(first, len(batch.group_sizes))))
        return chunks

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(self.name).set(self._queued_samples)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            first = self._queue[0]
            if self.dispatch_when_idle:
                await asyncio.sleep(0)  # let handlers already scheduled reach arriving()
            while self._queued_samples < self.max_batch_size and not self._closing:
                if self.dispatch_when_idle and not self._arriving:
                    break  # the worker is idle and no more work is on its way: run now
                remaining = first.enqueued + self.max_queue_delay_s - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            items = self._take()
            now = loop.time()
            live = []
            for item in items:
                if item.future.done():
                    continue  # the caller cancelled or another chunk of it failed
                if item.deadline is not None and item.deadline <= now:
                    item.future.set_exception(
                        ScoreError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            "the deadline passed while the request was queued",
                        )
                    )
                    continue
                live.append(item)
            if live:
                try:
                    await self._run(live)
                except Exception:  # never let the loop die: fail the batch, keep serving
                    log.exception("batcher %s: unexpected error", self.name)
                    for item in live:
                        if not item.future.done():
                            item.future.set_exception(
                                ScoreError(grpc.StatusCode.INTERNAL, "internal batching error")
                            )

    def _take(self) -> list[_Item]:
        items: list[_Item] = []
        total = 0
        while self._queue:
            size = len(self._queue[0].batch)
            if items and total + size > self.max_batch_size:
                break
            items.append(self._queue.popleft())
            total += size
        self._queued_samples -= total
        self._set_depth()
        return items

    def _score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        self._running = True
        try:
            start = time.perf_counter()
            outputs = self.reward.score(batch)
            checked = check_outputs(outputs, tuple(self.reward.output_names), len(batch))
            seconds = time.perf_counter() - start
        finally:
            self._running = False
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self._metrics is not None:
            self._metrics.batch_size.labels(self.name).observe(len(batch))
            self._metrics.batch_latency.labels(self.name).observe(seconds)
            self._metrics.samples.labels(self.name).inc(len(batch))
        return checked

    async def _run(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        merged = RewardBatch.concat([item.batch for item in items])
        try:
            outputs = await loop.run_in_executor(self._executor, self._score, merged)
        except Exception as exc:
            if len(items) == 1:
                _fail(items[0], self._map_error(exc, items[0].offset))
                return
            log.warning(
                "reward %s: merged batch of %d requests raised %s; re-running them separately",
                self.name,
                len(items),
                type(exc).__name__,
            )
            for item in items:
                if item.future.done():
                    continue
                try:
                    result = await loop.run_in_executor(self._executor, self._score, item.batch)
                except Exception as single_exc:
                    _fail(item, self._map_error(single_exc, item.offset))
                else:
                    _succeed(item, result)
            return
        offset = 0
        for item in items:
            n = len(item.batch)
            _succeed(item, {k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n

    def _map_error(self, exc: Exception, offset: int) -> ScoreError:
        if isinstance(exc, SampleError):  # index within the request, not the chunk
            return invalid_argument(f"samples[{exc.index + offset}].{exc.field}", exc.description)
        log.error("reward %s raised while scoring", self.name, exc_info=exc)
        return ScoreError(
            grpc.StatusCode.INTERNAL,
            f"reward {self.name!r} failed: {type(exc).__name__}: {exc}"[:1000],
        )


def _shutting_down() -> ScoreError:
    return ScoreError(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down",
        retry_after_s=SHUTDOWN_RETRY_S,
    )


def _succeed(item: _Item, result: dict[str, np.ndarray]) -> None:
    if not item.future.done():
        item.future.set_result(result)


def _fail(item: _Item, error: ScoreError) -> None:
    if not item.future.done():
        item.future.set_exception(error)
