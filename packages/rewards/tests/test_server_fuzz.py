"""10,000 malformed requests against a real server: byte mutations of valid ScoreRequests
(most of which protobuf cannot parse) and well-formed messages with bad values, group
sizes included (a group-wise reward is hosted beside per-sample ones). None may get
UNKNOWN or INTERNAL, every one is counted in the metrics, and a well-behaved client
sharing the server gets its exact score throughout."""

from __future__ import annotations

import collections
import io
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from dancegrpo_proto import SERVICE_NAME
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc
from dancegrpo_testing.servers import running_reward_server

N_REQUESTS = 10_000
IN_FLIGHT = 32
QUEUE = {"max_queue_size": 4096, "max_samples_per_request": 64}
CONFIG = {
    "server": {"max_decoded_bytes": 4 * 1024 * 1024, "log_level": "ERROR"},
    "rewards": {
        "color": {"kind": "color_match", "max_height": 64, "max_width": 64, **QUEUE},
        "bright": {"kind": "brightness", "max_height": 64, "max_width": 64, **QUEUE},
        "jpeg": {"kind": "jpeg_compressibility", "max_height": 32, "max_width": 32, **QUEUE},
        "video": {
            "kind": "brightness",
            "max_frames": 4,
            "max_height": 32,
            "max_width": 32,
            "options": {"modality": "video"},
            **QUEUE,
        },
        # Group-wise: requires group_sizes, each group in [2, max_batch_size].
        "pref": {
            "kind": "pairwise_preference",
            "max_height": 64,
            "max_width": 64,
            "max_batch_size": 8,
            "options": {"judge": {"type": "score", "reward": {"kind": "brightness"}}},
            **QUEUE,
        },
    },
}
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _raw(array: np.ndarray) -> pb.Media:
    return pb.Media(raw=pb.RawFrames(data=array.tobytes(), shape=list(array.shape)))


def _seeds(rng: np.random.Generator) -> list[bytes]:
    """Valid requests of every shape the server accepts, serialized: mutation seeds."""
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    meta = pb.SampleMetadata(
        geneval=pb.GenEvalSpec(tag="counting", include=[pb.GenEvalObject(class_name="dog")]),
        attributes={"k": "v"},
    )
    requests = [
        pb.ScoreRequest(reward="color", samples=[pb.Sample(prompt="a red cat", media=_raw(image))]),
        pb.ScoreRequest(
            reward="bright",
            samples=[pb.Sample(media=pb.Media(encoded_image=_png(image)))] * 2,
            request_id="fuzz",
        ),
        pb.ScoreRequest(
            reward="jpeg", samples=[pb.Sample(media=pb.Media(encoded_image=_png(image, "JPEG")))]
        ),
        pb.ScoreRequest(reward="video", samples=[pb.Sample(media=_raw(frames))]),
        pb.ScoreRequest(
            reward="video",
            samples=[
                pb.Sample(
                    media=pb.Media(
                        encoded_frames=pb.EncodedFrames(frames=[_png(f) for f in frames])
                    )
                )
            ],
        ),
        pb.ScoreRequest(
            reward="color",
            samples=[
                pb.Sample(
                    prompt="blue", media=_raw(image), condition_image=_raw(image), metadata=meta
                )
            ],
        ),
        pb.ScoreRequest(
            reward="pref",
            samples=[pb.Sample(prompt="a cat", media=_raw(image))] * 5,
            group_sizes=[2, 3],
        ),
        pb.ScoreRequest(
            reward="color", samples=[pb.Sample(media=_raw(image))] * 3, group_sizes=[1, 2]
        ),
    ]
    return [r.SerializeToString() for r in requests]


def _mutate(data: bytes, rng: np.random.Generator, seeds: list[bytes]) -> bytes:
    """One to three random byte-level edits."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(7))
        pos = int(rng.integers(len(buf) + 1))
        if op == 0 and buf:  # flip bits
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << int(rng.integers(8))
        elif op == 1 and buf:  # random byte
            buf[min(pos, len(buf) - 1)] = int(rng.integers(256))
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif op == 3:  # delete a range
            del buf[pos : pos + int(rng.integers(1, 17))]
        elif op == 4:  # truncate
            del buf[pos:]
        elif op == 5:  # duplicate a chunk
            end = min(len(buf), pos + int(rng.integers(1, 33)))
            buf[end:end] = buf[pos:end]
        else:  # splice with another seed
            other = seeds[int(rng.integers(len(seeds)))]
            buf = buf[:pos] + other[int(rng.integers(len(other) + 1)) :]
    return bytes(buf)


def _text(rng: np.random.Generator) -> str:
    choice = int(rng.integers(7))
    if choice == 0:
        return ""
    if choice == 1:
        return "a red square"
    if choice == 2:
        return "x" * int(rng.integers(9_000, 12_000))  # around MAX_PROMPT_CHARS
    if choice == 3:
        return "".join(chr(int(c)) for c in rng.integers(1, 0xD7FF, 40))  # any BMP characters
    if choice == 4:
        return "\x00\n\t\r" * 5
    if choice == 5:
        return "green " * int(rng.integers(1, 50))
    return "\U0001f600" * int(rng.integers(1, 300))


_DIMS = [0, 1, 2, 3, 4, 5, 8, 31, 64, 65, 1024, 2**31 - 1, 2**32 - 1]


def _media(rng: np.random.Generator) -> pb.Media:
    kind = int(rng.integers(6))
    if kind == 0:  # raw with an arbitrary shape and an arbitrary byte count
        ndim = int(rng.integers(0, 6))
        shape = [_DIMS[int(rng.integers(len(_DIMS)))] for _ in range(ndim)]
        size = int(np.prod(shape, dtype=object)) if shape else 0
        if size > 100_000 or rng.random() < 0.5:
            size = int(rng.integers(0, 400))
        return pb.Media(raw=pb.RawFrames(data=bytes(size), shape=shape))
    if kind == 1:  # a consistent raw image or video of a random size
        shape = [int(rng.integers(1, 70)), int(rng.integers(1, 70)), 3]
        if rng.random() < 0.4:
            shape.insert(0, int(rng.integers(1, 7)))
        return pb.Media(raw=pb.RawFrames(data=bytes(int(np.prod(shape))), shape=shape))
    if kind == 2:  # random bytes as an encoded image
        return pb.Media(
            encoded_image=rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        )
    if kind == 3:  # a real PNG/JPEG of a random size, maybe truncated, maybe not RGB
        h, w = int(rng.integers(1, 80)), int(rng.integers(1, 80))
        mode = ["RGB", "L", "RGBA", "P", "1"][int(rng.integers(5))]
        image = Image.new(mode, (w, h))
        buffer = io.BytesIO()
        image.save(
            buffer, format="PNG" if mode in ("P", "1", "RGBA") or rng.random() < 0.5 else "JPEG"
        )
        data = buffer.getvalue()
        if rng.random() < 0.3:
            data = data[: int(rng.integers(len(data)))]
        return pb.Media(encoded_image=data)
    if kind == 4:  # encoded frames, some mismatched or empty
        frames = [
            _png(np.zeros((int(rng.integers(1, 40)), 8, 3), np.uint8))
            for _ in range(int(rng.integers(0, 6)))
        ]
        return pb.Media(encoded_frames=pb.EncodedFrames(frames=frames))
    return pb.Media()  # no representation set


_GROUP_SIZES = [0, 1, 2, 3, 5, 8, 9, 64, 2**31 - 1, 2**32 - 1]


def _group_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Group sizes for ``n`` samples: valid splits, splits that miss the count, sizes of 0,
    1 (below a pairwise reward's minimum), above max_batch_size, near the uint32 limit
    (their sum overflows 32 bits), or very many of them."""
    choice = int(rng.integers(5))
    if choice == 0 and n:  # a valid split of the samples
        cuts = sorted(rng.choice(np.arange(1, n), int(rng.integers(0, n)), replace=False))
        return [int(b - a) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    if choice == 1:  # one group of all of them
        return [n]
    if choice == 2:  # sums to 2**32 + n - 1 (n - 1 modulo 2**32)
        return [2**32 - 1, n]
    if choice == 3:
        return [1] * int(rng.integers(0, 20_000))
    return [_GROUP_SIZES[int(rng.integers(len(_GROUP_SIZES)))] for _ in range(rng.integers(1, 5))]


def _semantic(rng: np.random.Generator) -> bytes:
    """A well-formed ScoreRequest with random, mostly bad, values."""
    rewards = [
        *("color", "bright", "jpeg", "video", "pref", "pref"),
        *("", "nope", "x" * 20_000, "c\u00f6lor"),
    ]
    request = pb.ScoreRequest(reward=rewards[int(rng.integers(len(rewards)))])
    if rng.random() < 0.3:
        request.request_id = _text(rng)
    n = int(rng.integers(0, 6)) if rng.random() < 0.95 else int(rng.integers(60, 80))
    for _ in range(n):
        sample = request.samples.add(prompt=_text(rng))
        if rng.random() < 0.9:
            sample.media.CopyFrom(_media(rng))
        if rng.random() < 0.15:
            sample.condition_image.CopyFrom(_media(rng))
        if rng.random() < 0.15:
            sample.metadata.attributes[_text(rng)] = _text(rng)
        if rng.random() < 0.1:
            sample.metadata.geneval.tag = _text(rng)
            sample.metadata.geneval.include.add(
                class_name=_text(rng), count=int(rng.integers(2**32))
            )
    if request.reward == "pref" or rng.random() < 0.2:
        request.group_sizes.extend(_group_sizes(rng, n))
    return request.SerializeToString()


def _requests(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    seeds = _seeds(rng)
    out = []
    for i in range(N_REQUESTS):
        if i % 5 < 3:
            out.append(_mutate(seeds[int(rng.integers(len(seeds)))], rng, seeds))
        else:
            out.append(_semantic(rng))
    return out


GOOD = pb.ScoreRequest(
    reward="color",
    samples=[pb.Sample(prompt="a red square", media=_raw(np.zeros((8, 8, 3), np.uint8)))],
)
GOOD_SCORE = np.float32(1 - 1 / np.sqrt(3))


def _good_client(target: str, stop: threading.Event, results: list) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = rewards_pb2_grpc.RewardServiceStub(channel)
        while not stop.is_set():
            try:
                reply = stub.Score(GOOD, timeout=30)
                results.append(reply.outputs[0].values[0] == pytest.approx(GOOD_SCORE))
            except grpc.RpcError as exc:
                results.append(f"{exc.code().name}: {exc.details()}")
            time.sleep(0.01)


def _violation_field(error: grpc.RpcError) -> str:
    """The field of the error's ``google.rpc.BadRequest`` violation (``"?"``: none)."""
    status = rpc_status.from_call(error)
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            (violation,) = bad.field_violations
            assert error.details() == f"{violation.field}: {violation.description}"
            return violation.field
    return "?"


def _score_calls_counted(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    prefix = 'dancegrpo_reward_requests_total{code="'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and 'method="Score"' in line
    )


def test_ten_thousand_malformed_requests_get_no_unknown_or_internal_and_a_good_client_is_served():
    requests = _requests()
    codes: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    undecodable = 0
    group_fields: collections.Counter[str] = collections.Counter()  # BadRequest fields
    good: list = []
    stop = threading.Event()
    with running_reward_server(CONFIG) as (target, metrics_url, process):
        before = _score_calls_counted(metrics_url)
        watcher = threading.Thread(target=_good_client, args=(target, stop, good), daemon=True)
        watcher.start()
        start = time.monotonic()
        with grpc.insecure_channel(target) as channel:
            score = channel.unary_unary(f"/{SERVICE_NAME}/Score")  # raw bytes, unparsed
            for first in range(0, len(requests), IN_FLIGHT):
                calls = [score.future(r, timeout=60) for r in requests[first : first + IN_FLIGHT]]
                for call in calls:
                    try:
                        call.result()
                        code, details = "OK", ""
                    except grpc.RpcError as exc:
                        code, details = exc.code().name, exc.details() or ""
                        if details.startswith("group_sizes"):
                            group_fields[_violation_field(exc)] += 1
                    codes[code] += 1
                    examples.setdefault(code, details)
                    undecodable += details.startswith("not a valid dancegrpo.rewards.v1.")
        elapsed = time.monotonic() - start
        stop.set()
        watcher.join(timeout=60)
        assert process.poll() is None, "the server died"
        counted = _score_calls_counted(metrics_url) - before
    print(
        f"fuzz: {N_REQUESTS} requests in {elapsed:.1f} s, {dict(codes)}, {undecodable} undecodable"
    )
    assert set(codes) <= ALLOWED, {c: examples[c] for c in set(codes) - ALLOWED}
    assert codes["INVALID_ARGUMENT"] > N_REQUESTS // 2 and undecodable > N_REQUESTS // 10
    assert codes["OK"] > 0 and codes["NOT_FOUND"] > 0  # the mix reaches every path
    # Group-size errors name the field, in the message and in a google.rpc.BadRequest.
    assert group_fields["group_sizes"] > 0 and group_fields["group_sizes[0]"] > 0, group_fields
    assert all(re.fullmatch(r"group_sizes(\[\d+\])?", f) for f in group_fields), group_fields
    assert good and all(r is True for r in good), [r for r in good if r is not True][:5]
    assert counted == N_REQUESTS + len(good)  # undecodable calls are in the metrics too
