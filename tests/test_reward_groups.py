"""Reward groups (DESIGN.md §5c): two services with conflicting dependencies side by side,
one trainer recipe calling both. The recipe trains one real step against two real services
in packages/trainer/tests/test_trainer_recipes.py; here: its endpoints point at the
services that host their rewards in the shipped compose file and group configs."""

from __future__ import annotations

from pathlib import Path

import yaml

from dancegrpo_rewards.config import load_config as load_service_config
from dancegrpo_trainer.config import expand_env, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/hunyuan_video_two_groups.yaml"


def test_the_two_group_recipe_calls_each_group_where_compose_publishes_it(monkeypatch) -> None:
    monkeypatch.delenv("DANCEGRPO_REWARDS_IMAGE", raising=False)
    monkeypatch.delenv("DANCEGRPO_REWARDS_VIDEO", raising=False)
    compose = yaml.safe_load((ROOT / "services/compose.yaml").read_text())["services"]
    published = {}
    for group in ("image", "video"):
        (grpc,) = [p for p in compose[f"rewards-{group}"]["ports"] if p.endswith(":50051")]
        host, port, _ = grpc.split(":")
        published[f"localhost:{port}"] = group
    cfg = load_config(RECIPE)
    called = {}
    for ep in cfg.rewards.endpoints:
        group = published[expand_env(ep.target, "target")]
        called.setdefault(group, set()).add(ep.reward)
    assert called == {"video": {"videoalign"}, "image": {"video_hps"}}
    for group, rewards in called.items():
        config = load_service_config(
            ROOT / "services/groups" / group / "rewards.yaml",
            env={"DANCEGRPO_WEIGHTS": "/weights"},
            require_files=False,
        )
        assert rewards <= set(config.rewards)
