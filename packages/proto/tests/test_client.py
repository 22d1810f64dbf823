"""RewardClient against real server processes: scoring paths, chunking, errors, retries,
round robin over replicas, readiness, and the no-torch import promise."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from dancegrpo_proto import RetryPolicy, RewardClient, RewardServiceError
from dancegrpo_rewards.base import RewardBatch
from dancegrpo_rewards.kinds.weight_free import Brightness, ColorMatch
from dancegrpo_testing.servers import PROBE_KIND, running_reward_server

CONFIG = {
    "rewards": {
        "color": {"kind": "color_match"},
        "video": {"kind": "brightness", "options": {"modality": "video"}},
        "probe": {"kind": PROBE_KIND, "max_batch_size": 64},
    }
}


@pytest.fixture(scope="module")
def server():
    with running_reward_server(CONFIG) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.target, timeout=30, chunk_size=16) as client:
        yield client


def _u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _local(reward, media, prompts):
    n = len(media)
    return reward.score(RewardBatch(prompts, list(media), [None] * n, [None] * n))["score"]


def test_score_stacked_images_matches_in_process(client):
    images = _u8(5, 9, 11, 3)
    prompts = ["red", "green", "blue", "a cyan sky", "white"]
    out = client.score("color", images=images, prompts=prompts)
    assert list(out) == ["score"] and out["score"].dtype == np.float32
    np.testing.assert_array_equal(out["score"], _local(ColorMatch("c", {}), images, prompts))


def test_list_of_differently_sized_images_and_png_encoding(client):
    images = [_u8(4 + i, 7 + 2 * i, 3, seed=i) for i in range(4)]
    prompts = ["red"] * 4
    raw = client.score("color", images=images, prompts=prompts)
    png = client.score("color", images=images, prompts=prompts, encoding="png")
    np.testing.assert_array_equal(raw["score"], png["score"])
    np.testing.assert_array_equal(raw["score"], _local(ColorMatch("c", {}), images, prompts))


def test_videos_and_score_async(client):
    videos = _u8(3, 2, 6, 6, 3)
    future = client.score_async("video", videos=videos)
    assert isinstance(future, concurrent.futures.Future)
    expected = _local(Brightness("b", {"modality": "video"}), videos, [""] * 3)
    np.testing.assert_allclose(future.result(timeout=30)["score"], expected, rtol=1e-6)


def test_big_batch_is_chunked_and_reassembled_in_order(client):
    images = np.stack([np.full((2, 2, 3), v, np.uint8) for v in range(70)])
    out = client.score("probe", images=images)
    np.testing.assert_allclose(out["score"], np.arange(70) / 255, rtol=1e-6)
    assert out["batch_size"].max() <= 64  # server batches; each request is <= 16 samples
    assert len(out["batch_size"]) == 70


def test_errors_carry_code_target_and_reward(client, server):
    with pytest.raises(RewardServiceError) as info:
        client.score("color", images=_u8(2, 4, 4, 3), prompts=["red", "a dog"])
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.target == server.target and error.reward == "color"
    assert "samples[1].prompt" in str(error)
    with pytest.raises(RewardServiceError) as info:
        client.score("missing", images=_u8(1, 4, 4, 3))
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_bad_inputs_fail_before_sending(client):
    with pytest.raises(ValueError, match="exactly one of images= or videos="):
        client.score("color", prompts=["red"])
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        client.score("color", images=_u8(2, 4, 4, 3), prompts=["red"])
    with pytest.raises(ValueError, match=r"samples\[17\]\.media: dtype must be uint8"):
        images = [np.zeros((4, 4, 3), np.uint8)] * 17 + [np.zeros((4, 4, 3), np.float32)]
        client.score("color", images=images, prompts=["red"] * 18)


def test_list_rewards_and_wait_until_ready(client):
    assert [r.name for r in client.list_rewards()] == ["color", "probe", "video"]
    client.wait_until_ready(timeout=5)
    client.wait_until_ready(timeout=5, reward="color")


def test_wait_until_ready_times_out_naming_the_target():
    port = _free_port()
    with RewardClient(f"127.0.0.1:{port}") as client, pytest.raises(TimeoutError, match=str(port)):
        client.wait_until_ready(timeout=0.5)


def test_backoff_is_capped_full_jitter_and_policy_is_validated():
    policy = RetryPolicy(max_attempts=4)
    rng = __import__("random").Random(0)
    assert all(0 <= policy.backoff(k, rng) <= min(5.0, 0.1 * 2**k) for k in range(10))
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retries_until_a_late_server_is_up():
    port = _free_port()
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.3)
    result: dict[str, object] = {}
    with RewardClient(f"127.0.0.1:{port}", retry=policy, timeout=60) as client:

        def call():
            try:
                result["out"] = client.score("color", images=_u8(1, 4, 4, 3), prompts=["red"])
            except Exception as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.5)  # the client is now retrying against a closed port
        assert thread.is_alive()
        with running_reward_server({"rewards": {"color": {"kind": "color_match"}}}, port=port):
            thread.join(timeout=60)
    assert "error" not in result, result.get("error")
    assert result["out"]["score"].shape == (1,)


def _score_requests(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dancegrpo_reward_requests_total{") and 'method="Score"' in line
    )


def test_round_robin_across_two_replicas():
    config = {"rewards": {"color": {"kind": "color_match"}}}
    with running_reward_server(config) as a, running_reward_server(config) as b:
        image, prompt = _u8(1, 4, 4, 3), ["red"]
        with RewardClient([a.target, b.target]) as client:
            # Both channels READY first: rotation prefers replicas known to be up, so a
            # channel still connecting would be skipped.
            client.wait_until_ready(timeout=60)
            for _ in range(10):
                client.score("color", images=image, prompts=prompt)
        assert (_score_requests(a.metrics_url), _score_requests(b.metrics_url)) == (5.0, 5.0)
        # grpc's own round_robin policy over a static address list (what dns:/// gives in k8s)
        ports = ",".join(t for t in (a.target, b.target))
        with RewardClient(f"ipv4:{ports}") as client:
            for _ in range(20):
                client.score("color", images=image, prompts=prompt)
        assert _score_requests(a.metrics_url) > 5 and _score_requests(b.metrics_url) > 5


def test_dns_target_resolves_and_scores(server):
    # The k8s form ("dns:///svc.ns.svc.cluster.local:50051"), through gRPC's DNS resolver
    # and round_robin; "localhost" resolves to the loopback address the server binds.
    port = server.target.rsplit(":", 1)[1]
    images, prompts = _u8(3, 6, 5, 3, seed=4), ["red", "green", "blue"]
    with RewardClient(f"dns:///localhost:{port}", timeout=30) as client:
        client.wait_until_ready(timeout=30)
        out = client.score("color", images=images, prompts=prompts)
    np.testing.assert_array_equal(out["score"], _local(ColorMatch("c", {}), images, prompts))


def test_importing_the_client_does_not_import_torch():
    code = (
        "import sys, dancegrpo_proto; dancegrpo_proto.RewardClient; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_column_lengths_are_checked_before_chunking():
    # 3 samples in chunks of 2: prompts[2:4] has 1 entry like media[2:3], so only the
    # whole-call check sees that there are 4 prompts for 3 images.
    with (
        RewardClient("127.0.0.1:1", chunk_size=2) as client,
        pytest.raises(ValueError, match="prompts has 4 entries but there are 3 samples"),
    ):
        client.score("r", images=np.zeros((3, 4, 4, 3), np.uint8), prompts=["a"] * 4)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, trailers):
        self._trailers = trailers

    def trailing_metadata(self):
        return self._trailers


def test_retry_delay_reads_the_servers_retry_info():
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    from dancegrpo_proto.client import retry_delay

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000)))
    status = status_pb2.Status(code=8, message="queue full", details=[detail])
    trailer = [("grpc-status-details-bin", status.SerializeToString())]
    assert retry_delay(_FakeRpcError(trailer)) == pytest.approx(0.25)
    assert retry_delay(_FakeRpcError([])) is None
    assert retry_delay(_FakeRpcError([("grpc-status-details-bin", b"\xff\x00")])) is None
    without = status_pb2.Status(code=8, message="no details").SerializeToString()
    assert retry_delay(_FakeRpcError([("grpc-status-details-bin", without)])) is None


def test_a_message_above_the_servers_limit_is_not_retried(monkeypatch):
    """gRPC answers RESOURCE_EXHAUSTED without RetryInfo for a message above the server's
    ``max_message_bytes``; resending the same bytes cannot succeed, so the client fails at
    once instead of retrying (a full queue, which carries RetryInfo, is retried)."""
    import dancegrpo_proto.client as client_module

    attempts: list[int] = []
    pick = client_module.RewardClient._pick  # called once per attempt

    def counting(self, *args, **kwargs):
        attempts.append(1)
        return pick(self, *args, **kwargs)

    monkeypatch.setattr(client_module.RewardClient, "_pick", counting)
    config = {
        "server": {"max_message_bytes": 64 * 1024},
        "rewards": {"color": CONFIG["rewards"]["color"]},
    }
    with (
        running_reward_server(config) as running,
        RewardClient(running.target, timeout=30) as client,
        pytest.raises(RewardServiceError) as err,
    ):
        client.score("color", images=_u8(2, 128, 128, 3), prompts=["red", "blue"])
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(attempts) == 1
