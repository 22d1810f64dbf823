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
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """The metric families of one server, registered in their own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        prefix = "dancegrpo_reward"
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
