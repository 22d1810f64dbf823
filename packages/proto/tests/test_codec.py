"""The numpy <-> protobuf codec shared by client and server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dancegrpo_proto import codec
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_testing.images import black_png, record_decoded_sizes


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


_SERIALIZE_CASES = {
    "images": dict(media=[_rng_frames(4, 5, 3), _rng_frames(6, 3, 3)], prompts=["a", "ü"]),
    "no_prompts": dict(media=[_rng_frames(2, 2, 3)], prompts=None),
    "empty_prompt_and_id": dict(media=[_rng_frames(3, 3, 3)], prompts=[""], request_id=""),
    "stacked_video": dict(media=_rng_frames(2, 3, 4, 5, 3), prompts=["x", "y"]),
    # a big sample: data longer than 2**21 bytes needs a 4-byte varint length
    "large": dict(media=[_rng_frames(1, 800, 900, 3)], prompts=["p" * 200]),
    "non_contiguous": dict(media=[_rng_frames(8, 6, 3)[::2, ::-1]], prompts=["a"]),
    "condition_and_metadata": dict(
        media=[_rng_frames(2, 4, 4, 3), _rng_frames(2, 4, 4, 3)],
        prompts=["a", "b"],
        condition_images=[_rng_frames(4, 4, 3), None],
        metadata=[{"geneval": {"tag": "counting", "include": [{"class_name": "dog"}]}}, None],
    ),
}


@pytest.mark.parametrize("encoding", ["raw", "png"])
@pytest.mark.parametrize("case", sorted(_SERIALIZE_CASES))
def test_serialize_score_request_writes_the_bytes_protobuf_writes(case, encoding):
    kwargs = dict(_SERIALIZE_CASES[case])
    kwargs.setdefault("request_id", "req-7")
    media, prompts = kwargs.pop("media"), kwargs.pop("prompts")
    expected = codec.build_score_request("hps", media, prompts, encoding=encoding, **kwargs)
    wire = codec.serialize_score_request("hps", media, prompts, encoding=encoding, **kwargs)
    assert wire == expected.SerializeToString()
    assert pb.ScoreRequest.FromString(wire) == expected


def test_serialize_score_request_rejects_what_build_rejects():
    images = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)]
    with pytest.raises(codec.CodecError, match=r"samples\[1\]\.media"):
        codec.serialize_score_request("r", images, ["a", "b"])
    with pytest.raises(codec.CodecError, match=r"samples\[0\]\.prompt"):
        codec.serialize_score_request("r", images[:1], [3])
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        codec.serialize_score_request("r", images, ["a"])


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


@pytest.fixture
def decoded_sizes(monkeypatch):
    return record_decoded_sizes(monkeypatch)


def _limit(max_side):
    def check_shape(shape, field):
        if max(shape[-3:-1]) > max_side:
            raise codec.CodecError(field, f"{list(shape)} exceeds {max_side}")

    return check_shape


def test_every_frame_header_is_checked_before_any_frame_is_decoded(decoded_sizes):
    small, big = black_png(4, 4), black_png(3000, 3000)
    media = pb.Media(encoded_frames=pb.EncodedFrames(frames=[small, small, big]))
    with pytest.raises(codec.CodecError, match=r"frames\[2\]: frame size \[3000, 3000, 3\]"):
        codec.decode_media(media, check_shape=_limit(64))
    assert decoded_sizes == []  # nothing decoded, not even the valid frames 0 and 1
    # Same-size oversized frames: the shape check sees [T, H, W, 3] from headers alone.
    media = pb.Media(encoded_frames=pb.EncodedFrames(frames=[big, big]))
    with pytest.raises(codec.CodecError, match=r"encoded_frames\.frames: \[2, 3000, 3000, 3\]"):
        codec.decode_media(media, check_shape=_limit(64))
    assert decoded_sizes == []
    decoded = codec.decode_media(pb.Media(encoded_frames=pb.EncodedFrames(frames=[small] * 3)))
    assert decoded.shape == (3, 4, 4, 3) and set(decoded_sizes) == {(4, 4)}


def test_single_image_header_is_checked_before_decoding(decoded_sizes):
    media = pb.Media(encoded_image=black_png(3000, 20))
    with pytest.raises(codec.CodecError, match=r"^media\.encoded_image: \[3000, 20, 3\]"):
        codec.decode_media(media, check_shape=_limit(64))
    assert codec.media_shape(media) == (3000, 20, 3)
    assert decoded_sizes == []


def test_media_kind_must_match_the_expected_rank():
    frames = pb.Media(encoded_frames=pb.EncodedFrames(frames=[b"not even decodable"]))
    with pytest.raises(codec.CodecError, match=r"^media\.encoded_frames: takes an image"):
        codec.media_shape(frames, ndim=3)  # rejected before the bytes are looked at
    raw = codec.encode_media(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(codec.CodecError, match=r"^media\.raw\.shape: takes a \[H, W, 3\] image"):
        codec.decode_media(raw, ndim=3)
    assert codec.decode_media(raw, ndim=4).shape == (2, 4, 4, 3)
