"""A real server process: concurrent correctness, malformed and undecodable requests (codes,
messages and google.rpc details), health, reflection v1 and v1alpha, metrics and
ListRewards. One server is shared by the whole module."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from dancegrpo_proto import SERVICE_NAME, RewardClient, codec
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc
from dancegrpo_rewards.config import DEFAULT_MAX_MESSAGE_BYTES, load_config
from dancegrpo_rewards.registry import reward_class
from dancegrpo_rewards.server import RewardServer
from dancegrpo_testing.servers import PROBE_KIND, running_reward_server

CONFIG = {
    "server": {"grace_period_s": 5, "max_decoded_bytes": 8 * 1024 * 1024},
    "rewards": {
        "color": {"kind": "color_match", "max_batch_size": 16, "max_queue_delay_ms": 2},
        "bright": {"kind": "brightness", "max_batch_size": 16, "max_queue_delay_ms": 2},
        "jpeg": {"kind": "jpeg_compressibility", "max_batch_size": 8},
        "video": {"kind": "brightness", "max_frames": 4, "options": {"modality": "video"}},
        "small": {
            "kind": "brightness",
            "max_height": 64,
            "max_width": 48,
            "min_size": 2,
            "max_samples_per_request": 4,
        },
        "probe": {"kind": PROBE_KIND, "options": {"fail_prompt": "boom"}},
        "pref": {  # group-wise: groups of 2..4 samples
            "kind": "pairwise_preference",
            "max_batch_size": 4,
            "options": {"judge": {"type": "score", "reward": {"kind": "brightness"}}},
        },
    },
}


@pytest.fixture(scope="module")
def server():
    with running_reward_server(CONFIG) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield rewards_pb2_grpc.RewardServiceStub(channel)


def _u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _raw(data, shape):
    return pb.Media(raw=pb.RawFrames(data=data, shape=shape))


def _request(reward, *samples):
    return pb.ScoreRequest(reward=reward, samples=list(samples))


def _image_sample(prompt="a red square", shape=(8, 8, 3), **kwargs):
    array = np.zeros(shape, np.uint8)
    return pb.Sample(prompt=prompt, media=_raw(array.tobytes(), list(shape)), **kwargs)


def _grouped(reward, n, group_sizes):
    return pb.ScoreRequest(reward=reward, samples=[_image_sample()] * n, group_sizes=group_sizes)


GOOD = _request("color", _image_sample())

MALFORMED = [
    ("byte length", _request("color", pb.Sample(prompt="red", media=_raw(b"\0" * 10, [2, 2, 3]))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.raw\.data: has 10 bytes"),
    ("4 channels", _request("color", _image_sample(shape=(4, 4, 4))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.raw\.shape"),
    ("zero size", _request("color", pb.Sample(prompt="red", media=_raw(b"", [0, 4, 3]))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.raw\.shape: every dimension must be positive"),
    ("2-d shape", _request("color", pb.Sample(prompt="red", media=_raw(b"\0" * 12, [4, 3]))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.raw\.shape"),
    ("video to image reward", _request("color", _image_sample(shape=(2, 4, 4, 3))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.raw\.shape: .*takes a \[H, W, 3\] image"),
    ("too tall", _request("small", _image_sample(shape=(65, 8, 3))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.raw\.shape: height 65 exceeds max_height=64"),
    ("too wide", _request("small", _image_sample(shape=(8, 49, 3))),
     "INVALID_ARGUMENT", r"width 49 exceeds max_width=48"),
    ("too small", _request("small", _image_sample(shape=(1, 8, 3))),
     "INVALID_ARGUMENT", r"below min_size=2"),
    ("too many samples", _request("small", *[_image_sample()] * 5),
     "INVALID_ARGUMENT", r"^samples: 5 samples exceed max_samples_per_request=4"),
    ("no samples", _request("color"), "INVALID_ARGUMENT", r"^samples: .*at least one"),
    ("undecodable png",
     _request("bright", pb.Sample(media=pb.Media(encoded_image=b"\x89PNG\r\n\x1a\nnot really"))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.encoded_image: not a decodable PNG or JPEG"),
    ("truncated jpeg",
     _request("bright", pb.Sample(media=pb.Media(encoded_image=_png(_u8(8, 8, 3), "JPEG")[:40]))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.encoded_image"),
    ("empty encoded", _request("bright", pb.Sample(media=pb.Media(encoded_image=b""))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.encoded_image: empty"),
    ("bmp", _request("bright", pb.Sample(media=pb.Media(encoded_image=_png(_u8(4, 4, 3), "BMP")))),
     "INVALID_ARGUMENT", r"must be PNG or JPEG, got BMP"),
    ("oversize png header",
     _request("small", pb.Sample(media=pb.Media(encoded_image=_png(_u8(100, 8, 3))))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.encoded_image: height 100 exceeds max_height=64"),
    ("decoded bytes over the server limit",  # 3 black 1024² PNGs: ~3 KB sent, 9.4 MB decoded
     _request("bright", *[pb.Sample(media=pb.Media(encoded_image=_png(np.zeros((1024, 1024, 3),
                                                                              np.uint8))))] * 3),
     "INVALID_ARGUMENT", r"^samples: the request decodes to 9437184 bytes.*"
                         r"max_decoded_bytes=8388608 \(server\.max_decoded_bytes\)"),
    ("missing media", _request("color", pb.Sample(prompt="red")),
     "INVALID_ARGUMENT", r"samples\[0\]\.media: required"),
    ("missing prompt", _request("color", _image_sample(prompt="")),
     "INVALID_ARGUMENT", r"samples\[0\]\.prompt: required"),
    ("prompt without colour", _request("color", _image_sample(prompt="a dog")),
     "INVALID_ARGUMENT", r"samples\[0\]\.prompt: names no known colour"),
    ("unknown attribute",
     _request("color", _image_sample(metadata=pb.SampleMetadata(attributes={"foo": "1"}))),
     "INVALID_ARGUMENT", r"samples\[0\]\.metadata\.attributes\.foo: unknown attribute"),
    ("unexpected geneval",
     _request("color", _image_sample(metadata=pb.SampleMetadata(geneval=pb.GenEvalSpec(tag="x")))),
     "INVALID_ARGUMENT", r"samples\[0\]\.metadata\.geneval"),
    ("image to video reward", _request("video", _image_sample()),
     "INVALID_ARGUMENT", r"takes a \[T, H, W, 3\] video"),
    ("too many frames", _request("video", _image_sample(shape=(5, 4, 4, 3))),
     "INVALID_ARGUMENT", r"5 frames exceed max_frames=4"),
    ("encoded frames to image reward",
     _request("bright", pb.Sample(media=pb.Media(encoded_frames=pb.EncodedFrames(frames=[b"x"])))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.encoded_frames: .*takes an image"),
    ("frame size mismatch",
     _request("video", pb.Sample(media=pb.Media(encoded_frames=pb.EncodedFrames(
         frames=[_png(_u8(4, 4, 3)), _png(_u8(5, 4, 3))])))),
     "INVALID_ARGUMENT", r"samples\[0\]\.media\.encoded_frames\.frames\[1\]: frame size"),
    ("bad third sample", _request("color", _image_sample(), _image_sample(), _image_sample("x")),
     "INVALID_ARGUMENT", r"^samples\[2\]\.prompt"),
    ("4-d condition image",
     _request("color", _image_sample(condition_image=_raw(b"\0" * 24, [2, 2, 2, 3]))),
     "INVALID_ARGUMENT", r"samples\[0\]\.condition_image\.raw\.shape"),
    ("unknown reward", _request("nope", _image_sample()), "NOT_FOUND", r"unknown reward 'nope'"),
    ("empty reward name", _request("", _image_sample()), "NOT_FOUND", r"unknown reward ''"),
    ("group-wise without group_sizes", _request("pref", _image_sample(), _image_sample()),
     "INVALID_ARGUMENT", r"^group_sizes: required by group-wise reward 'pref'"),
    ("group below min_group_size", _grouped("pref", 3, [2, 1]),
     "INVALID_ARGUMENT", r"^group_sizes\[1\]: a group of 1 is below the min_group_size 2"),
    ("group above max_batch_size", _grouped("pref", 5, [5]),
     "INVALID_ARGUMENT", r"^group_sizes\[0\]: a group of 5 exceeds max_batch_size=4"),
    ("group of 0", _grouped("pref", 2, [0, 2]),
     "INVALID_ARGUMENT", r"^group_sizes\[0\]: must be an integer >= 1, got 0"),
    ("group sizes off the sample count", _grouped("color", 3, [2, 2]),
     "INVALID_ARGUMENT", r"^group_sizes: sum to 4 but the request has 3 samples"),
    ("model raises", _request("probe", _image_sample(prompt="boom")),
     "INTERNAL", r"reward 'probe' failed: RuntimeError: probe failure"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "request_", "code", "pattern"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_request_gets_code_and_field_then_server_still_serves(
    stub, case, request_, code, pattern
):
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request_, timeout=10)
    assert info.value.code().name == code, info.value.details()
    assert re.search(pattern, info.value.details()), info.value.details()
    details = _details(info.value)
    if code == "INVALID_ARGUMENT":  # the field path and description, apart
        (violation,) = details[error_details_pb2.BadRequest].field_violations
        assert info.value.details() == f"{violation.field}: {violation.description}"
        assert violation.field == info.value.details().split(":")[0]
    elif code == "NOT_FOUND":
        resource = details[error_details_pb2.ResourceInfo]
        assert resource.resource_type == "dancegrpo.rewards.v1.Reward"
        assert resource.resource_name == request_.reward
    else:
        assert details == {}
    reply = stub.Score(GOOD, timeout=10)
    assert reply.outputs[0].values[0] == pytest.approx(1 - 1 / np.sqrt(3))


def _details(error: grpc.RpcError) -> dict[type, object]:
    """The google.rpc details of a failed call, by message class (grpcio-status)."""
    status = rpc_status.from_call(error)
    if status is None:
        return {}
    assert status.code == error.code().value[0] and status.message == error.details()
    found = {}
    for packed in status.details:
        for cls in (
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.ResourceInfo,
        ):
            if packed.Is(cls.DESCRIPTOR):
                found[cls] = cls()
                packed.Unpack(found[cls])
    assert len(found) == len(status.details)
    return found


VALID_BYTES = GOOD.SerializeToString()
UNDECODABLE = [  # bytes protobuf cannot parse as the method's request message
    ("truncated", VALID_BYTES[:-3]),
    ("bad wire type", b"\x0f\x01"),
    ("length past the end", b"\x0a\xff\xff\xff\x0f"),
    ("invalid utf-8 in a string", b"\x0a\x02\xff\xfe"),
    ("varint over 10 bytes", b"\x08" + b"\xff" * 10 + b"\x01"),
    ("unmatched group end", b"\x0c"),
]


def _raw_unary(channel, method):
    return channel.unary_unary(method)  # bytes in, bytes out: nothing parsed on the client


UNDECODABLE_CALLS = [
    (method, type_name, case, data)
    for method, type_name in [
        (f"/{SERVICE_NAME}/Score", "dancegrpo.rewards.v1.ScoreRequest"),
        (f"/{SERVICE_NAME}/ListRewards", "dancegrpo.rewards.v1.ListRewardsRequest"),
        ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
    ]
    for case, data in UNDECODABLE
    if not (case.startswith("invalid utf-8") and method.endswith("ListRewards"))  # no strings
]


@pytest.mark.parametrize(
    ("method", "type_name", "case", "data"),
    UNDECODABLE_CALLS,
    ids=[f"{c[0].rsplit('/', 1)[1]}-{c[2]}" for c in UNDECODABLE_CALLS],
)
def test_undecodable_request_gets_invalid_argument_not_unknown(
    server, stub, method, type_name, case, data
):
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        _raw_unary(channel, method)(data, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"not a valid {type_name} ({len(data)} bytes): ")
    (violation,) = _details(info.value)[error_details_pb2.BadRequest].field_violations
    assert violation.field == "" and violation.description == info.value.details()
    assert stub.Score(GOOD, timeout=10).outputs[0].values[0] == pytest.approx(1 - 1 / np.sqrt(3))


def test_undecodable_request_logs_one_line_without_traceback(caplog):
    """grpc used to log a full traceback per undecodable request (37 MB over 30k requests)."""
    config = load_config(
        {"server": {"port": 0, "metrics_port": None}, "rewards": {"b": {"kind": "brightness"}}}
    )

    async def call_with_garbage() -> grpc.StatusCode:
        server = RewardServer(config)
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address.target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(f"/{SERVICE_NAME}/Score")(b"\x0f\x01", timeout=10)
            return info.value.code()
        finally:
            await server.shutdown(grace_s=0)

    with caplog.at_level(logging.INFO):
        assert asyncio.run(call_with_garbage()) == grpc.StatusCode.INVALID_ARGUMENT
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    (record,) = problems
    assert record.getMessage() == "rpc failed" and record.exc_info is None
    assert record.fields["code"] == "INVALID_ARGUMENT" and record.fields["reward"] == "_unknown"
    assert record.fields["details"].startswith("not a valid dancegrpo.rewards.v1.ScoreRequest")


def test_undecodable_streamed_requests_get_invalid_argument(server):
    """Health.Watch (unary request, streamed replies) and reflection (streamed requests)."""
    with grpc.insecure_channel(server.target) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        with pytest.raises(grpc.RpcError) as info:
            list(watch(b"\x0f\x01", timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(reflect(iter([good, b"\x0f\x01"]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "grpc.reflection.v1alpha.ServerReflectionRequest" in info.value.details()


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (_request("x" * 100_000, _image_sample()), "NOT_FOUND", None),
        (_request("\u00e9" * 100_000, _image_sample()), "NOT_FOUND", None),
        (
            _request(
                "color", _image_sample(metadata=pb.SampleMetadata(attributes={"k" * 100_000: ""}))
            ),
            "INVALID_ARGUMENT",
            "samples[0].metadata.attributes.'" + "k" * 64 + "'... (100000 characters)",
        ),
    ],
    ids=["long reward name", "long non-ascii reward name", "long attribute key"],
)
def test_echoed_client_strings_are_cut(stub, request_, code, field):
    """Echoing 100 KB back overflowed gRPC's metadata limit (a retried RESOURCE_EXHAUSTED)."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request_, timeout=10)
    assert info.value.code().name == code
    details = info.value.details()
    assert len(details) < 400 and details.isascii(), details
    assert "(100000 characters)" in details
    if field is not None:
        (violation,) = _details(info.value)[error_details_pb2.BadRequest].field_violations
        assert violation.field == field


def test_sixteen_concurrent_clients_get_exactly_their_in_process_scores(server):
    colors = ["red", "green", "blue", "yellow", "white", "black", "pink", "purple"]
    local = {name: reward_class(kind)(name, {}) for name, kind in
             [("color", "color_match"), ("bright", "brightness")]}  # fmt: skip

    def worker(seed: int) -> int:
        rng = np.random.default_rng(seed)
        checked = 0
        with RewardClient(server.target, timeout=30) as client:
            for i in range(50):
                n = int(rng.integers(1, 7))
                images = [_u8(int(rng.integers(4, 24)), int(rng.integers(4, 24)), 3, seed=seed * 1000 + i * 10 + k)
                          for k in range(n)]  # fmt: skip
                prompts = [f"a {colors[int(rng.integers(len(colors)))]} thing" for _ in range(n)]
                name = "color" if i % 2 else "bright"
                out = client.score(name, images=images, prompts=prompts, request_id=f"{seed}-{i}")
                from dancegrpo_rewards.base import RewardBatch

                expected = local[name].score(RewardBatch(prompts, images, [None] * n, [None] * n))
                np.testing.assert_array_equal(out["score"], expected["score"])
                checked += n
        return checked

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        totals = list(pool.map(worker, range(16)))
    assert all(t >= 50 for t in totals)


def test_encoded_and_raw_media_score_identically(stub):
    image = _u8(12, 10, 3, seed=3)
    raw = stub.Score(_request("bright", pb.Sample(media=codec.encode_media(image))))
    png = stub.Score(_request("bright", pb.Sample(media=codec.encode_media(image, "png"))))
    assert raw.outputs[0].values == png.outputs[0].values


def test_list_rewards_reports_outputs_limits_and_versions(stub):
    reply = stub.ListRewards(pb.ListRewardsRequest(), timeout=10)
    infos = {info.name: info for info in reply.rewards}
    assert [i.name for i in reply.rewards] == sorted(CONFIG["rewards"])
    assert infos["color"].requires_prompt and list(infos["color"].output_names) == ["score"]
    assert infos["video"].modality == pb.MODALITY_VIDEO and infos["video"].limits.max_frames == 4
    assert infos["small"].limits.max_samples_per_request == 4
    assert infos["color"].limits.max_request_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert infos["color"].max_batch_size == 16
    assert infos["jpeg"].version.startswith("jpeg_compressibility-")
    assert reply.server_version


def test_health_reports_serving_overall_and_per_reward(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", SERVICE_NAME, *CONFIG["rewards"]]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_reward_service(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def _file_containing(reflect, symbol: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    (reply,) = reflect(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=5
    )
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    files = {}
    for data in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(data)
        files[proto.name] = proto
    return files


def test_reflection_v1_lists_and_describes_like_v1alpha(server):
    """grpcurl asks v1 first. v1 and v1alpha messages are wire-identical (grpc/grpc-proto:
    same messages and field numbers, only the package differs), so the v1alpha classes
    encode and decode the v1 method here."""
    with grpc.insecure_channel(server.target) as channel:
        reflect = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (reply,) = reflect(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in reply.list_services_response.service}
        assert names == {
            SERVICE_NAME,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        for name in names:  # grpcurl describe: every listed service resolves
            assert _file_containing(reflect, name)
        files = _file_containing(reflect, "dancegrpo.rewards.v1.ScoreRequest")
        assert "dancegrpo/rewards/v1/rewards.proto" in files
        v1 = _file_containing(reflect, "grpc.reflection.v1.ServerReflection")
        v1 = v1["grpc/reflection/v1/reflection.proto"]
        (method,) = v1.service[0].method
        assert v1.package == "grpc.reflection.v1"
        assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
        field_types = {f.type_name for m in v1.message_type for f in m.field if f.type_name}
        assert field_types and all(t.startswith(".grpc.reflection.v1.") for t in field_types)
        # the error details the server sends resolve too (grpcurl prints them)
        assert "google/rpc/error_details.proto" in _file_containing(
            reflect, "google.rpc.BadRequest"
        )


def _metric(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()


def test_metrics_exist_at_zero_from_start_with_process_gc_and_build_info():
    config = {"rewards": {"a": {"kind": "brightness"}, "b": {"kind": "color_match"}}}
    with running_reward_server(config) as running:
        text = _scrape(running)
    for reward in ("a", "b"):
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL"):
            line = f'dancegrpo_reward_requests_total{{code="{code}",method="Score",reward="{reward}"}} 0.0'
            assert line in text
        assert f'dancegrpo_reward_samples_total{{reward="{reward}"}} 0.0' in text
        assert f'dancegrpo_reward_batch_size_count{{reward="{reward}"}} 0.0' in text
        assert (
            f'dancegrpo_reward_request_latency_seconds_count{{method="Score",reward="{reward}"}} 0.0'
            in text
        )
        assert f'dancegrpo_reward_queue_depth{{reward="{reward}"}} 0.0' in text
        assert f'dancegrpo_reward_ready{{reward="{reward}"}} 1.0' in text
    assert (
        'dancegrpo_reward_errors_total{code="NOT_FOUND",method="Score",reward="_unknown"} 0.0'
        in text
    )
    assert "_created" not in text
    assert re.search(r"^process_resident_memory_bytes [0-9.e+]+$", text, re.M)
    assert re.search(r"^python_gc_collections_total\{generation=\"0\"\} ", text, re.M)
    assert re.search(
        r'^dancegrpo_reward_build_info\{grpc="[0-9.]+",protobuf="[0-9.]+",python="[0-9.]+",'
        r'version="[0-9.]+"\} 1\.0$',
        text,
        re.M,
    )  # fmt: skip


def test_metrics_counters_move(server, stub):
    scrape = lambda: _scrape(server)  # noqa: E731

    before = scrape()
    for _ in range(3):
        stub.Score(GOOD, timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Score(_request("nope", _image_sample()), timeout=10)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
        _raw_unary(channel, f"/{SERVICE_NAME}/Score")(b"\x0f\x01", timeout=10)
    bad = dict(method="Score", reward="_unknown", code="INVALID_ARGUMENT")  # undecodable
    # grpc.aio's abort() sends the status before the interceptor records the call, so the
    # client can see the error a moment before the counter moves: scrape until it has.
    expected = _metric(before, "dancegrpo_reward_errors_total", **bad) + 1
    stop = time.monotonic() + 10
    after = scrape()
    while _metric(after, "dancegrpo_reward_errors_total", **bad) < expected:
        assert time.monotonic() < stop, "the undecodable request was never counted"
        time.sleep(0.05)
        after = scrape()
    assert (
        _metric(after, "dancegrpo_reward_errors_total", **bad)
        == _metric(before, "dancegrpo_reward_errors_total", **bad) + 1
    )
    ok = dict(method="Score", reward="color", code="OK")
    assert (
        _metric(after, "dancegrpo_reward_requests_total", **ok)
        == _metric(before, "dancegrpo_reward_requests_total", **ok) + 3
    )
    nf = dict(reward="_unknown", code="NOT_FOUND")
    assert _metric(after, "dancegrpo_reward_errors_total", **nf) >= 1
    assert _metric(after, "dancegrpo_reward_batch_size_count", reward="color") >= 3
    assert _metric(after, "dancegrpo_reward_request_latency_seconds_count", reward="color") >= 3
    assert "dancegrpo_reward_queue_depth{" in after
    assert _metric(after, "dancegrpo_reward_ready", reward="jpeg") == 1.0
