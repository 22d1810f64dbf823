"""Real reward-server processes for tests, and test-only reward kinds.

``running_reward_server(config)`` starts ``dancegrpo-rewards serve`` as a subprocess on
ephemeral ports, waits until its health service reports ``SERVING`` and yields
``(target, metrics_url, process)``; on exit it sends SIGTERM and waits (then kills)::

    from dancegrpo_testing.servers import running_reward_server

    config = {"rewards": {"color": {"kind": "color_match"}}}
    with running_reward_server(config) as (target, metrics_url, process):
        client = RewardClient(target)

``ProbeReward`` is a reward kind for server tests, named in a config by import path
(``kind: dancegrpo_testing.servers:ProbeReward``) so nothing registers it globally.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError

SUPPORT_DIR = Path(__file__).resolve().parent.parent
PROBE_KIND = "dancegrpo_testing.servers:ProbeReward"


class RunningServer(NamedTuple):
    """What ``running_reward_server`` yields (unpacks as ``target, metrics_url, process``)."""

    target: str
    metrics_url: str | None
    process: subprocess.Popen[bytes]


class ServerStartError(RuntimeError):
    """The server process exited or did not become healthy in time (message has its log)."""


def _command() -> list[str]:
    script = Path(sys.executable).with_name("dancegrpo-rewards")
    if script.exists():
        return [str(script)]
    found = shutil.which("dancegrpo-rewards")
    return [found] if found else [sys.executable, "-m", "dancegrpo_rewards.cli"]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _healthy(target: str, credentials: grpc.ChannelCredentials | None, service: str) -> bool:
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def running_reward_server(
    config: Mapping[str, Any] | str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    startup_timeout_s: float = 60.0,
    shutdown_timeout_s: float = 20.0,
    credentials: grpc.ChannelCredentials | None = None,
    metrics: bool = True,
    port: int = 0,
    wait_for_health: bool = True,
    extra_args: tuple[str, ...] = (),
) -> Iterator[RunningServer]:
    """Runs ``dancegrpo-rewards serve`` on free loopback ports until the block exits.

    Args:
        config: a config mapping (written to a temporary YAML file) or a YAML path. The
            ports in it are overridden with free ones.
        env: extra environment variables for the server process.
        startup_timeout_s: how long to wait for health ``SERVING``.
        shutdown_timeout_s: how long to wait after SIGTERM before killing.
        credentials: channel credentials for the health probe when the server uses TLS.
        metrics: whether to start the metrics exporter (on a free port).
        port: the gRPC port (default 0: a free one).
        wait_for_health: ``False`` yields as soon as the ports are bound (rewards may still
            be loading), to observe start-up.
        extra_args: more ``serve`` arguments.

    Raises:
        ServerStartError: the process exited early or never became healthy; the message
            includes the tail of its log.
    """
    workdir = Path(tempfile.mkdtemp(prefix="dancegrpo-server-"))
    try:
        if isinstance(config, Mapping):
            config_path = workdir / "config.yaml"
            config_path.write_text(yaml.safe_dump(dict(config)))
        else:
            config_path = Path(config)
        port_file = workdir / "ports.json"
        log_path = workdir / "server.log"
        proc_env = dict(os.environ)
        proc_env.setdefault("HF_HUB_OFFLINE", "1")
        proc_env["PYTHONUNBUFFERED"] = "1"
        paths = [str(SUPPORT_DIR), *filter(None, proc_env.get("PYTHONPATH", "").split(os.pathsep))]
        proc_env["PYTHONPATH"] = os.pathsep.join(paths)
        proc_env.update(env or {})
        args = [
            *_command(),
            "serve",
            "--config",
            str(config_path),
            "--port",
            str(port),
            "--port-file",
            str(port_file),
            *(("--metrics-port", "0") if metrics else ("--no-metrics",)),
            *extra_args,
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, env=proc_env
            )
        try:
            target, metrics_url = _wait_until_healthy(
                process, port_file, log_path, credentials, startup_timeout_s, wait_for_health
            )
            yield RunningServer(target, metrics_url, process)
        finally:
            _stop(process, shutdown_timeout_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_until_healthy(
    process: subprocess.Popen[bytes],
    port_file: Path,
    log_path: Path,
    credentials: grpc.ChannelCredentials | None,
    timeout_s: float,
    wait_for_health: bool = True,
) -> tuple[str, str | None]:
    deadline = time.monotonic() + timeout_s
    target = metrics_url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"reward server exited with {process.returncode} during start-up:\n"
                f"{_tail(log_path)}"
            )
        if target is None and port_file.exists():
            ports = json.loads(port_file.read_text())
            target = f"127.0.0.1:{ports['port']}"
            if ports.get("metrics_port") is not None:
                metrics_url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
        if target is not None and (not wait_for_health or _healthy(target, credentials, "")):
            return target, metrics_url
        time.sleep(0.05)
    raise ServerStartError(f"reward server not healthy after {timeout_s} s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ProbeReward(Reward):
    """Test-only reward: ``score`` = mean pixel / 255, ``batch_size`` = samples in the pass.

    Options: ``sleep_s`` (seconds slept per ``score`` call, to fill queues; with
    ``sleep_prompt``, only by calls whose batch has that prompt, so warm-up stays quick), ``load_s``
    (seconds ``load`` takes, to observe health ``NOT_SERVING``), ``fail_prompt`` (``score``
    raises ``RuntimeError`` if any prompt in the batch equals it), ``modality``,
    ``attributes`` (the ``metadata.attributes`` keys it accepts). ``batch_size`` shows how the server merged requests; it is the only non-batch-invariant
    output and exists for tests.
    """

    kind = "probe"
    description = "test probe: mean pixel value and the merged batch size"

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        known = {"sleep_s", "sleep_prompt", "load_s", "fail_prompt", "modality", "attributes"}
        unknown = set(self.options) - known
        if unknown:
            raise RewardConfigError(f"rewards.{name}.options.{sorted(unknown)[0]}: unknown option")
        self.sleep_s = float(self.options.get("sleep_s", 0.0))
        self.sleep_prompt = self.options.get("sleep_prompt")
        self.load_s = float(self.options.get("load_s", 0.0))
        self.fail_prompt = self.options.get("fail_prompt")
        self.modality = self.options.get("modality", "image")
        self.attribute_keys = frozenset(self.options.get("attributes", ()))

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score", "batch_size")

    @property
    def version(self) -> str:
        return "probe-1"

    def load(self) -> None:
        time.sleep(self.load_s)

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        if self.sleep_s and (self.sleep_prompt is None or self.sleep_prompt in batch.prompts):
            time.sleep(self.sleep_s)
        if self.fail_prompt is not None and self.fail_prompt in batch.prompts:
            raise RuntimeError(f"probe failure on prompt {self.fail_prompt!r}")
        scores = [float(m.mean()) / 255.0 for m in batch.media]
        return {
            "score": np.asarray(scores, np.float32),
            "batch_size": np.full(len(batch), len(batch), np.float32),
        }
