"""Every image kind of issue #6 served by one real ``dancegrpo-rewards serve`` process."""

from __future__ import annotations

import numpy as np
import pytest

from dancegrpo_proto.client import RewardClient
from dancegrpo_rewards.base import RewardBatch
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.servers import running_reward_server

PROMPTS = ["a red cube on a table", "a dog", "sunset over the sea"]


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    files = clip_models.write_tiny_clip_files(tmp_path_factory.mktemp("tiny_clip"))
    hps = {"kind": "hps", "checkpoint": str(files.hps_checkpoint), "arch": str(files.config)}
    return {
        "hps": {k: v for k, v in hps.items() if k != "kind"},
        "clip": {"checkpoint": str(files.bare_checkpoint), "arch": str(files.config)},
        "clip_hf": {"hf_path": str(files.hf_folder)},
        "aesthetic": {"mlp_checkpoint": str(files.aesthetic_mlp), "hf_path": str(files.hf_folder)},
        "video_hps": {"reward": hps, "num_frames": 2},
        "hps_binary": {"reward": hps, "threshold": 0.0},
    }


KINDS = {
    "hps": "hps",
    "clip": "clip",
    "clip_hf": "clip",
    "aesthetic": "aesthetic",
    "video_hps": "video_frames",
    "hps_binary": "threshold",
}


@pytest.mark.slow
def test_every_kind_scores_through_a_real_server(options: dict[str, dict]) -> None:
    config = {
        "server": {"host": "127.0.0.1"},
        "rewards": {name: {"kind": KINDS[name], "options": opts} for name, opts in options.items()},
    }
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    videos = rng.integers(0, 256, (3, 4, 40, 48, 3), dtype=np.uint8)
    server = running_reward_server(config, startup_timeout_s=120)
    with server as (target, _, _), RewardClient(target) as client:
        listed = {info.name: info for info in client.list_rewards()}
        assert set(listed) == set(KINDS)
        for name, kind in KINDS.items():
            local = reward_class(kind)(name, options[name])
            assert listed[name].kind == kind
            assert listed[name].version == local.version
            assert tuple(listed[name].output_names) == local.output_names
            media = videos if local.modality == "video" else images
            key = "videos" if local.modality == "video" else "images"
            remote = client.score(name, prompts=PROMPTS, **{key: media})
            expected = local.score(RewardBatch(PROMPTS, list(media), [None] * 3, [None] * 3))
            assert set(remote) == set(local.output_names)
            for out in local.output_names:
                np.testing.assert_allclose(
                    remote[out], expected[out], atol=1e-4, rtol=0, err_msg=f"{name}.{out}"
                )
