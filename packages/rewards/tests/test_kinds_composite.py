"""``video_frames`` and ``threshold`` composed over a real (tiny) ``hps`` reward."""

from __future__ import annotations

import numpy as np
import pytest

from dancegrpo_rewards.base import SAMPLE_REQUIREMENTS, RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.composite import (
    ThresholdReward,
    VideoFramesReward,
    sample_frame_indices,
)
from dancegrpo_rewards.kinds.hps import HPSReward
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.reward_checks import assert_batch_invariant, batch_of
from dancegrpo_testing.servers import PROBE_KIND

PROMPTS = ["a red cube", "a dog", "a red cube", "the sea"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tiny_clip")
    config = clip_models.write_open_clip_config(directory / "tiny_vit.json")
    clip_models.write_open_clip_checkpoint(config, directory / "hps.pt")
    clip_models.write_open_clip_checkpoint(config, directory / "other.pt", seed=1)
    return directory


@pytest.fixture(scope="module")
def hps_spec(tiny_dir) -> dict:
    return {
        "kind": "hps",
        "checkpoint": str(tiny_dir / "hps.pt"),
        "arch": str(tiny_dir / "tiny_vit.json"),
    }


@pytest.fixture(scope="module")
def hps(hps_spec: dict) -> HPSReward:
    return HPSReward("hps", {k: v for k, v in hps_spec.items() if k != "kind"})


def videos(count: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 40, 56, 3), dtype=np.uint8) for _ in range(count)]


def test_registry_resolves_composites() -> None:
    assert reward_class("video_frames") is VideoFramesReward
    assert reward_class("threshold") is ThresholdReward


def test_frame_indices_are_evenly_spaced_and_include_the_ends() -> None:
    assert sample_frame_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert sample_frame_indices(3, 8).tolist() == [0, 1, 2]
    assert sample_frame_indices(1, 8).tolist() == [0]


def test_video_frames_averages_inner_scores_over_sampled_frames(
    hps_spec: dict, hps: HPSReward
) -> None:
    reward = VideoFramesReward(
        "video_hps", {"reward": hps_spec, "num_frames": 3, "frame_batch_size": 4}
    )
    assert (
        reward.modality == "video" and reward.output_names == ("score",) and reward.requires_prompt
    )
    clips = videos(4, frames=7)
    out = reward.score(batch_of(clips, PROMPTS))["score"]
    assert out.shape == (4,) and out.dtype == np.float32
    for i, clip in enumerate(clips):
        frames = [clip[t] for t in (0, 3, 6)]
        expected = hps.score(batch_of(frames, [PROMPTS[i]] * 3))["score"].mean()
        assert out[i] == pytest.approx(expected, abs=1e-5)


def test_video_frames_batch_of_8_equals_one_by_one(hps_spec: dict) -> None:
    reward = VideoFramesReward("video_hps", {"reward": hps_spec, "num_frames": 2})
    assert_batch_invariant(reward, batch_of(videos(8, frames=5, seed=1), PROMPTS * 2), atol=1e-5)


def test_threshold_binarises_inner_output_and_passes_raw_through(
    hps_spec: dict, hps: HPSReward
) -> None:
    images = clip_models.random_images(8, seed=21)
    raw = hps.score(batch_of(images, PROMPTS * 2))["score"]
    cut = float(np.median(raw))  # half above, half below
    reward = ThresholdReward("hps_binary", {"reward": hps_spec, "threshold": cut})
    assert reward.output_names == ("binary", "raw") and reward.modality == "image"
    out = reward.score(batch_of(images, PROMPTS * 2))
    np.testing.assert_allclose(out["raw"], raw, atol=1e-6)
    np.testing.assert_array_equal(out["binary"], (raw >= cut).astype(np.float32))
    assert 0 < out["binary"].sum() < 8 and out["binary"].dtype == np.float32


def test_threshold_over_video_frames_is_a_video_reward(hps_spec: dict) -> None:
    video_spec = {"kind": "video_frames", "reward": hps_spec, "num_frames": 2}
    reward = ThresholdReward(
        "video_binary", {"reward": video_spec, "threshold": -1.0, "output": "score"}
    )
    assert reward.modality == "video"
    out = reward.score(batch_of(videos(2, frames=3), PROMPTS[:2]))
    np.testing.assert_array_equal(out["binary"], [1.0, 1.0])  # cosines are >= -1


def test_wrappers_need_and_accept_what_their_inner_reward_does() -> None:
    """The server checks a sample's prompt, condition image and metadata against the
    wrapper, so a wrapper must take over every requirement of its inner reward, including
    the ``metadata.attributes`` keys it accepts."""
    inner = {"kind": PROBE_KIND, "attributes": ["style"]}
    frames = VideoFramesReward("frames", {"reward": inner, "num_frames": 2})
    binary = ThresholdReward("binary", {"reward": inner, "threshold": 0.5, "output": "score"})
    for wrapper in (frames, binary):
        assert wrapper.attribute_keys == frozenset({"style"})
        for name in SAMPLE_REQUIREMENTS:
            assert getattr(wrapper, name) == getattr(wrapper.inner, name), name


def test_composite_versions_follow_the_inner_reward(hps_spec: dict, tiny_dir) -> None:
    a = ThresholdReward("t", {"reward": hps_spec, "threshold": 0.28})
    b = ThresholdReward("t", {"reward": hps_spec, "threshold": 0.3})
    c = ThresholdReward(
        "t", {"reward": {**hps_spec, "checkpoint": str(tiny_dir / "other.pt")}, "threshold": 0.28}
    )
    assert len({a.version, b.version, c.version}) == 3 and a.version.startswith("threshold-")


def test_composite_option_errors(hps_spec: dict, tmp_path) -> None:
    with pytest.raises(RewardConfigError, match="'threshold'"):
        ThresholdReward("t", {"reward": hps_spec})
    with pytest.raises(RewardConfigError, match="'reward'"):
        VideoFramesReward("v", {"num_frames": 4})
    with pytest.raises(RewardConfigError, match="'reward.kind'.*unknown reward kind 'hpz'"):
        ThresholdReward("t", {"reward": {**hps_spec, "kind": "hpz"}, "threshold": 0.3})
    with pytest.raises(RewardConfigError, match="'output'.*'binary'"):
        ThresholdReward("t", {"reward": hps_spec, "threshold": 0.3, "output": "binary"})
    with pytest.raises(RewardConfigError, match="'num_frames'"):
        VideoFramesReward("v", {"reward": hps_spec, "num_frames": 0})
    video_spec = {"kind": "video_frames", "reward": hps_spec}
    with pytest.raises(RewardConfigError, match="needs an image reward"):
        VideoFramesReward("v", {"reward": video_spec})
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(CheckpointError, match="'v.reward'") as err:
        VideoFramesReward("v", {"reward": {**hps_spec, "checkpoint": str(missing)}})
    assert str(missing) in str(err.value)
