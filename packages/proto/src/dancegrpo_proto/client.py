"""``RewardClient``: numpy in, numpy out, against one or more reward-service replicas.

    with RewardClient("localhost:50051") as client:          # or ["10.0.0.1:50051", ...]
        client.wait_until_ready(timeout=60)                  # or "dns:///rewards:50051"
        out = client.score("hps", images=u8_nhw3, prompts=prompts)   # {"score": (N,) float32}
        fut = client.score_async("videoalign", videos=u8_nthw3, prompts=prompts)

- Every call has a deadline (``timeout`` overall, ``attempt_timeout`` per try).
- Retries only ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED`` and ``DEADLINE_EXCEEDED`` (the last
  only while the overall deadline leaves time), with capped, fully jittered exponential
  backoff (``RetryPolicy``), never shorter than the server's ``google.rpc.RetryInfo``
  delay. ``RESOURCE_EXHAUSTED`` is retried only with ``RetryInfo`` (a full queue); without
  it gRPC is saying the message is above the server's size limit, which no retry fixes.
  The loop is ours, not gRPC's: gRPC's built-in retries stop silently once a request
  exceeds the 256 KiB per-call retry buffer, and reward requests are megabytes. The
  channels therefore take only the load-balancing and health-checking parts of the
  published service config (``service_config()``), never its retry policy.
- Health-aware: every channel watches its replicas' ``grpc.health.v1`` status (gRPC
  client-side health checking), so a replica reporting ``NOT_SERVING`` (draining, loading)
  gets no new calls while another is ``SERVING``.
- Several targets: one channel each; calls rotate over the channels whose replicas are up,
  and a retry never goes back to the target that just failed while another is up. One
  target: gRPC's ``round_robin`` policy over every address it resolves to (``dns:///`` for
  a Kubernetes headless Service), skipping unhealthy ones.
- Batches larger than ``chunk_size`` are sent as concurrent chunks and reassembled in order;
  with ``group_sizes`` (group-wise rewards) chunks hold whole groups only.
- Failures raise ``RewardServiceError`` with the target, reward and gRPC code.

Never imports torch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import random
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dancegrpo_proto import allocator, codec
from dancegrpo_proto.targets import host_name, replica_addresses
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


#: Channel arguments RewardClient sets besides message sizes and the service config
#: (``channel_options`` override them). A restarted replica is reconnected to within ~2 s
#: (gRPC's default backoff grows to 120 s), and channels never go idle, so a replica that
#: was down is probed again without waiting for a call.
DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.client_idle_timeout_ms": 2**31 - 1,
}


@functools.cache
def _published_service_config() -> str:
    return resources.files("dancegrpo_proto.v1").joinpath("service_config.json").read_text()


def service_config() -> dict[str, Any]:
    """The recommended client policy, as a standard gRPC service config.

    Published as ``dancegrpo/rewards/v1/service_config.json`` beside the proto, for clients
    in any language: ``round_robin`` over the resolved addresses, client-side health
    checking on the whole-server health service ``""``, and for ``RewardService`` a 120 s
    deadline with 5 attempts on ``UNAVAILABLE``/``RESOURCE_EXHAUSTED`` (0.1 s initial, 5 s
    maximum backoff, ×2). gRPC applies such a ``retryPolicy`` only to requests that fit
    its per-call retry buffer (256 KiB by default); larger ones are sent once.
    """
    return json.loads(_published_service_config())


def client_service_config() -> dict[str, Any]:
    """The part of ``service_config()`` that ``RewardClient``'s channels use.

    Load balancing and health checking apply as published. ``methodConfig`` is left out:
    the client's own retry loop (``RetryPolicy``, same defaults) retries requests of any
    size, stacking gRPC's retries under it would multiply attempts, and the client's
    ``timeout``/``attempt_timeout`` are the deadlines.
    """
    config = service_config()
    config.pop("methodConfig", None)
    return config


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


_READY = grpc.ChannelConnectivity.READY
_DOWN = frozenset({grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN})


@dataclasses.dataclass(eq=False)
class _Channel:
    target: str
    channel: grpc.Channel
    stub: rewards_pb2_grpc.RewardServiceStub
    #: ``Score`` taking the request's wire bytes (``codec.serialize_score_request``).
    score_bytes: grpc.UnaryUnaryMultiCallable
    #: Latest connectivity; with health checking, ``READY`` means a replica is ``SERVING``
    #: and ``TRANSIENT_FAILURE`` that none is (down, draining or loading).
    state: grpc.ChannelConnectivity = grpc.ChannelConnectivity.IDLE

    def watch(self) -> None:
        self.channel.subscribe(self._on_change, try_to_connect=True)

    def unwatch(self) -> None:
        self.channel.unsubscribe(self._on_change)

    def watching(self) -> bool:
        """Whether grpc's connectivity-polling thread still runs. It notices an unsubscribe
        within 0.2 s; closing the channel before that makes it raise "Cannot monitor
        channel state: Channel closed!" (grpc/grpc#29848). ``_connectivity_state`` is
        private: without it, assume the thread has stopped."""
        state = getattr(self.channel, "_connectivity_state", None)
        return bool(getattr(state, "polling", False))

    def _on_change(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state


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
        tune_malloc: apply ``dancegrpo_proto.allocator.tune_malloc()`` to this process
            (glibc keeps freed request-sized buffers instead of re-faulting their pages on
            every call; ~1.5 ms per 1.5 MB request on 2 cores). Process-wide, once.
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
        tune_malloc: bool = True,
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
        if tune_malloc:
            allocator.tune_malloc()
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        self.encoding = encoding
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        merged = {
            "grpc.max_send_message_length": max_message_bytes,
            "grpc.max_receive_message_length": max_message_bytes,
            "grpc.service_config": json.dumps(client_service_config()),
            **DEFAULT_CHANNEL_OPTIONS,
            **dict(channel_options),
        }
        options = list(merged.items())
        self._credentials = None
        if root_certificates or private_key or certificate_chain:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        self._channels: list[_Channel] = []
        for target in target_list:
            channel = self._open_channel(target, options)
            score_bytes = channel.unary_unary(
                _SCORE_METHOD, response_deserializer=pb.ScoreResponse.FromString
            )
            ch = _Channel(target, channel, rewards_pb2_grpc.RewardServiceStub(channel), score_bytes)
            ch.watch()  # connects now and tracks health from here on
            self._channels.append(ch)
        self._cursor = 0
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
        """Blocks until every replica this client will call is ready.

        For each target, every address it resolves to (a ``dns:`` name or plain
        ``host:port`` through DNS, each address of an ``ipv4:``/``ipv6:`` list) is asked for
        its health: each one that answers must report ``SERVING`` for ``reward`` (``""`` =
        the whole server), and at least one per target must answer. Addresses that refuse
        connections (a pod that is gone, the ``::1`` entry of ``localhost`` when the server
        binds IPv4 only) are not waited for: gRPC cannot call them either. Then waits until
        every channel is ``READY``. Raises ``TimeoutError`` naming what is not ready.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        probes = [(ch.target, self._probes(ch.target)) for ch in self._channels]
        try:
            while True:
                waiting = []
                for target, replicas in probes:
                    states = {a: _health(stub, reward, deadline) for a, stub, _ in replicas}
                    answered = [state for state in states.values() if state != "UNAVAILABLE"]
                    if not answered or any(state != "SERVING" for state in answered):
                        waiting += [
                            f"{target}={state}" if a == target else f"{target} ({a})={state}"
                            for a, state in states.items()
                            if state != "SERVING"
                        ]
                if not waiting:
                    waiting = [
                        f"{c.target}={c.state.name}" for c in self._channels if c.state != _READY
                    ]
                if not waiting:
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"reward service not ready after {timeout} s: {', '.join(waiting)}"
                    )
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            for _, replicas in probes:
                for _, _, channel in replicas:
                    channel.close()

    def close(self) -> None:
        """Closes the channels and worker threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._async_pool.shutdown(wait=False, cancel_futures=True)
        self._chunk_pool.shutdown(wait=False, cancel_futures=True)
        for ch in self._channels:
            ch.unwatch()
        stop = time.monotonic() + 1.0
        while any(ch.watching() for ch in self._channels) and time.monotonic() < stop:
            time.sleep(0.01)
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

    def _open_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self._credentials, options=options)

    def _probes(self, target: str) -> list[tuple[str, Any, grpc.Channel]]:
        """``(address, health stub, channel)`` for every replica address behind ``target``.

        Plain channels (no health-checking service config), so a ``NOT_SERVING`` replica
        answers the probe instead of being hidden by the channel's own health check.
        """
        probes = []
        host = host_name(target)
        for address in replica_addresses(target):
            options = [("grpc.max_reconnect_backoff_ms", 1000)]
            if self._credentials is not None and host and address != target:
                options.append(("grpc.ssl_target_name_override", host))
            channel = self._open_channel(address, options)
            probes.append((address, health_pb2_grpc.HealthStub(channel), channel))
        return probes

    def _pick(self, failed: Mapping[int, int]) -> int:
        """The index of the channel for the next attempt of a call.

        Preference: a channel whose replicas are up (``READY``), rotating; then one whose
        state is not known yet (``IDLE``/``CONNECTING``); then one that failed earlier in
        this call (the least recent failure first); then one that is down. ``failed`` maps
        a channel index to the attempt at which it last failed in this call.
        """
        n = len(self._channels)
        if n == 1:
            return 0

        def preference(k: int) -> tuple[int, int, int]:
            i = (start + k) % n
            state = self._channels[i].state
            last_failure = failed.get(i, -1)
            if state in _DOWN:
                rank = 3
            elif last_failure >= 0:
                rank = 2
            else:
                rank = 0 if state == _READY else 1
            return rank, last_failure, k

        with self._lock:
            start = self._cursor
            chosen = (start + min(range(n), key=preference)) % n
            self._cursor = (chosen + 1) % n
        return chosen

    def _call_score(self, reward: str, request: bytes, deadline: float) -> pb.ScoreResponse:
        def call(ch: _Channel, attempt_timeout: float) -> pb.ScoreResponse:
            return ch.score_bytes(request, timeout=attempt_timeout, metadata=self._metadata)

        return self._with_retries(reward, deadline, call)

    def _with_retries(self, reward: str, deadline: float, call: Any) -> Any:
        failed: dict[int, int] = {}  # channel index -> attempt at which it last failed
        attempt = 0
        while True:
            index = self._pick(failed)
            ch = self._channels[index]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RewardServiceError(
                    ch.target, reward, grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline passed"
                )
            attempt_timeout = (
                remaining if self.attempt_timeout is None else min(remaining, self.attempt_timeout)
            )
            try:
                return call(ch, attempt_timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                server_delay = retry_delay(exc)
            failed[index] = attempt
            attempt += 1
            sleep = max(self.retry.backoff(attempt - 1, self._rng), server_delay or 0.0)
            # A full queue says so with RetryInfo; gRPC's own RESOURCE_EXHAUSTED (a message
            # above the server's size limit) has none, and no retry can fix it.
            hopeless = code == grpc.StatusCode.RESOURCE_EXHAUSTED and server_delay is None
            if (
                code not in RETRYABLE_CODES
                or hopeless
                or attempt >= self.retry.max_attempts
                or time.monotonic() + sleep >= deadline
            ):
                raise RewardServiceError(ch.target, reward, code, details)
            if any(i not in failed and c.state == _READY for i, c in enumerate(self._channels)):
                sleep = 0.0  # another replica is up: go there now
            time.sleep(sleep)


def retry_delay(exc: grpc.RpcError) -> float | None:
    """The server's ``google.rpc.RetryInfo`` delay in seconds, if the error carries one
    (in the ``grpc-status-details-bin`` trailer), else ``None``."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    raw = next((v for k, v in trailers or () if k == _STATUS_DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # a malformed trailer is the same as none
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def _health(stub: Any, service: str, deadline: float) -> str:
    """The health status name of one replica (``SERVING``, ...) or the gRPC error code name."""
    try:
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=max(0.05, min(1.0, deadline - time.monotonic())),
        )
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _shift_index(message: str, offset: int) -> str:
    """Rewrites ``samples[i]`` in a chunk-relative codec message to the caller's index."""
    if not offset or not message.startswith("samples["):
        return message
    close = message.index("]")
    return f"samples[{int(message[8:close]) + offset}]{message[close + 1 :]}"
