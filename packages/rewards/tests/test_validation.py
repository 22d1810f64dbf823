"""Request validation in-process: every header and the request's total decoded size are
checked before any pixel is decoded (decompression bombs never reach memory)."""

from __future__ import annotations

import pytest

from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_rewards.base import SampleError
from dancegrpo_rewards.config import load_config
from dancegrpo_rewards.server import build_rewards
from dancegrpo_rewards.validation import RequestError
from dancegrpo_testing.images import black_png, record_decoded_sizes


@pytest.fixture
def decoded_sizes(monkeypatch):
    return record_decoded_sizes(monkeypatch)


def _decoder(server=None, **reward):
    config = load_config(
        {"server": server or {}, "rewards": {"r": {"kind": "brightness", **reward}}}
    )
    return build_rewards(config)["r"].decoder


def test_an_oversized_later_video_frame_is_rejected_before_any_decoding(decoded_sizes):
    decoder = _decoder(max_height=64, max_width=64, options={"modality": "video"})
    frames = [black_png(8, 8), black_png(8, 8), black_png(3000, 3000)]
    request = pb.ScoreRequest(
        reward="r",
        samples=[pb.Sample(media=pb.Media(encoded_frames=pb.EncodedFrames(frames=frames)))],
    )
    with pytest.raises(SampleError, match=r"^samples\[0\]\.media\.encoded_frames\.frames\[2\]"):
        decoder.decode(request)
    assert decoded_sizes == []
    request.samples[0].media.encoded_frames.frames[:] = [black_png(3000, 3000)] * 2
    with pytest.raises(SampleError, match="height 3000 exceeds max_height=64"):
        decoder.decode(request)
    assert decoded_sizes == []


def test_total_decoded_bytes_are_bounded_before_decoding(decoded_sizes):
    decoder = _decoder({"max_decoded_bytes": 3 * 256 * 256 * 3})
    sample = pb.Sample(media=pb.Media(encoded_image=black_png(256, 256)))
    assert len(decoder.decode(pb.ScoreRequest(reward="r", samples=[sample] * 3))) == 3
    decoded_sizes.clear()
    with pytest.raises(RequestError) as info:
        decoder.decode(pb.ScoreRequest(reward="r", samples=[sample] * 4))
    message = str(info.value)
    assert message.startswith("samples: the request decodes to 786432 bytes")
    assert "max_decoded_bytes=589824 (server.max_decoded_bytes)" in message
    assert decoded_sizes == []  # rejected from the headers alone
    # raw media and condition images count too
    raw = pb.Media(raw=pb.RawFrames(data=bytes(256 * 256 * 3), shape=[256, 256, 3]))
    with pytest.raises(RequestError, match="max_decoded_bytes"):
        decoder.decode(pb.ScoreRequest(reward="r", samples=[pb.Sample(media=raw)] * 4))
    with pytest.raises(RequestError, match="max_decoded_bytes"):
        decoder.decode(
            pb.ScoreRequest(reward="r", samples=[pb.Sample(media=raw, condition_image=raw)] * 2)
        )


def test_default_decoded_byte_limit_is_finite():
    assert _decoder().max_decoded_bytes == 2 * 1024**3
