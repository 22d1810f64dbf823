"""Starts a reward service (``dancegrpo-rewards serve``) as a separate local process.

The trainer never imports the rewards package; it launches its command-line entry point
and then talks to it over gRPC like any other deployment. Used by the demo.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _command() -> list[str]:
    script = Path(sys.executable).with_name("dancegrpo-rewards")
    if script.exists():
        return [str(script)]
    found = shutil.which("dancegrpo-rewards")
    if found:
        return [found]
    raise FileNotFoundError(
        "dancegrpo-rewards is not installed in this environment: run `make install`"
    )


@contextlib.contextmanager
def reward_service(
    config: str | Path, *, startup_timeout_s: float = 120.0, shutdown_timeout_s: float = 20.0
) -> Iterator[str]:
    """Runs ``dancegrpo-rewards serve --config CONFIG --port 0 --metrics-port 0``; yields
    its target.

    The service binds a free loopback port (reported through ``--port-file``); the context
    waits until its health service says SERVING and sends SIGTERM on exit.

    Raises:
        RuntimeError: the process exited early or never became ready; includes its log tail.
    """
    from dancegrpo_proto import RewardClient

    workdir = Path(tempfile.mkdtemp(prefix="dancegrpo-demo-rewards-"))
    port_file, log_path = workdir / "ports.json", workdir / "server.log"
    cmd = _command() + [
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        # A free metrics port too: the config's fixed one (9464) would make a second demo,
        # or a test beside a running service, fail with "address already in use".
        "--metrics-port",
        "0",
        "--port-file",
        str(port_file),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not port_file.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"reward service {' '.join(cmd)} did not start "
                    f"(exit code {proc.poll()}):\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.1)
        target = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
        with RewardClient(target) as client:
            client.wait_until_ready(timeout=max(1.0, deadline - time.monotonic()))
        yield target
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=shutdown_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
