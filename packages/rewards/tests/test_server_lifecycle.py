"""Server lifecycle and protection: start-up health, queue limits, deadlines, SIGTERM (also
with a batch longer than the grace period), bearer-token auth (and the memory of refused
calls), connection age, TLS/mTLS and config errors at start-up. Each test runs its own
process."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc
from dancegrpo_testing.servers import PROBE_KIND, running_reward_server

REQUEST = pb.ScoreRequest(
    reward="probe",
    samples=[pb.Sample(media=pb.Media(raw=pb.RawFrames(data=b"\x33" * 12, shape=[2, 2, 3])))],
)


def _probe_config(**reward):
    options = reward.pop("options", {})
    return {
        "server": {"grace_period_s": 10},
        "rewards": {"probe": {"kind": PROBE_KIND, "options": options, **reward}},
    }


def _retry_after_s(error: grpc.RpcError) -> float:
    """The google.rpc.RetryInfo delay of a failed call."""
    (packed,) = rpc_status.from_call(error).details
    info = error_details_pb2.RetryInfo()
    assert packed.Unpack(info)
    return info.retry_delay.ToTimedelta().total_seconds()


def _health(channel, service=""):
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_health_is_not_serving_until_rewards_are_loaded():
    config = _probe_config(options={"load_s": 1.5})
    with (
        running_reward_server(config, wait_for_health=False) as (target, _, _),
        grpc.insecure_channel(target) as channel,
    ):
        grpc.channel_ready_future(channel).result(timeout=10)
        assert _health(channel) == "NOT_SERVING"
        assert _health(channel, "probe") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _retry_after_s(info.value) == 1.0
        deadline = time.monotonic() + 20
        while _health(channel) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _health(channel, "probe") == "SERVING"
        rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=5)


def test_full_queue_rejects_at_once_and_deadlines_drop_queued_work():
    config = _probe_config(
        max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0, options={"sleep_s": 0.6}
    )
    with running_reward_server(config) as (target, metrics_url, _):
        with grpc.insecure_channel(target) as channel:
            stub = rewards_pb2_grpc.RewardServiceStub(channel)
            running = stub.Score.future(REQUEST, timeout=10)
            time.sleep(0.2)
            queued = stub.Score.future(REQUEST, timeout=0.3)  # will expire while queued
            time.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(REQUEST, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in info.value.details()
            assert 0.01 <= _retry_after_s(info.value) <= 5.0  # about one batch
            assert time.monotonic() - start < 0.3  # rejected at once, not after the queue
            with pytest.raises(grpc.RpcError) as info:
                queued.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            running.result()
            stub.Score(REQUEST, timeout=10)
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        samples = [
            ln for ln in text.splitlines() if ln.startswith("dancegrpo_reward_samples_total{")
        ]
        assert samples and float(samples[0].rsplit(" ", 1)[1]) == 2.0  # the expired one never ran


def test_sigterm_finishes_in_flight_calls_and_exits_zero():
    config = _probe_config(max_batch_size=2, max_queue_delay_ms=0, options={"sleep_s": 0.3})
    with running_reward_server(config) as (target, _, process):
        with grpc.insecure_channel(target) as channel:
            stub = rewards_pb2_grpc.RewardServiceStub(channel)
            calls = [stub.Score.future(REQUEST, timeout=20) for _ in range(6)]
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            replies = [call.result() for call in calls]
        assert all(len(r.outputs[0].values) == 1 for r in replies)
        assert process.wait(timeout=20) == 0
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
            rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_exit_is_bounded_by_the_grace_period_when_a_batch_runs_longer():
    options = {"sleep_s": 60, "sleep_prompt": "slow"}
    config = _probe_config(max_batch_size=1, max_queue_delay_ms=0, options=options)
    config["server"]["grace_period_s"] = 1
    slow = pb.ScoreRequest(
        reward="probe", samples=[pb.Sample(prompt="slow", media=REQUEST.samples[0].media)]
    )
    with running_reward_server(config, shutdown_timeout_s=5) as (target, _, process):
        with grpc.insecure_channel(target) as channel:
            call = rewards_pb2_grpc.RewardServiceStub(channel).Score.future(slow, timeout=90)
            time.sleep(0.5)  # the 60 s batch is running
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            assert process.wait(timeout=30) == 0  # not after the batch (60 s)
            assert time.monotonic() - sent < 30
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=10)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_max_connection_age_makes_clients_reconnect_without_failing_calls():
    """GOAWAY after max_connection_age: a DNS client re-resolves and finds new replicas."""
    config = _probe_config()
    config["server"].update(max_connection_age_s=0.3, max_connection_age_grace_s=5)
    with running_reward_server(config) as (target, _, _), grpc.insecure_channel(target) as channel:
        states = []
        channel.subscribe(states.append, try_to_connect=False)
        stub = rewards_pb2_grpc.RewardServiceStub(channel)
        deadline = time.monotonic() + 30
        while states.count(grpc.ChannelConnectivity.READY) < 3 and time.monotonic() < deadline:
            stub.Score(REQUEST, timeout=5)  # never fails across the reconnects
            time.sleep(0.05)
        assert states.count(grpc.ChannelConnectivity.READY) >= 3, states


def test_sigterm_with_drain_keeps_serving_new_calls_while_not_serving():
    config = _probe_config()
    config["server"]["drain_s"] = 1.0
    with running_reward_server(config) as (target, _, process):
        with grpc.insecure_channel(target) as channel:
            assert _health(channel) == "SERVING"
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            while _health(channel) != "NOT_SERVING":
                assert time.monotonic() - sent < 0.5, "health never went NOT_SERVING"
                time.sleep(0.02)
        # A new connection inside the drain window (a balancer that has not noticed yet).
        with grpc.insecure_channel(target) as channel:
            reply = rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=2)
        assert time.monotonic() - sent < 1.0
        assert reply.outputs[0].values[0] == pytest.approx(0x33 / 255.0)
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - sent >= 1.0


def test_bearer_token_is_required_except_for_health():
    config = _probe_config()
    config["server"]["auth"] = {"token_env": "TEST_REWARD_TOKEN"}
    env = {"TEST_REWARD_TOKEN": "s3cret"}
    with (
        running_reward_server(config, env=env) as (target, _, _),
        grpc.insecure_channel(target) as channel,
    ):
        stub = rewards_pb2_grpc.RewardServiceStub(channel)
        for metadata in [(), (("authorization", "Bearer wrong"),)]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(REQUEST, timeout=5, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.Score(REQUEST, timeout=5, metadata=(("authorization", "Bearer s3cret"),))
        assert _health(channel) == "SERVING"


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
def test_unauthenticated_large_calls_are_refused_before_their_body_is_read():
    """Four unauthenticated 100 MB calls took the server from ~60 MB to ~1 GB when the token
    was checked after the message was read and parsed; refused unread, they cost ~nothing."""
    config = _probe_config()
    config["server"]["auth"] = {"token_env": "TEST_REWARD_TOKEN"}
    payload = pb.ScoreRequest(
        reward="probe",
        samples=[pb.Sample(media=pb.Media(raw=pb.RawFrames(data=bytes(100 << 20))))],
    ).SerializeToString()
    options = [("grpc.max_send_message_length", 256 << 20)]
    env = {"TEST_REWARD_TOKEN": "s3cret"}
    with (
        running_reward_server(config, env=env) as (target, metrics_url, process),
        grpc.insecure_channel(target, options=options) as channel,
    ):
        before = _peak_rss_bytes(process.pid)
        score_bytes = channel.unary_unary(f"/{pb.DESCRIPTOR.package}.RewardService/Score")
        calls = [score_bytes.future(payload, timeout=60) for _ in range(4)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        grown = _peak_rss_bytes(process.pid) - before
        assert grown < 100 << 20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
        stub = rewards_pb2_grpc.RewardServiceStub(channel)
        stub.Score(REQUEST, timeout=5, metadata=(("authorization", "Bearer s3cret"),))
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        refused = (
            'dancegrpo_reward_errors_total{code="UNAUTHENTICATED",method="Score",reward="_unknown"}'
        )
        assert f"{refused} 4.0" in text


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(directory: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=directory)  # fmt: skip
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:client")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_mutual_tls(tmp_path):
    _make_certs(tmp_path)
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    config = _probe_config()
    config["server"]["tls"] = {
        "cert": str(tmp_path / "server.pem"),
        "key": str(tmp_path / "server.key"),
        "client_ca": str(tmp_path / "ca.pem"),
    }
    with_client_cert = grpc.ssl_channel_credentials(
        read("ca.pem"), read("client.key"), read("client.pem")
    )
    with running_reward_server(config, credentials=with_client_cert) as (target, _, _):
        with grpc.secure_channel(target, with_client_cert) as channel:
            rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=5)
        no_client_cert = grpc.ssl_channel_credentials(read("ca.pem"))
        with grpc.secure_channel(target, no_client_cert) as channel, pytest.raises(grpc.RpcError):
            rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=5)
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
            rewards_pb2_grpc.RewardServiceStub(channel).Score(REQUEST, timeout=5)


def _cli(*args, config=None, tmp_path=None):
    argv = [sys.executable, "-m", "dancegrpo_rewards.cli", *args]
    if config is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += ["--config", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rewards": {"a": {"kind": "no_such_kind"}}}, "rewards.a.kind: unknown reward kind"),
        ({"rewards": {"a": {"kind": "jpeg_compressibility", "options": {"qualty": 9}}}},
         "rewards.a.options.qualty"),
        ({"rewards": {"a": {"kind": "brightness", "options": {"checkpoint": "/nope/x.pt"}}}},
         "rewards.a.options.checkpoint: file not found: /nope/x.pt"),
        ({"server": {"auth": {"token_env": "SURELY_UNSET_TOKEN"}},
          "rewards": {"a": {"kind": "brightness"}}}, "SURELY_UNSET_TOKEN"),
    ],
)  # fmt: skip
def test_bad_config_fails_at_start_up_naming_the_key(tmp_path, config, message):
    result = _cli("serve", "--port", "0", "--no-metrics", config=config, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_cli_check_and_list(tmp_path):
    result = _cli("check", config={"rewards": {"c": {"kind": "color_match"}}}, tmp_path=tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout
    with running_reward_server({"rewards": {"c": {"kind": "color_match"}}}) as (target, _, _):
        result = _cli("list", "--target", target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("c\tkind=color_match")
