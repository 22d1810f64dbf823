"""The rewards.v1 contract: names other teams rely on, proto3 conventions, and a lossless
wire round-trip of every message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor as pb_descriptor

from dancegrpo_proto import SERVICE_NAME
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc

PROTO_FILE = Path(__file__).resolve().parents[1] / "proto/dancegrpo/rewards/v1/rewards.proto"
FD = pb_descriptor.FieldDescriptor


def test_service_and_method_names_are_the_published_contract() -> None:
    service = pb.DESCRIPTOR.services_by_name["RewardService"]
    assert service.full_name == SERVICE_NAME == "dancegrpo.rewards.v1.RewardService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "Score": ("ScoreRequest", "ScoreResponse"),
        "ListRewards": ("ListRewardsRequest", "ListRewardsResponse"),
    }
    assert hasattr(rewards_pb2_grpc, "RewardServiceStub")
    assert hasattr(rewards_pb2_grpc, "add_RewardServiceServicer_to_server")
    assert pb.DESCRIPTOR.name == "dancegrpo/rewards/v1/rewards.proto"
    assert pb.DESCRIPTOR.package == "dancegrpo.rewards.v1"


def test_every_enum_starts_with_unspecified_zero() -> None:
    assert pb.DESCRIPTOR.enum_types_by_name
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.name}: value 0 is {zero}"


_DECLARATION = re.compile(
    r"^\s*(?:(?:repeated|optional)\s+)?(?:[\w.<>, ]+\s+)?\w+\s*=\s*\d+\s*(?:\[.*\])?;"
    r"|^\s*(message|enum|service|rpc|oneof)\s"
)


def undocumented_declarations(proto_text: str) -> list[str]:
    """Fields, enum values, messages, enums, oneofs and rpcs with no ``//`` line above."""
    lines = proto_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if _DECLARATION.match(line) and not lines[i - 1].strip().startswith("//"):
            missing.append(f"{i + 1}: {line.strip()}")
    return missing


def test_undocumented_declarations_finds_a_bare_field() -> None:
    text = "// doc\nmessage A {\n  // doc\n  string a = 1;\n  uint32 b = 2;\n}\n"
    assert undocumented_declarations(text) == ["5: uint32 b = 2;"]


def test_every_field_message_enum_value_and_rpc_has_a_comment() -> None:
    missing = undocumented_declarations(PROTO_FILE.read_text())
    assert not missing, "add a // comment above:\n" + "\n".join(missing)


def test_field_numbers_are_unique_per_message() -> None:
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        numbers = [f.number for f in message.fields]
        assert len(numbers) == len(set(numbers)), message.name


def _fill(message, depth: int = 0) -> None:
    """Sets every field of ``message`` to a non-default value (recursively)."""
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(message, name)["key"] = "value"
            continue
        is_repeated = field.is_repeated
        if field.type == FD.TYPE_MESSAGE:
            if field.containing_oneof is not None and field.containing_oneof.fields[0] != field:
                continue  # only one member of a oneof can be set; the first is filled
            target = getattr(message, name).add() if is_repeated else getattr(message, name)
            if depth < 4:
                _fill(target, depth + 1)
            else:
                target.SetInParent()
            continue
        if field.containing_oneof is not None and field.containing_oneof.fields[0] != field:
            continue
        value = {
            FD.TYPE_STRING: "text",
            FD.TYPE_BYTES: b"\x00\x01\xff",
            FD.TYPE_BOOL: True,
            FD.TYPE_FLOAT: 0.25,
            FD.TYPE_DOUBLE: 0.25,
            FD.TYPE_ENUM: 1,
        }.get(field.type, 7)
        if is_repeated:
            getattr(message, name).extend([value, value])
        else:
            setattr(message, name, value)


@pytest.mark.parametrize("name", sorted(pb.DESCRIPTOR.message_types_by_name))
def test_every_message_round_trips_losslessly(name: str) -> None:
    cls = getattr(pb, name)
    original = cls()
    _fill(original)
    parsed = cls.FromString(original.SerializeToString())
    assert parsed == original
    if original.DESCRIPTOR.fields:
        assert parsed.ListFields(), f"{name}: filler set no field"


def test_raw_frames_round_trip_numpy_video_bit_exact() -> None:
    video = np.random.default_rng(0).integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    request = pb.ScoreRequest(
        reward="videoalign",
        samples=[
            pb.Sample(
                prompt="a dancer",
                media=pb.Media(raw=pb.RawFrames(data=video.tobytes(), shape=list(video.shape))),
                condition_image=pb.Media(encoded_image=b"\x89PNG"),
                metadata=pb.SampleMetadata(
                    geneval=pb.GenEvalSpec(
                        tag="position",
                        include=[
                            pb.GenEvalObject(class_name="dog", count=1),
                            pb.GenEvalObject(
                                class_name="cat", position_relation="left of", position_reference=0
                            ),
                        ],
                    )
                ),
            )
        ],
    )
    sample = pb.ScoreRequest.FromString(request.SerializeToString()).samples[0]
    raw = sample.media.raw
    decoded = np.frombuffer(raw.data, np.uint8).reshape(tuple(raw.shape))
    np.testing.assert_array_equal(decoded, video)
    assert sample.media.WhichOneof("kind") == "raw"
    assert sample.condition_image.WhichOneof("kind") == "encoded_image"
    assert sample.metadata.geneval.include[1].position_relation == "left of"


def test_unset_optional_parts_are_distinguishable_from_empty() -> None:
    sample = pb.Sample(prompt="p", media=pb.Media(encoded_image=b"x"))
    parsed = pb.Sample.FromString(sample.SerializeToString())
    assert not parsed.HasField("condition_image")
    assert not parsed.HasField("metadata")
    assert parsed.media.WhichOneof("kind") == "encoded_image"
