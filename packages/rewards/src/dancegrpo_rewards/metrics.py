"""Prometheus metrics of a reward server (one registry per server, served over HTTP).

Names (all prefixed ``dancegrpo_reward_``):

- ``requests_total{method, reward, code}`` — finished RPCs by gRPC status code name.
- ``errors_total{method, reward, code}`` — the subset with a code other than ``OK``.
- ``request_latency_seconds{method, reward}`` — RPC latency histogram (server side).
- ``samples_total{reward}`` — samples scored.
- ``batch_size{reward}`` — histogram of merged batch sizes (samples per forward pass).
- ``batch_latency_seconds{reward}`` — forward-pass latency histogram.
- ``queue_depth{reward}`` — samples waiting in the reward's queue.
- ``ready{reward}`` — 1 once the reward is loaded and warmed up.
- ``build_info{version, python, grpc, protobuf}`` — always 1; the labels say what runs.

Plus the standard ``process_*`` (CPU, memory, open files), ``python_gc_*`` and
``python_info`` collectors. Every series of a hosted reward exists, at 0, from start-up
(``init_rewards``), so the first request already moves a rate; there are no ``*_created``
series (``disable_created_metrics``, process-wide).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

import grpc
from google import protobuf
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from dancegrpo_rewards import __version__

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Codes a ``Score`` call on a hosted reward can end with, each created at 0 at start-up.
SCORE_CODES = (
    "OK",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "CANCELLED",
)
#: Codes of ``Score`` calls not attributed to a hosted reward (label ``_unknown``).
UNKNOWN_REWARD_CODES = ("NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED")


class ServiceMetrics:
    """The metric families of one server, registered in their own ``CollectorRegistry``."""

    def __init__(self) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        prefix = "dancegrpo_reward"
        self.build_info = Gauge(
            f"{prefix}_build_info",
            "Always 1; labels name the dancegrpo-rewards, Python, grpcio and protobuf versions.",
            ["version", "python", "grpc", "protobuf"],
            registry=self.registry,
        )
        self.build_info.labels(
            __version__, platform.python_version(), grpc.__version__, protobuf.__version__
        ).set(1)
        self.requests = Counter(
            f"{prefix}_requests",
            "Finished RPCs by method, reward and gRPC status code.",
            ["method", "reward", "code"],
            registry=self.registry,
        )
        self.errors = Counter(
            f"{prefix}_errors",
            "Finished RPCs with a status code other than OK.",
            ["method", "reward", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{prefix}_request_latency_seconds",
            "Server-side RPC latency.",
            ["method", "reward"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.samples = Counter(
            f"{prefix}_samples", "Samples scored.", ["reward"], registry=self.registry
        )
        self.batch_size = Histogram(
            f"{prefix}_batch_size",
            "Samples per merged forward pass.",
            ["reward"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            f"{prefix}_batch_latency_seconds",
            "Forward-pass latency of one merged batch.",
            ["reward"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            f"{prefix}_queue_depth",
            "Samples waiting in the reward's queue.",
            ["reward"],
            registry=self.registry,
        )
        self.ready = Gauge(
            f"{prefix}_ready",
            "1 once the reward is loaded and warmed up.",
            ["reward"],
            registry=self.registry,
        )

    def init_rewards(self, names: Iterable[str], unknown_label: str) -> None:
        """Creates every series of the hosted rewards at 0 (and of ``unknown_label``)."""
        for name in names:
            for code in SCORE_CODES:
                self.requests.labels("Score", name, code)
                if code != "OK":
                    self.errors.labels("Score", name, code)
            self.latency.labels("Score", name)
            self.samples.labels(name)
            self.batch_size.labels(name)
            self.batch_latency.labels(name)
            self.queue_depth.labels(name).set(0)
            self.ready.labels(name).set(0)
        for code in UNKNOWN_REWARD_CODES:
            self.requests.labels("Score", unknown_label, code)
            self.errors.labels("Score", unknown_label, code)
        self.requests.labels("ListRewards", "", "OK")
        self.latency.labels("ListRewards", "")

    def observe_rpc(self, method: str, reward: str, code: str, seconds: float) -> None:
        """Records one finished RPC."""
        self.requests.labels(method, reward, code).inc()
        if code != "OK":
            self.errors.labels(method, reward, code).inc()
        self.latency.labels(method, reward).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP exporter in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stops the HTTP exporter, if running."""
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
