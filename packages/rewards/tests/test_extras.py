"""Per-kind dependency sets (DESIGN.md §5c): the core install carries no kind's heavy
dependencies, each extra provides what the registry expects of it, the server imports a
kind's dependencies only when a config names that kind, and a missing extra is named."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.config import load_config
from dancegrpo_rewards.registry import EXTRA_MODULES, KIND_EXTRAS, REWARD_KINDS
from dancegrpo_rewards.server import build_rewards

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "packages/rewards/pyproject.toml").read_text())["project"]
HEAVY = sorted({m for modules in EXTRA_MODULES.values() for m in modules})


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _self_extras(requirement: str) -> set[str]:
    match = re.fullmatch(r"dancegrpo-rewards\[([^\]]+)\]", requirement)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def _providers(module: str) -> set[str]:
    dists = importlib.metadata.packages_distributions().get(module, [])
    return {_name(d) for d in dists}


def test_the_core_install_carries_no_kinds_heavy_dependencies() -> None:
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    for module in HEAVY:
        assert not (_providers(module) & core), f"{module} is a core dependency"


@pytest.mark.parametrize("extra", sorted(EXTRA_MODULES))
def test_each_extra_installs_the_modules_the_registry_checks(extra: str) -> None:
    declared = {_name(r) for r in PYPROJECT["optional-dependencies"][extra]}
    for module in EXTRA_MODULES[extra]:
        providers = _providers(module)
        assert providers, f"{module} is not installed here: cannot check [{extra}]"
        assert providers & declared, f"[{extra}] lists none of {providers} (for {module})"


def test_every_kind_extra_exists_and_dev_installs_all_of_them() -> None:
    extras = PYPROJECT["optional-dependencies"]
    assert set(KIND_EXTRAS) <= set(REWARD_KINDS)
    assert set(KIND_EXTRAS.values()) == set(EXTRA_MODULES)
    assert set(EXTRA_MODULES) <= set(extras)
    (everything,) = [_self_extras(r) for r in extras["all"]]
    assert everything == set(EXTRA_MODULES)
    assert any(_self_extras(r) == {"all"} for r in extras["dev"])


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_a_server_of_weight_free_rewards_imports_no_heavy_module() -> None:
    code = f"""
import asyncio, json, sys
import numpy as np
from dancegrpo_proto import RewardClient
from dancegrpo_rewards.config import load_config
from dancegrpo_rewards.server import RewardServer

async def main():
    server = RewardServer(load_config("services/demo.yaml"))
    await server.start(port=0, metrics_port=None)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with RewardClient(server.address.target) as client:
        out = await asyncio.to_thread(
            client.score, "color_match", images=frames, prompts=["a red square"] * 2
        )
    await server.shutdown(grace_s=1, drain_s=0)
    return out["score"].tolist()

scores = asyncio.run(main())
print(json.dumps({{"scores": scores, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["scores"]) == 2  # it really served
    assert report["heavy"] == []


def test_kinds_without_an_extra_import_no_heavy_module() -> None:
    light = sorted(set(REWARD_KINDS) - set(KIND_EXTRAS))
    assert {"color_match", "brightness", "jpeg_compressibility", "threshold"} <= set(light)
    code = f"""
import json, sys
from dancegrpo_rewards.registry import reward_class
for kind in {light!r}:
    reward_class(kind)
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("kind", "blocked"), [("hps", "open_clip"), ("videoalign", "transformers")]
)
def test_a_missing_extra_fails_start_up_naming_it(monkeypatch, kind: str, blocked: str) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # as if the package were not installed
    config = load_config({"rewards": {"r": {"kind": kind}}}, require_files=False)
    with pytest.raises(RewardConfigError) as info:
        build_rewards(config)
    message = str(info.value)
    assert message.startswith(f"rewards.r.kind: reward kind {kind!r} needs {blocked}")
    assert f"pip install 'dancegrpo-rewards[{KIND_EXTRAS[kind]}]'" in message


def test_a_composite_names_the_extra_of_its_inner_reward(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    config = load_config(
        {
            "rewards": {
                "r": {"kind": "threshold", "options": {"threshold": 0.5, "reward": {"kind": "hps"}}}
            }
        },
        require_files=False,
    )
    with pytest.raises(RewardConfigError, match=r"dancegrpo-rewards\[hps\]"):
        build_rewards(config)


def test_serve_exits_with_the_extra_to_install(tmp_path: Path) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("rewards:\n  video:\n    kind: videoalign\n")
    code = f"""
import sys
sys.modules["transformers"] = None
from dancegrpo_rewards.cli import main
sys.exit(main(["serve", "--config", {str(config)!r}, "--port", "0", "--no-metrics"]))
"""
    result = _run(code)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install 'dancegrpo-rewards[videoalign]'" in result.stderr


def test_check_fails_when_a_composites_inner_kind_lacks_its_extra(tmp_path: Path) -> None:
    """What the image build runs (``dancegrpo-rewards check``): no import, no weights."""
    config = tmp_path / "service.yaml"
    config.write_text(
        "rewards:\n  binary:\n    kind: threshold\n"
        "    options: {threshold: 0.3, reward: {kind: hps, checkpoint: /nowhere.pt}}\n"
    )
    code = f"""
import sys
sys.modules["open_clip"] = None
from dancegrpo_rewards.cli import main
sys.exit(main(["check", "--config", {str(config)!r}, "--no-file-check"]))
"""
    result = _run(code)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rewards.binary: kind 'hps' needs open_clip" in result.stderr
    assert "pip install 'dancegrpo-rewards[hps]'" in result.stderr
