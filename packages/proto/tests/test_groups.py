"""Group-wise requests on the wire: ``ScoreRequest.group_sizes``, its checks, the client's
chunking (never across a group boundary) and ``RewardInfo``'s scoring scope."""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import numpy as np
import pytest

from dancegrpo_proto import RewardClient, codec
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (3, 2 + i % 3, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_group_sizes_serialise_as_protobuf_writes_them(encoding: str) -> None:
    media, prompts = _frames(5), list("abcde")
    expected = codec.build_score_request(
        "pref", media, prompts, encoding=encoding, request_id="r", group_sizes=[2, 3]
    )
    wire = codec.serialize_score_request(
        "pref", media, prompts, encoding=encoding, request_id="r", group_sizes=[2, 3]
    )
    assert wire == expected.SerializeToString()
    assert list(pb.ScoreRequest.FromString(wire).group_sizes) == [2, 3]
    # Without group_sizes the field is absent (per-sample requests are unchanged).
    plain = codec.serialize_score_request("pref", media, prompts)
    assert list(pb.ScoreRequest.FromString(plain).group_sizes) == []


@pytest.mark.parametrize(
    ("sizes", "field"),
    [
        ([2, 2], "group_sizes"),
        ([5, 1], "group_sizes"),
        ([3, 0, 2], r"group_sizes\[1\]"),
        ([-1, 6], r"group_sizes\[0\]"),
        ([2.5, 2.5], r"group_sizes\[0\]"),
        ([True, 4], r"group_sizes\[0\]"),
    ],
)
def test_bad_group_sizes_are_rejected_naming_the_field(sizes: list, field: str) -> None:
    with pytest.raises(codec.CodecError, match=f"^{field}: "):
        codec.serialize_score_request("pref", _frames(5), list("abcde"), group_sizes=sizes)


def test_group_chunks_pack_whole_groups_and_never_cut_one() -> None:
    assert codec.group_chunks([3, 3, 3], 6) == [(0, 6, 0, 2), (6, 9, 2, 3)]
    assert codec.group_chunks([3, 3, 3], 7) == [(0, 6, 0, 2), (6, 9, 2, 3)]
    assert codec.group_chunks([3, 3, 3], None) == [(0, 9, 0, 3)]
    # A group larger than the chunk size is a chunk of its own, whole.
    assert codec.group_chunks([2, 10, 1], 4) == [(0, 2, 0, 1), (2, 12, 1, 2), (12, 13, 2, 3)]
    assert codec.group_chunks([1] * 5, 2) == [(0, 2, 0, 2), (2, 4, 2, 4), (4, 5, 4, 5)]


class _RecordingService(rewards_pb2_grpc.RewardServiceServicer):
    """Answers every request with ``score[i]`` = the request's sample count, and
    ``group[i]`` = the size of the group sample ``i`` was sent in; records the requests."""

    def __init__(self) -> None:
        self.requests: list[pb.ScoreRequest] = []
        self.lock = threading.Lock()

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        with self.lock:
            self.requests.append(request)
        n = len(request.samples)
        sizes = list(request.group_sizes) or [n]
        group = [float(s) for s in sizes for _ in range(s)]
        return pb.ScoreResponse(
            outputs=[
                pb.OutputColumn(name="score", values=[float(n)] * n),
                pb.OutputColumn(name="group", values=group),
            ]
        )


@pytest.fixture
def recording_server():
    service = _RecordingService()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    rewards_pb2_grpc.add_RewardServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", service
    server.stop(0)


def test_client_never_chunks_across_a_group_boundary(recording_server) -> None:
    target, service = recording_server
    sizes = [3, 3, 5, 1, 3]
    n = sum(sizes)
    with RewardClient(target, chunk_size=4) as client:
        out = client.score("pref", images=_frames(n), prompts=["p"] * n, group_sizes=sizes)
    sent = [tuple(r.group_sizes) for r in service.requests]
    # Chunks of at most 4 samples made of whole groups; the group of 5 goes alone.
    assert sorted(sent) == sorted([(3,), (3,), (5,), (1, 3)])
    assert all(sum(s) <= 4 or len(s) == 1 for s in sent)
    # Outputs come back in the caller's order: each sample's group size, as sent.
    assert out["group"].tolist() == [float(s) for s in sizes for _ in range(s)]
    assert sum(len(r.samples) for r in service.requests) == n


def test_client_rejects_group_sizes_that_do_not_cover_the_batch(recording_server) -> None:
    target, service = recording_server
    with RewardClient(target) as client, pytest.raises(ValueError, match="group_sizes"):
        client.score("pref", images=_frames(4), prompts=["p"] * 4, group_sizes=[2, 1])
    assert service.requests == []


def test_reward_info_defaults_to_unspecified_scope_for_old_servers() -> None:
    info = pb.RewardInfo(name="hps")
    assert info.scoring_scope == pb.SCORING_SCOPE_UNSPECIFIED
    assert pb.ScoringScope.Name(2) == "SCORING_SCOPE_GROUP"
