"""RewardClient across replicas that die, drain or load: routing around them, retries that
never go back to the replica that just failed, readiness of every replica, and the
published service config (and why the client keeps its own retry loop)."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dancegrpo_proto import RetryPolicy, RewardClient
from dancegrpo_proto.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RETRYABLE_CODES,
    client_service_config,
    service_config,
)
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_testing.certs import make_test_certs
from dancegrpo_testing.servers import PROBE_KIND, running_reward_server

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto/dancegrpo/rewards/v1"
COLOR = {"rewards": {"color": {"kind": "color_match"}}}
IMAGE, PROMPT = np.zeros((1, 4, 4, 3), np.uint8), ["red"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _score_requests(metrics_url: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("dancegrpo_reward_requests_total{") and 'method="Score"' in line
        )
    )


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_dead_replica_in_the_list_fails_no_call():
    # Before: 1-21 of 800 calls failed because a retry could land on the dead target again.
    # With two attempts per call, any retry that went back to the dead replica would fail.
    dead = f"127.0.0.1:{_free_port()}"
    with running_reward_server(COLOR) as live:
        client = RewardClient([dead, live.target], retry=RetryPolicy(max_attempts=2), timeout=60)
        before = _score_requests(live.metrics_url)

        def calls(_: int) -> int:
            for _ in range(50):
                client.score("color", images=IMAGE, prompts=PROMPT)
            return 50

        with client, concurrent.futures.ThreadPoolExecutor(16) as pool:
            done = sum(pool.map(calls, range(16)))  # raises if any call failed
        assert done == 800
        assert _score_requests(live.metrics_url) - before == 800


def test_retry_order_prefers_up_replicas_and_never_the_one_that_just_failed():
    ready, connecting = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING
    down = grpc.ChannelConnectivity.TRANSIENT_FAILURE
    ports = [_free_port() for _ in range(3)]
    with RewardClient([f"127.0.0.1:{p}" for p in ports]) as client:
        channels = client._channels
        client.close()  # stop the state watchers; the states below are set by hand

        def pick(states, failed):
            for ch, state in zip(channels, states, strict=True):
                ch.state = state
            return client._pick(failed)

        # Up replicas rotate; unknown and down ones wait.
        assert {pick([ready, connecting, ready], {}) for _ in range(4)} == {0, 2}
        assert pick([down, connecting, down], {}) == 1
        # A retry goes to another up replica, never back to the one that just failed ...
        assert all(pick([ready, ready, down], {0: 0}) == 1 for _ in range(3))
        # ... nor to any that failed earlier in the call while an unknown one remains ...
        assert pick([ready, ready, connecting], {0: 0, 1: 1}) == 2
        # ... and when all have failed, to the least recent failure first.
        assert pick([ready, ready, ready], {0: 1, 1: 0, 2: 2}) == 1
        # A failed replica that is still up beats one that is down.
        assert pick([ready, down, down], {0: 0}) == 0


def test_draining_replica_gets_no_new_calls_after_it_reports_not_serving():
    # Before: RewardClient sent 20 of 40 calls to a replica that was draining (NOT_SERVING).
    config = {"server": {"drain_s": 6}, **COLOR}
    with running_reward_server(config) as a, running_reward_server(config) as b:
        listed = RewardClient([a.target, b.target], timeout=30)
        balanced = RewardClient(f"ipv4:{a.target},{b.target}", timeout=30)
        with listed, balanced:
            for client in (listed, balanced):
                client.wait_until_ready(timeout=30)
                for _ in range(10):
                    client.score("color", images=IMAGE, prompts=PROMPT)
            assert _score_requests(a.metrics_url) > 0  # both replicas were in use
            a.process.send_signal(signal.SIGTERM)  # health NOT_SERVING, still serving 6 s
            time.sleep(1.5)
            a_before, b_before = _score_requests(a.metrics_url), _score_requests(b.metrics_url)
            for client in (listed, balanced):
                for _ in range(40):
                    client.score("color", images=IMAGE, prompts=PROMPT)
            assert a.process.poll() is None  # still draining: it would have answered
            assert _score_requests(a.metrics_url) == a_before
            assert _score_requests(b.metrics_url) == b_before + 80


def test_wait_until_ready_waits_for_every_replica_of_a_target():
    slow = {"rewards": {"probe": {"kind": PROBE_KIND, "options": {"load_s": 4}}}}
    with (
        running_reward_server(COLOR) as ready,
        running_reward_server(slow, wait_for_health=False) as loading,
    ):
        both = f"ipv4:{ready.target},{loading.target}"
        with RewardClient(both) as client:
            with pytest.raises(TimeoutError) as info:
                client.wait_until_ready(timeout=0.5)
            assert f"(ipv4:{loading.target})=NOT_SERVING" in str(info.value)
            assert f"(ipv4:{ready.target})" not in str(info.value)
            client.wait_until_ready(timeout=60)
            assert _health(loading.target) == "SERVING"
        with RewardClient([ready.target, loading.target]) as client:
            client.wait_until_ready(timeout=60)  # already loaded: returns at once


def test_wait_until_ready_skips_addresses_that_refuse_connections():
    # "localhost" may resolve to ::1 as well, which a server bound to 127.0.0.1 refuses;
    # gRPC's round_robin never calls it, so readiness must not wait for it.
    with running_reward_server(COLOR) as server:
        port = server.target.rsplit(":", 1)[1]
        refused = f"127.0.0.1:{_free_port()}"
        with RewardClient(f"ipv4:{server.target},{refused}") as client:
            client.wait_until_ready(timeout=30)
            assert client.score("color", images=IMAGE, prompts=PROMPT)["score"].shape == (1,)
        with RewardClient(f"localhost:{port}") as client:
            client.wait_until_ready(timeout=30)
    with RewardClient(refused) as client, pytest.raises(TimeoutError, match="UNAVAILABLE"):
        client.wait_until_ready(timeout=0.5)  # but a target needs one replica that answers


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_wait_until_ready_over_tls_checks_each_address_against_the_target_name(tmp_path):
    # The probe of each resolved address must still verify the certificate for the name
    # in the target ("localhost"), not for the address it connects to (127.0.0.1, which
    # this certificate does not name).
    make_test_certs(tmp_path, server_san="DNS:localhost")
    config = {
        "server": {
            "tls": {"cert": str(tmp_path / "server.pem"), "key": str(tmp_path / "server.key")}
        },
        **COLOR,
    }
    ca = (tmp_path / "ca.pem").read_bytes()
    # wait_for_health=False: the helper's own probe would check the name 127.0.0.1.
    with running_reward_server(config, wait_for_health=False) as server:
        port = server.target.rsplit(":", 1)[1]
        with RewardClient(f"localhost:{port}", root_certificates=ca) as client:
            client.wait_until_ready(timeout=30)
            assert client.score("color", images=IMAGE, prompts=PROMPT)["score"].shape == (1,)


def test_published_service_config_matches_the_client_defaults():
    published = json.loads((PROTO_DIR / "service_config.json").read_text())
    assert service_config() == published
    assert published["loadBalancingConfig"] == [{"round_robin": {}}]
    assert published["healthCheckConfig"] == {"serviceName": ""}
    (method,) = published["methodConfig"]
    assert method["name"] == [
        {"service": pb.DESCRIPTOR.services_by_name["RewardService"].full_name}
    ]
    client = RewardClient("127.0.0.1:1")
    client.close()
    assert method["timeout"] == f"{client.timeout:g}s"
    policy, defaults = method["retryPolicy"], RetryPolicy()
    assert policy["maxAttempts"] == defaults.max_attempts
    assert policy["initialBackoff"] == f"{defaults.initial_backoff_s:g}s"
    assert policy["maxBackoff"] == f"{defaults.max_backoff_s:g}s"
    assert policy["backoffMultiplier"] == defaults.multiplier
    # DEADLINE_EXCEEDED is retried by the client only within its overall deadline; a
    # service-config timeout is the overall deadline, so gRPC can never retry it.
    assert {getattr(grpc.StatusCode, c) for c in policy["retryableStatusCodes"]} == (
        RETRYABLE_CODES - {grpc.StatusCode.DEADLINE_EXCEEDED}
    )
    # RewardClient's channels: load balancing and health checking, never gRPC retries.
    assert client_service_config() == {k: v for k, v in published.items() if k != "methodConfig"}


class _FailsFirstAttempt:
    """A Score handler that answers UNAVAILABLE to the first attempt of every request_id."""

    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        parsed = pb.ScoreRequest.FromString(request)
        with self._lock:
            self.attempts[parsed.request_id] += 1
            first = self.attempts[parsed.request_id] == 1
        if first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "first attempt fails")
        column = pb.OutputColumn(name="score", values=[0.5] * len(parsed.samples))
        return pb.ScoreResponse(outputs=[column]).SerializeToString()


def test_grpc_retries_stop_above_the_retry_buffer_so_the_client_keeps_its_own():
    handler = _FailsFirstAttempt()
    service = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(4),
        options=[("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                service, {"Score": grpc.unary_unary_rpc_method_handler(handler)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    target = f"127.0.0.1:{port}"
    small = np.zeros((1, 64, 64, 3), np.uint8)  # 12 KiB: fits gRPC's 256 KiB retry buffer
    large = np.zeros((1, 512, 512, 3), np.uint8)  # 768 KiB: does not
    try:
        # A plain gRPC channel with the published service config, as another language uses it.
        options = [
            ("grpc.service_config", json.dumps(service_config())),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ]
        with grpc.insecure_channel(target, options=options) as channel:
            call = channel.unary_unary(f"/{service}/Score")
            request = pb.ScoreRequest(reward="r", request_id="small")
            request.samples.add().media.raw.data = small.tobytes()
            call(request.SerializeToString(), timeout=30)
            assert handler.attempts["small"] == 2  # retried by gRPC
            request = pb.ScoreRequest(reward="r", request_id="large")
            request.samples.add().media.raw.data = large.tobytes()
            with pytest.raises(grpc.RpcError) as info:
                call(request.SerializeToString(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert handler.attempts["large"] == 1  # silently not retried
        with RewardClient(target, timeout=30) as client:
            out = client.score("r", images=large, request_id="client")
        assert handler.attempts["client"] == 2  # the client's own loop retried it
        np.testing.assert_array_equal(out["score"], [0.5])
    finally:
        server.stop(None)
