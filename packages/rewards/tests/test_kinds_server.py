"""Every image kind of issue #6 served by one real ``dancegrpo-rewards serve`` process."""

from __future__ import annotations

import numpy as np
import pytest

from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing.reward_checks import assert_serves_like_local, batch_of, served_reward

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
    with served_reward(config, startup_timeout_s=120) as client:  # lists KINDS' names/kinds
        for name, kind in KINDS.items():
            local = reward_class(kind)(name, options[name])
            batch = batch_of(list(videos if local.modality == "video" else images), PROMPTS)
            assert_serves_like_local(client, name, local, batch, atol=1e-4)
