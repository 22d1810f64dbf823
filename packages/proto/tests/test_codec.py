"""The numpy <-> protobuf codec shared by client and server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dancegrpo_proto import codec
from dancegrpo_proto.v1 import rewards_pb2 as pb


def _rng_frames(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(5, 7, 3), (2, 5, 7, 3)])
def test_raw_round_trip_is_exact_and_zero_copy(shape):
    frames = _rng_frames(*shape)
    media = codec.encode_media(frames)
    assert list(media.raw.shape) == list(shape)
    decoded = codec.decode_media(pb.Media.FromString(media.SerializeToString()))
    np.testing.assert_array_equal(decoded, frames)
    assert not decoded.flags.writeable  # a view of the message bytes


@pytest.mark.parametrize("shape", [(6, 9, 3), (3, 6, 9, 3)])
def test_png_round_trip_is_lossless(shape):
    frames = _rng_frames(*shape)
    media = codec.encode_media(frames, "png")
    np.testing.assert_array_equal(codec.decode_media(media), frames)


def test_jpeg_round_trip_is_close():
    frames = np.full((16, 16, 3), 120, np.uint8)
    decoded = codec.decode_media(codec.encode_media(frames, "jpeg"))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - 120).max() <= 2


def test_rgba_png_decodes_to_rgb():
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 3), (10, 20, 30, 40)).save(buffer, format="PNG")
    decoded = codec.decode_image_bytes(buffer.getvalue(), "media.encoded_image")
    assert decoded.shape == (3, 4, 3)
    assert decoded[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 4, 3), np.float32), "dtype must be uint8"),
        (np.zeros((4, 4, 4), np.uint8), r"shape must be \[H, W, 3\]"),
        (np.zeros((4, 4), np.uint8), r"shape must be"),
        (np.zeros((0, 4, 3), np.uint8), "positive"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_encode_rejects_bad_arrays(array, match):
    with pytest.raises(codec.CodecError, match=match):
        codec.encode_media(array)


def test_decode_raw_checks_byte_length_and_shape():
    raw = pb.RawFrames(data=b"\x00" * 10, shape=[2, 2, 3])
    with pytest.raises(codec.CodecError) as info:
        codec.decode_raw(raw, "media.raw")
    assert info.value.field == "media.raw.data"
    assert "needs 12" in str(info.value)
    with pytest.raises(codec.CodecError, match="media.raw.shape"):
        codec.decode_raw(pb.RawFrames(data=b"\x00" * 8, shape=[2, 1, 4]))


def test_decode_rejects_garbage_and_non_png_jpeg():
    with pytest.raises(codec.CodecError, match="not a decodable PNG or JPEG"):
        codec.decode_image_bytes(b"definitely not an image", "media.encoded_image")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="BMP")
    with pytest.raises(codec.CodecError, match="must be PNG or JPEG, got BMP"):
        codec.decode_image_bytes(buffer.getvalue(), "media.encoded_image")


def test_encoded_video_frames_must_share_a_size():
    a = codec.encode_media(np.zeros((4, 4, 3), np.uint8), "png").encoded_image
    b = codec.encode_media(np.zeros((5, 4, 3), np.uint8), "png").encoded_image
    media = pb.Media(encoded_frames=pb.EncodedFrames(frames=[a, b]))
    with pytest.raises(codec.CodecError, match=r"frames\[1\]"):
        codec.decode_media(media)


def test_build_score_request_and_metadata_round_trip():
    images = [np.zeros((4, 5, 3), np.uint8), np.ones((6, 3, 3), np.uint8)]
    spec = {"tag": "counting", "include": [{"class_name": "dog", "count": 2}], "exclude": []}
    request = codec.build_score_request(
        "hps",
        images,
        ["a", "b"],
        metadata=[{"geneval": spec, "attributes": {"k": "v"}}, None],
        request_id="r1",
    )
    request = pb.ScoreRequest.FromString(request.SerializeToString())
    assert request.reward == "hps" and request.request_id == "r1"
    assert [s.prompt for s in request.samples] == ["a", "b"]
    assert [list(s.media.raw.shape) for s in request.samples] == [[4, 5, 3], [6, 3, 3]]
    meta = codec.metadata_to_dict(request.samples[0].metadata)
    assert meta["attributes"] == {"k": "v"}
    assert meta["geneval"]["tag"] == "counting"
    assert meta["geneval"]["include"][0]["class_name"] == "dog"
    assert meta["geneval"]["include"][0]["count"] == 2
    assert not request.samples[1].HasField("metadata")


def test_build_score_request_names_the_bad_sample():
    images = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)]
    with pytest.raises(codec.CodecError, match=r"samples\[1\]\.media"):
        codec.build_score_request("r", images, ["a", "b"])
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        codec.build_score_request("r", images, ["a"])
    with pytest.raises(codec.CodecError, match=r"samples\[0\]\.metadata\.color"):
        codec.build_score_request("r", images[:1], ["a"], metadata=[{"color": "red"}])


def test_outputs_round_trip_through_response():
    outputs = {"score": np.array([0.5, -1.25], np.float32), "vq": np.array([1, 2], np.float32)}
    response = pb.ScoreResponse(outputs=codec.outputs_to_proto(outputs))
    decoded = codec.response_to_numpy(pb.ScoreResponse.FromString(response.SerializeToString()))
    assert list(decoded) == ["score", "vq"]
    for name in outputs:
        np.testing.assert_array_equal(decoded[name], outputs[name])
        assert decoded[name].dtype == np.float32
