"""``RewardClient``: numpy in, numpy out, against one or more reward-service replicas.

    with RewardClient("localhost:50051") as client:          # or ["10.0.0.1:50051", ...]
        client.wait_until_ready(timeout=60)                  # or "dns:///rewards:50051"
        out = client.score("hps", images=u8_nhw3, prompts=prompts)   # {"score": (N,) float32}
        fut = client.score_async("videoalign", videos=u8_nthw3, prompts=prompts)

- Every call has a deadline (``timeout`` overall, ``attempt_timeout`` per try).
- Retries only ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED`` and ``DEADLINE_EXCEEDED`` (the last
  only while the overall deadline leaves time), with capped, fully jittered exponential
  backoff (``RetryPolicy``).
- Several targets: one channel each, calls (and retries) rotate over them. One target:
  gRPC's ``round_robin`` policy over every address it resolves to (``dns:///`` for a
  Kubernetes headless Service).
- Batches larger than ``chunk_size`` are sent as concurrent chunks and reassembled in order;
  with ``group_sizes`` (group-wise rewards) chunks hold whole groups only.
- Failures raise ``RewardServiceError`` with the target, reward and gRPC code.

Never imports torch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dancegrpo_proto import codec
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


class RewardServiceError(RuntimeError):
    """A reward call failed: ``code`` is the gRPC status, ``target``/``reward`` say where."""

    def __init__(self, target: str, reward: str, code: grpc.StatusCode, details: str) -> None:
        what = f"reward {reward!r}" if reward else "reward service"
        super().__init__(f"{what} at {target}: {code.name}: {details}")
        self.target = target
        self.reward = reward
        self.code = code
        self.details = details


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter (sleep ~ U(0, min(max, initial·mult^k))).

    ``max_attempts`` counts the first try; 1 disables retries.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                "RetryPolicy needs 0 < initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to sleep before retry number ``retry`` (0-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return rng.uniform(0.0, cap)


_SCORE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['RewardService'].full_name}/Score"


@dataclasses.dataclass
class _Channel:
    target: str
    channel: grpc.Channel
    stub: rewards_pb2_grpc.RewardServiceStub
    #: ``Score`` taking the request's wire bytes (``codec.serialize_score_request``).
    score_bytes: grpc.UnaryUnaryMultiCallable


class RewardClient:
    """A thread-safe client of one or more reward-service replicas.

    Args:
        targets: ``"host:port"``, a gRPC URI (``"dns:///svc:50051"``) or a list of them.
        timeout: overall deadline of one ``score``/``list_rewards`` call, retries included (s).
        attempt_timeout: deadline of one attempt (s); ``None`` = whatever remains of ``timeout``.
        retry: the retry policy (default ``RetryPolicy()``).
        chunk_size: most samples per request; larger batches are split and sent concurrently.
        max_concurrency: threads for concurrent chunks and for ``score_async``.
        encoding: default media encoding, ``"raw"`` (fast), ``"png"`` or ``"jpeg"``.
        token: bearer token sent as ``authorization: Bearer <token>``.
        root_certificates, private_key, certificate_chain: PEM bytes; any of them enables TLS
            (``private_key``/``certificate_chain`` for mTLS).
        max_message_bytes: gRPC send/receive limit (default 512 MiB, like the server).
        channel_options: extra gRPC channel arguments.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        timeout: float = 120.0,
        attempt_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        chunk_size: int | None = 32,
        max_concurrency: int = 8,
        encoding: codec.Encoding = "raw",
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        target_list = [targets] if isinstance(targets, str) else list(targets)
        if not target_list or not all(isinstance(t, str) and t for t in target_list):
            raise ValueError(f"targets must be a non-empty string or list of strings: {targets!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if attempt_timeout is not None and attempt_timeout <= 0:
            raise ValueError(f"attempt_timeout must be positive, got {attempt_timeout}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if encoding not in codec.ENCODINGS:
            raise ValueError(f"encoding must be one of {codec.ENCODINGS}, got {encoding!r}")
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        self.encoding = encoding
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
            *channel_options,
        ]
        credentials = None
        if root_certificates or private_key or certificate_chain:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        self._channels = []
        for target in target_list:
            if credentials is None:
                channel = grpc.insecure_channel(target, options=options)
            else:
                channel = grpc.secure_channel(target, credentials, options=options)
            score_bytes = channel.unary_unary(
                _SCORE_METHOD, response_deserializer=pb.ScoreResponse.FromString
            )
            self._channels.append(
                _Channel(target, channel, rewards_pb2_grpc.RewardServiceStub(channel), score_bytes)
            )
        self._rotation = itertools.cycle(range(len(self._channels)))
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._chunk_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="reward-chunk"
        )
        self._async_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="reward-async"
        )
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def targets(self) -> list[str]:
        """The configured targets, in rotation order."""
        return [c.target for c in self._channels]

    def score(
        self,
        reward: str,
        *,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
        videos: np.ndarray | Sequence[np.ndarray] | None = None,
        prompts: Sequence[str] | None = None,
        condition_images: np.ndarray | Sequence[np.ndarray | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        encoding: codec.Encoding | None = None,
        timeout: float | None = None,
        request_id: str = "",
        group_sizes: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Scores samples with ``reward``; returns ``{output: float32 array (N,)}``.

        Args:
            images: ``uint8 [N, H, W, 3]`` or a list of ``[H, W, 3]`` arrays (sizes may differ).
            videos: ``uint8 [N, T, H, W, 3]`` or a list of ``[T, H, W, 3]`` arrays.
            prompts: one prompt per sample.
            condition_images: per sample ``uint8 [H, W, 3]`` or ``None`` (image-to-video).
            metadata: per sample ``{"geneval": {...}, "attributes": {...}}`` or ``None``.
            encoding: overrides the client's default encoding for this call.
            timeout: overrides the client's overall deadline (seconds).
            request_id: echoed in server logs.
            group_sizes: consecutive groups of samples (``ScoreRequest.group_sizes``),
                required by group-wise rewards (``RewardInfo.scoring_scope``). Chunks are
                then made of whole groups (a group larger than ``chunk_size`` is sent alone):
                a group is never split across requests.

        Raises:
            ValueError: malformed inputs (checked before sending).
            RewardServiceError: the service answered with an error.
        """
        self._check_open()
        if (images is None) == (videos is None):
            raise ValueError("pass exactly one of images= or videos=")
        media = images if images is not None else videos
        n = len(media)
        if n == 0:
            raise ValueError("no samples to score")
        # Checked before chunking: a chunk of a too-long column could still match its media.
        codec.check_columns(
            n, prompts=prompts, condition_images=condition_images, metadata=metadata
        )
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if group_sizes is None:
            chunk = self.chunk_size or n
            spans = [(s, min(s + chunk, n), None) for s in range(0, n, chunk)]
        else:
            try:
                sizes = codec.check_group_sizes(n, group_sizes)
            except codec.CodecError as exc:
                raise ValueError(str(exc)) from None
            spans = [
                (start, stop, sizes[g0:g1])
                for start, stop, g0, g1 in codec.group_chunks(sizes, self.chunk_size)
            ]
        requests = []  # wire bytes, built once per chunk (retries resend them)
        for start, stop, chunk_groups in spans:
            try:
                requests.append(
                    codec.serialize_score_request(
                        reward,
                        media[start:stop],
                        None if prompts is None else prompts[start:stop],
                        condition_images=(
                            None if condition_images is None else condition_images[start:stop]
                        ),
                        metadata=None if metadata is None else metadata[start:stop],
                        encoding=encoding or self.encoding,
                        request_id=request_id,
                        group_sizes=chunk_groups,
                    )
                )
            except codec.CodecError as exc:
                raise ValueError(_shift_index(str(exc), start)) from None
        if len(requests) == 1:
            responses = [self._call_score(reward, requests[0], deadline)]
        else:
            futures = [
                self._chunk_pool.submit(self._call_score, reward, r, deadline) for r in requests
            ]
            responses = [f.result() for f in futures]
        parts = [codec.response_to_numpy(r) for r in responses]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def score_async(self, reward: str, **kwargs: Any) -> concurrent.futures.Future:
        """Like ``score`` but returns a ``concurrent.futures.Future`` of its result."""
        self._check_open()
        return self._async_pool.submit(self.score, reward, **kwargs)

    def list_rewards(self, timeout: float | None = None) -> list[pb.RewardInfo]:
        """The rewards the (next) replica hosts, sorted by name."""
        self._check_open()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        reply = self._with_retries(
            "",
            deadline,
            lambda ch, t: ch.stub.ListRewards(
                pb.ListRewardsRequest(), timeout=t, metadata=self._metadata
            ),
        )
        return list(reply.rewards)

    def wait_until_ready(self, timeout: float = 60.0, reward: str = "") -> None:
        """Blocks until every target's health service reports ``SERVING`` for ``reward``
        (``""`` = the whole server). Raises ``TimeoutError`` naming the targets not ready."""
        self._check_open()
        deadline = time.monotonic() + timeout
        pending = list(self._channels)
        last: dict[str, str] = {}
        while pending:
            for ch in list(pending):
                stub = health_pb2_grpc.HealthStub(ch.channel)
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=reward),
                        timeout=max(0.05, min(2.0, deadline - time.monotonic())),
                    )
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    status = exc.code().name
                last[ch.target] = status
                if status == "SERVING":
                    pending.remove(ch)
            if not pending:
                return
            if time.monotonic() >= deadline:
                states = ", ".join(f"{c.target}={last.get(c.target)}" for c in pending)
                raise TimeoutError(f"reward service not ready after {timeout} s: {states}")
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Closes the channels and worker threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._async_pool.shutdown(wait=False, cancel_futures=True)
        self._chunk_pool.shutdown(wait=False, cancel_futures=True)
        for ch in self._channels:
            ch.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RewardClient is closed")

    def _next_channel(self) -> _Channel:
        with self._lock:
            return self._channels[next(self._rotation)]

    def _call_score(self, reward: str, request: bytes, deadline: float) -> pb.ScoreResponse:
        def call(ch: _Channel, attempt_timeout: float) -> pb.ScoreResponse:
            return ch.score_bytes(request, timeout=attempt_timeout, metadata=self._metadata)

        return self._with_retries(reward, deadline, call)

    def _with_retries(self, reward: str, deadline: float, call: Any) -> Any:
        retry = 0
        while True:
            ch = self._next_channel()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RewardServiceError(
                    ch.target, reward, grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline passed"
                )
            attempt = (
                remaining if self.attempt_timeout is None else min(remaining, self.attempt_timeout)
            )
            try:
                return call(ch, attempt)
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or ""
            retry += 1
            sleep = self.retry.backoff(retry - 1, self._rng)
            if (
                code not in RETRYABLE_CODES
                or retry >= self.retry.max_attempts
                or time.monotonic() + sleep >= deadline
            ):
                raise RewardServiceError(ch.target, reward, code, details)
            time.sleep(sleep)


def _shift_index(message: str, offset: int) -> str:
    """Rewrites ``samples[i]`` in a chunk-relative codec message to the caller's index."""
    if not offset or not message.startswith("samples["):
        return message
    close = message.index("]")
    return f"samples[{int(message[8:close]) + offset}]{message[close + 1 :]}"
