"""Assembles and runs a reward server: gRPC (aio), health, reflection, metrics, shutdown.

Start-up order: build every reward from the config (option errors fail here, before any
port is bound) → bind gRPC with health ``NOT_SERVING`` → start the metrics exporter →
``load()`` + ``warmup()`` each reward on a thread → mark it ``SERVING`` (per reward name,
then the overall ``""`` service once all are ready).

Shutdown (``shutdown()``, wired to SIGTERM/SIGINT by ``serve``): health → ``NOT_SERVING``,
new calls are still served for ``drain_s`` (so load balancers see the health change and stop
routing here before anything is refused), then the gRPC server stops accepting new calls,
queued and running batches finish within ``grace_period_s``, then worker threads stop.
Calls still running when the grace period ends are cancelled; a ``score()`` (or a load)
still running on a worker thread cannot be interrupted, so ``shutdown()`` reports it and
the CLI exits without waiting for it: exit is bounded by ``drain_s + grace_period_s``.

Every service is registered through ``SafeRegistrar``: a request protobuf cannot parse
gets ``INVALID_ARGUMENT``, never ``UNKNOWN``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dancegrpo_proto import SERVICE_NAME
from dancegrpo_proto.v1 import rewards_pb2, rewards_pb2_grpc
from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.batching import DynamicBatcher
from dancegrpo_rewards.config import ServiceConfig
from dancegrpo_rewards.interceptors import (
    UNKNOWN_REWARD_LABEL,
    BearerTokenInterceptor,
    ObservabilityInterceptor,
)
from dancegrpo_rewards.metrics import ServiceMetrics
from dancegrpo_rewards.reflection import add_reflection
from dancegrpo_rewards.registry import reward_class
from dancegrpo_rewards.safe_handlers import SafeRegistrar
from dancegrpo_rewards.service import HostedReward, RewardServicer
from dancegrpo_rewards.validation import RequestDecoder

log = logging.getLogger("dancegrpo_rewards.server")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclasses.dataclass(frozen=True)
class BoundAddress:
    """Where a started server listens."""

    host: str
    port: int
    metrics_port: int | None

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        host = "127.0.0.1" if self.host in ("0.0.0.0", "[::]", "::") else self.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.metrics_port}/metrics"


def build_rewards(config: ServiceConfig) -> dict[str, HostedReward]:
    """Instantiates every configured reward (parses options; loads no weights)."""
    hosted = {}
    for name, spec in config.rewards.items():
        try:
            cls = reward_class(spec.kind)
        except KeyError as exc:
            raise RewardConfigError(f"rewards.{name}.kind: {exc.args[0]}") from None
        reward = cls(name, spec.options)
        decoder = RequestDecoder(reward, spec, max_decoded_bytes=config.server.max_decoded_bytes)
        hosted[name] = HostedReward(spec=spec, reward=reward, decoder=decoder)
    return hosted


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_options(config: ServiceConfig) -> list[tuple[str, int]]:
    """gRPC server channel arguments from ``config.server``."""
    cfg = config.server
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if cfg.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", round(cfg.max_connection_age_s * 1000)))
        if cfg.max_connection_age_grace_s is not None:
            grace_ms = round(cfg.max_connection_age_grace_s * 1000)
            options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    return options


class RewardServer:
    """One reward-server process: ``await start()``, then ``await shutdown()``."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.hosted = build_rewards(config)
        self.metrics.init_rewards(self.hosted, UNKNOWN_REWARD_LABEL)
        self.address: BoundAddress | None = None
        self._health = health.aio.HealthServicer()
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.server.decode_workers, thread_name_prefix="decode"
        )
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self._loading = False  # a reward's load()/warmup() is running on a thread

    def _credentials_or_none(self) -> grpc.ServerCredentials | None:
        tls = self.config.server.tls
        if tls is None:
            return None
        return grpc.ssl_server_credentials(
            [(_read(tls.key), _read(tls.cert))],
            root_certificates=_read(tls.client_ca) if tls.client_ca else None,
            require_client_auth=bool(tls.client_ca),
        )

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ObservabilityInterceptor(self.metrics, self.hosted)
        ]
        auth = self.config.server.auth
        if auth is not None:
            token = os.environ.get(auth.token_env, "")
            if not token:
                raise RewardConfigError(
                    f"server.auth.token_env: environment variable {auth.token_env} is empty or unset"
                )
            interceptors.append(BearerTokenInterceptor(token))
        return interceptors

    async def start(
        self, *, port: int | None = None, metrics_port: int | None = -1
    ) -> BoundAddress:
        """Binds, starts serving health, then loads and warms up every reward.

        ``port``/``metrics_port`` override the config (``metrics_port=None`` disables metrics;
        the default ``-1`` keeps the config's value).
        """
        cfg = self.config.server
        server = grpc.aio.server(
            interceptors=self._interceptors(), options=server_options(self.config)
        )
        servicer = RewardServicer(
            self.hosted, max_message_bytes=cfg.max_message_bytes, decode_pool=self._decode_pool
        )
        registrar = SafeRegistrar(server)
        rewards_pb2_grpc.add_RewardServiceServicer_to_server(servicer, registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registrar)
        service_names = (
            rewards_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
            health.SERVICE_NAME,
        )
        add_reflection(registrar, service_names)
        for name in ["", SERVICE_NAME, *self.hosted]:
            await self._health.set(name, _NOT_SERVING)

        bind_port = cfg.port if port is None else port
        host = cfg.host
        address = (
            f"[{host}]:{bind_port}"
            if ":" in host and not host.startswith("[")
            else f"{host}:{bind_port}"
        )
        credentials = self._credentials_or_none()
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
        if bound == 0:
            raise OSError(f"could not bind the gRPC port {address}")
        await server.start()
        self._server = server

        wanted_metrics = cfg.metrics_port if metrics_port == -1 else metrics_port
        bound_metrics = None
        if wanted_metrics is not None:
            bound_metrics = self.metrics.serve(
                host if host not in ("[::]", "::") else "::", wanted_metrics
            )
        self.address = BoundAddress(host=host, port=bound, metrics_port=bound_metrics)
        log.info(
            "listening (rewards loading, health NOT_SERVING)",
            extra={"fields": {"target": self.address.target, "metrics": self.address.metrics_url}},
        )
        await self._load_all()
        return self.address

    async def _load_all(self) -> None:
        for name, hosted in self.hosted.items():
            if self._stopping:
                return
            start = time.perf_counter()
            self._loading = True
            try:
                await asyncio.to_thread(hosted.reward.load)
                await asyncio.to_thread(hosted.reward.warmup)
            finally:
                self._loading = False
            spec = hosted.spec
            batcher = DynamicBatcher(
                hosted.reward,
                max_batch_size=spec.max_batch_size,
                max_queue_delay_s=spec.max_queue_delay_ms / 1000.0,
                max_queue_size=spec.max_queue_size,
                dispatch_when_idle=spec.dispatch_when_idle,
                metrics=self.metrics,
            )
            batcher.start()
            hosted.batcher = batcher
            self.metrics.ready.labels(name).set(1)
            await self._health.set(name, _SERVING)
            log.info(
                "reward ready",
                extra={
                    "fields": {
                        "reward": name,
                        "kind": spec.kind,
                        "version": hosted.reward.version,
                        "load_s": round(time.perf_counter() - start, 3),
                    }
                },
            )
        if not self._stopping:
            await self._health.set("", _SERVING)
            await self._health.set(SERVICE_NAME, _SERVING)

    async def shutdown(self, grace_s: float | None = None, drain_s: float | None = None) -> bool:
        """Graceful stop: NOT_SERVING, keep serving for ``drain_s``, then refuse new calls and
        finish in-flight work within grace.

        Returns whether every worker finished; ``False`` means a ``score()`` (or a reward's
        load) is still running on a thread after the grace period: the caller should exit
        without waiting for it (``cli`` does), as Python would otherwise join the thread.
        """
        if self._stopping:
            return True
        self._stopping = True
        grace = self.config.server.grace_period_s if grace_s is None else grace_s
        drain = self.config.server.drain_s if drain_s is None else drain_s
        log.info("shutting down", extra={"fields": {"drain_s": drain, "grace_s": grace}})
        await self._health.enter_graceful_shutdown()
        if drain > 0 and self._server is not None:
            # Health already says NOT_SERVING; keep answering while balancers notice.
            await asyncio.sleep(drain)
        # Batchers keep running while the server drains, so in-flight calls complete; the
        # server cancels whatever is still running when the grace period ends.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._server is not None:
            await self._server.stop(grace)
        batchers = [h.batcher for h in self.hosted.values() if h.batcher is not None]
        remaining = max(0.0, deadline - loop.time())
        finished = all(await asyncio.gather(*(b.close(remaining) for b in batchers)))
        finished = finished and not self._loading
        if not finished:
            log.warning(
                "a reward's score() or load() is still running after the grace period "
                f"({grace} s); not waiting for it"
            )
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        log.info("stopped")
        return finished

    async def wait_for_termination(self) -> None:
        """Returns when the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (the first one; a second SIGINT still interrupts)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
