"""Error details readable without our Python code: the ``grpc-status-details-bin`` trailer
decoded with nothing but the protobuf wire format and the field numbers of googleapis'
google/rpc/status.proto and error_details.proto (what a client in any language does),
and a Node.js client (no npm packages: node:http2 and a hand-written wire reader)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc
from dancegrpo_testing.servers import running_reward_server

NODE_CLIENT = Path(__file__).parent / "interop" / "grpc_rich_errors_client.mjs"
CONFIG = {"rewards": {"color": {"kind": "color_match"}}}


@pytest.fixture(scope="module")
def target():
    with running_reward_server(CONFIG, metrics=False) as running:
        yield running.target


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _fields(data: bytes) -> dict[int, list]:
    """One message level of the protobuf wire format: field number -> values."""
    fields: dict[int, list] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _trailer_status(error: grpc.RpcError) -> dict:
    """google.rpc.Status{code=1, message=2, details=3: Any{type_url=1, value=2}}."""
    (raw,) = [v for k, v in error.trailing_metadata() if k == "grpc-status-details-bin"]
    status = _fields(raw)
    details = []
    for packed in status.get(3, []):
        any_ = _fields(packed)
        details.append((any_[1][0].decode(), _fields(any_.get(2, [b""])[0])))
    return {"code": status[1][0], "message": status[2][0].decode(), "details": details}


def test_field_violation_decodes_from_the_trailer_with_the_wire_format_alone(target):
    request = pb.ScoreRequest(
        reward="color",
        samples=[
            pb.Sample(
                prompt="red", media=pb.Media(raw=pb.RawFrames(data=b"\0" * 12, shape=[2, 2, 3]))
            ),
            pb.Sample(
                prompt="red", media=pb.Media(raw=pb.RawFrames(data=b"\0" * 12, shape=[4, 3]))
            ),
        ],
    )
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        rewards_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=10)
    status = _trailer_status(info.value)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert status["message"] == info.value.details()
    ((type_url, bad_request),) = status["details"]
    assert type_url == "type.googleapis.com/google.rpc.BadRequest"
    (violation,) = [_fields(v) for v in bad_request[1]]  # BadRequest.field_violations = 1
    assert violation[1][0].decode() == "samples[1].media.raw.shape"  # FieldViolation.field = 1
    assert violation[2][0].decode() == "must be [H, W, 3] or [T, H, W, 3], got [4, 3]"  # = 2


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js (node >= 18) is not installed")
def test_node_client_reads_codes_and_field_violations(target):
    result = subprocess.run(
        ["node", str(NODE_CLIENT), target], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"]["grpc_status"] == 0
    assert out["ok"]["outputs"][0]["name"] == "score"
    assert out["ok"]["outputs"][0]["values"][0] == pytest.approx(1 - 1 / 3**0.5)

    short = out["short"]
    assert short["grpc_status"] == 3 and short["status"]["code"] == 3
    assert short["status"]["message"] == short["grpc_message"]
    (detail,) = short["status"]["details"]
    assert detail["type_url"] == "type.googleapis.com/google.rpc.BadRequest"
    assert detail["field_violations"] == [
        {
            "field": "samples[0].media.raw.data",
            "description": "has 10 bytes but shape [2, 2, 3] needs 12 (uint8 RGB)",
        }
    ]

    unknown = out["unknown"]
    assert unknown["grpc_status"] == 5
    (detail,) = unknown["status"]["details"]
    assert detail["resource_type"] == "dancegrpo.rewards.v1.Reward"
    assert detail["resource_name"] == "nope"

    garbage = out["garbage"]
    assert garbage["grpc_status"] == 3  # not UNKNOWN
    (detail,) = garbage["status"]["details"]
    assert detail["field_violations"][0]["field"] == ""
    assert detail["field_violations"][0]["description"].startswith(
        "not a valid dancegrpo.rewards.v1.ScoreRequest (2 bytes)"
    )
