"""p1, p1b, p2, p1_cheap: the reward hub's serving overhead, as side-by-side throughput ratios.

One randomly initialised CLIP ViT-B/32 at 224 px (the ``clip`` kind; its forward dominates)
is scored three ways with batch 8:

- in process: ``CLIPScoreReward.score`` called directly;
- over gRPC: the real ``dancegrpo-rewards serve`` subprocess on loopback, ``RewardClient``;
- over HTTP + pickle: ``http_pickle_baseline.py`` under gunicorn (1 sync worker).

Server, baseline and this client share the machine's cores. The servers use torch's
default thread count (all cores); the in-process side is given the same count, and each
side runs while the others sit idle, so every side gets the same cores. Every side calls
the model from one dedicated worker thread, as the server's batcher does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from common import BENCH_DIR, REPO, interleaved, record, rotated

sys.path.insert(0, str(REPO / "tests" / "support"))

BATCH = 8
CLIENTS = 8
HTTP_CHUNK = 4  # Flow-GRPO-style clients post a batch in small chunks, one after another


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gunicorn_baseline(
    checkpoint: Path | None, reward: str = "clip", timeout_s: float = 120.0
) -> Iterator[str]:
    """Runs the HTTP + pickle baseline under gunicorn (1 sync worker); yields its URL."""
    import requests

    port = _free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    env = dict(os.environ, BASELINE_REWARD=reward, HF_HUB_OFFLINE="1")
    if checkpoint is not None:
        env["BASELINE_CHECKPOINT"] = str(checkpoint)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")])
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    args = [str(gunicorn), "-w", "1", "-k", "sync", "-t", "300", "-b", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*args, "http_pickle_baseline:create_app()"],
        cwd=BENCH_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"baseline server did not start:\n{log.read()[-3000:]!r}")
            try:
                requests.get(url, timeout=5)  # 405 once the app is loaded
                break
            except requests.RequestException:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run(repeats: int = 8) -> list[dict]:
    """Measures p1, p1b and p2; returns their result entries."""
    import requests
    import torch

    import clip_fixture
    from dancegrpo_proto import RewardClient
    from dancegrpo_rewards.base import RewardBatch
    from dancegrpo_rewards.kinds.clip_score import CLIPScoreReward
    from dancegrpo_testing.servers import running_reward_server
    from http_pickle_baseline import score_over_http

    checkpoint = clip_fixture.write_checkpoint(BENCH_DIR / ".cache")
    images, prompts = clip_fixture.batch(BATCH)
    threads = torch.get_num_threads()  # what the server process gets by default, too
    torch.set_num_threads(threads)
    reward = CLIPScoreReward("clip", clip_fixture.reward_options(checkpoint))
    reward.load()
    reward.warmup()
    inproc_batch = RewardBatch(prompts, list(images), [None] * BATCH, [None] * BATCH)
    # The server's batcher calls ``score`` on one dedicated worker thread; so does this side.
    # (Calling it from the main thread measured up to 4x slower on this shared, loaded
    # 2-core box: see RESULTS.md. The comparison is meant to isolate the serving path.)
    model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inproc")

    entries = []
    config = clip_fixture.server_config(checkpoint, max_batch_size=BATCH)
    with (
        running_reward_server(config, metrics=False, startup_timeout_s=180) as server,
        gunicorn_baseline(checkpoint) as url,
        RewardClient(server.target, timeout=300) as client,
        requests.Session() as session,
    ):
        expected = reward.score(inproc_batch)["score"]
        got = client.score("clip", images=images, prompts=prompts)["score"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        got_http = score_over_http(session, url, images, prompts, HTTP_CHUNK)
        assert got_http.shape == expected.shape  # values differ: JPEG of noise is lossy

        def grpc_side() -> None:
            client.score("clip", images=images, prompts=prompts)

        def inproc_side() -> None:
            model_thread.submit(reward.score, inproc_batch).result()

        def http_side() -> None:
            score_over_http(session, url, images, prompts, HTTP_CHUNK)

        t = interleaved(grpc_side, inproc_side, repeats=repeats)
        p1 = t.b_s / t.a_s  # throughput ratio = time ratio inverted
        entries.append(
            record(
                "p1_grpc_over_inproc",
                p1,
                ">= 0.95",
                p1 >= 0.95,
                {
                    "summary": f"CLIP ViT-B/32 224px, batch {BATCH}: gRPC {t.a_s * 1e3:.0f} ms "
                    f"vs in-process {t.b_s * 1e3:.0f} ms ({threads} torch threads each)",
                    "grpc_s": t.a_samples,
                    "inproc_s": t.b_samples,
                },
            )
        )

        t = interleaved(grpc_side, http_side, repeats=repeats)
        p1b = t.b_s / t.a_s
        entries.append(
            record(
                "p1b_over_http_pickle",
                p1b,
                ">= 2",
                p1b >= 2.0,
                {
                    "summary": f"same model, batch {BATCH}: gRPC raw {t.a_s * 1e3:.0f} ms vs "
                    f"Flask/gunicorn + pickled JPEG in chunks of {HTTP_CHUNK} "
                    f"{t.b_s * 1e3:.0f} ms",
                    "grpc_s": t.a_samples,
                    "http_pickle_s": t.b_samples,
                },
            )
        )

        clients = [RewardClient(server.target, timeout=300) for _ in range(CLIENTS)]
        pool = concurrent.futures.ThreadPoolExecutor(CLIENTS)
        try:
            barrier = threading.Barrier(CLIENTS)

            def one(i: int) -> None:
                barrier.wait()
                clients[i].score("clip", images=images[i : i + 1], prompts=prompts[i : i + 1])

            def concurrent_side() -> None:
                for f in [pool.submit(one, i) for i in range(CLIENTS)]:
                    f.result()

            t = interleaved(concurrent_side, grpc_side, repeats=repeats)
        finally:
            pool.shutdown()
            for c in clients:
                c.close()
        p2 = t.b_s / t.a_s
        entries.append(
            record(
                "p2_dynamic_batching",
                p2,
                ">= 0.9",
                p2 >= 0.9,
                {
                    "summary": f"{CLIENTS} concurrent clients x batch 1 {t.a_s * 1e3:.0f} ms vs "
                    f"1 client x batch {BATCH} {t.b_s * 1e3:.0f} ms (max_queue_delay_ms 5)",
                    "concurrent_s": t.a_samples,
                    "single_s": t.b_samples,
                },
            )
        )
    model_thread.shutdown()
    return entries


TRANSPORT_SIZE = 512  # the resolution SD-1.5 / Flow-GRPO's SD3.5 recipes generate at


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` photo-like ``uint8`` images: smooth colour fields plus mild noise (JPEG
    compresses them like real generations, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 8, 8, 3))
    up = coarse.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    noise = rng.normal(0, 4, up.shape)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


def run_transport(repeats: int = 8) -> list[dict]:
    """p1b's transport-dominated companion: the same two serving paths hosting a
    weight-free reward (``brightness``, ~1 ms of compute), 512 px images, batch 8.

    Not a substitute for p1b (whose goal is stated for a forward-dominated model): it shows
    what the serving path itself costs on each side once the model is out of the way.
    """
    import requests

    from dancegrpo_proto import RewardClient
    from dancegrpo_testing.servers import running_reward_server
    from http_pickle_baseline import score_over_http

    images = smooth_images(BATCH, TRANSPORT_SIZE)
    prompts = ["a photo"] * BATCH
    config = {
        "server": {"host": "127.0.0.1", "grace_period_s": 5},
        "rewards": {
            "brightness": {
                "kind": "brightness",
                "max_batch_size": BATCH,
                "max_queue_delay_ms": 5,
                "max_queue_size": 256,
            }
        },
    }
    with (
        running_reward_server(config, metrics=False, startup_timeout_s=180) as server,
        gunicorn_baseline(None, reward="brightness") as url,
        RewardClient(server.target, timeout=300) as client,
        requests.Session() as session,
    ):
        got = client.score("brightness", images=images, prompts=prompts)["score"]
        got_http = score_over_http(session, url, images, prompts, HTTP_CHUNK)
        np.testing.assert_allclose(got_http, got, atol=2e-2)  # JPEG is lossy, means agree

        def grpc_side() -> None:
            client.score("brightness", images=images, prompts=prompts)

        def http_side() -> None:
            score_over_http(session, url, images, prompts, HTTP_CHUNK)

        t = interleaved(grpc_side, http_side, repeats=repeats * 4)
    ratio = t.b_s / t.a_s
    return [
        record(
            "p1b_transport_over_http_pickle",
            ratio,
            ">= 2 (info)",
            ratio >= 2.0,
            {
                "summary": f"brightness (weight-free), {TRANSPORT_SIZE}px, batch {BATCH}: "
                f"gRPC raw {t.a_s * 1e3:.1f} ms vs Flask/gunicorn + pickled JPEG in chunks "
                f"of {HTTP_CHUNK} {t.b_s * 1e3:.1f} ms",
                "grpc_s": t.a_samples,
                "http_pickle_s": t.b_samples,
            },
        )
    ]


CHEAP_SIZE = 256


@contextlib.contextmanager
def floor_server() -> Iterator[str]:
    """Runs ``grpc_floor_server.py`` (receive the bytes, answer 2 bytes); yields its target."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "grpc_floor_server.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


PIPELINE_DEPTH = 4  # requests in flight in p1_cheap's pipelined companion
PIPELINE_BURST = 16  # requests per timed burst


def run_cheap(repeats: int = 8) -> list[dict]:
    """p1_cheap: p1's comparison (1 client, batch 8, one request at a time) with a cheap
    reward, where the fixed cost of a request is what shows.

    The reward is ``jpeg_compressibility`` (DDPO's compressibility, weight-free, a few ms
    per batch) on 8 photo-like 256 px images (1.5 MB raw per request). In process:
    ``score`` on one dedicated worker thread, as p1. Over gRPC: the real server and
    ``RewardClient``. Timed in the same rotation, as information: the transport floor, the
    same request bytes sent to ``grpc_floor_server.py`` (a grpc.aio server that answers
    without reading them), which bounds what any gRPC server could reach here.
    """
    import grpc

    from dancegrpo_proto import RewardClient, codec
    from dancegrpo_rewards.base import RewardBatch
    from dancegrpo_rewards.kinds.weight_free import JpegCompressibility
    from dancegrpo_testing.servers import running_reward_server
    from grpc_floor_server import METHOD

    images = smooth_images(BATCH, CHEAP_SIZE)
    prompts = ["a photo"] * BATCH
    reward = JpegCompressibility("jpeg", {})
    inproc_batch = RewardBatch(prompts, list(images), [None] * BATCH, [None] * BATCH)
    model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inproc")
    config = {
        "server": {"host": "127.0.0.1", "grace_period_s": 5},
        "rewards": {"jpeg": {"kind": "jpeg_compressibility", "max_batch_size": BATCH}},
    }
    with (
        running_reward_server(config, metrics=False, startup_timeout_s=180) as server,
        floor_server() as floor_target,
        RewardClient(server.target, timeout=300) as client,
        grpc.insecure_channel(
            floor_target, options=[("grpc.max_send_message_length", 1 << 30)]
        ) as floor_channel,
    ):
        expected = reward.score(inproc_batch)["score"]
        got = client.score("jpeg", images=images, prompts=prompts)["score"]
        np.testing.assert_array_equal(got, expected)
        send_to_floor = floor_channel.unary_unary(METHOD)

        def grpc_side() -> None:
            client.score("jpeg", images=images, prompts=prompts)

        def inproc_side() -> None:
            model_thread.submit(reward.score, inproc_batch).result()

        def floor_side() -> None:  # what RewardClient sends, to a server that does nothing
            send_to_floor(codec.serialize_score_request("jpeg", images, prompts), timeout=300)

        grpc_s, inproc_s, floor_s = rotated(grpc_side, inproc_side, floor_side, repeats=repeats * 8)
        # Companion: requests kept in flight (a trainer submits each rollout chunk as soon
        # as it is decoded; many ranks share a replica), so the transport of one request
        # overlaps the reward's compute of another. Both sides run the reward on ONE model
        # thread; seconds per request over a burst of PIPELINE_BURST requests.
        senders = concurrent.futures.ThreadPoolExecutor(PIPELINE_DEPTH)

        def grpc_burst() -> None:
            futures = [senders.submit(grpc_side) for _ in range(PIPELINE_BURST)]
            for future in futures:
                future.result()

        def inproc_burst() -> None:
            futures = [
                model_thread.submit(reward.score, inproc_batch) for _ in range(PIPELINE_BURST)
            ]
            for future in futures:
                future.result()

        burst = interleaved(grpc_burst, inproc_burst, repeats=repeats)
        senders.shutdown()
    model_thread.shutdown()
    grpc_med, inproc_med, floor_med = (statistics.median(x) for x in (grpc_s, inproc_s, floor_s))
    ratio = inproc_med / grpc_med
    best = inproc_med / (inproc_med + floor_med)
    burst_grpc, burst_inproc = burst.a_s / PIPELINE_BURST, burst.b_s / PIPELINE_BURST
    pipelined = burst_inproc / burst_grpc
    return [
        record(
            "p1_cheap_grpc_over_inproc",
            ratio,
            ">= 0.85",
            ratio >= 0.85,
            {
                "summary": f"jpeg_compressibility, {BATCH} x {CHEAP_SIZE}px photo-like, batch "
                f"{BATCH}: gRPC {grpc_med * 1e3:.2f} ms vs in-process {inproc_med * 1e3:.2f} "
                f"ms; bare gRPC round trip of the same bytes {floor_med * 1e3:.2f} ms "
                f"(best reachable here {best:.2f})",
                "grpc_s": grpc_s,
                "inproc_s": inproc_s,
                "floor_s": floor_s,
                "best_reachable": round(best, 4),
            },
        ),
        record(
            "p1_cheap_pipelined_grpc_over_inproc",
            pipelined,
            "information",
            True,
            {
                "summary": f"p1_cheap with {PIPELINE_DEPTH} requests in flight (bursts of "
                f"{PIPELINE_BURST}), one model thread on each side: gRPC "
                f"{burst_grpc * 1e3:.2f} ms vs in-process {burst_inproc * 1e3:.2f} ms per "
                "request",
                "grpc_s": burst.a_samples,
                "inproc_s": burst.b_samples,
            },
        ),
    ]


if __name__ == "__main__":
    run()
    run_transport()
    run_cheap()
