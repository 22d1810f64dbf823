"""The training config: recipes load and validate; overrides; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dancegrpo_trainer.config import ConfigError, expand_env, load_config

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
PAPER_RECIPES = {
    "sd15_hps.yaml",
    "flux_hps_clip.yaml",
    "flux_binary_hps.yaml",
    "flux_best_of_n.yaml",
    "demo.yaml",
}


def test_every_paper_recipe_is_shipped() -> None:
    assert {p.name for p in RECIPES} >= PAPER_RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.rewards.endpoints and all(ep.target and ep.reward for ep in cfg.rewards.endpoints)
    if cfg.model.kind != "tiny_flow":
        assert cfg.model.path.startswith("${DANCEGRPO_WEIGHTS}/")


@pytest.mark.parametrize(
    "path", [p for p in RECIPES if p.name.startswith("flux_")], ids=lambda p: p.name
)
def test_flux_recipes_never_train_the_last_step(path: Path) -> None:
    """DanceGRPO's FLUX train step trains the stored steps ``[:, :-1]``, Flow-GRPO's
    ``timestep_fraction`` 0.99 of 10 steps the first nine: no FLUX GRPO recipe trains the
    last denoising step (Kontext's one-step window in steps 1-3 never reaches it).
    DiffusionNFT trains noise levels of the forward process, not sampling steps: exempt."""
    cfg = load_config(path)
    if cfg.train.algorithm == "nft":
        return
    window = cfg.sampling.window
    stops_early = window.kind == "fast" and window.span and window.span[1] < cfg.sampling.num_steps
    assert cfg.train.skip_last_timestep or stops_early


def test_recipes_encode_the_paper_settings() -> None:
    multi = load_config(ROOT / "configs/flux_hps_clip.yaml")
    assert [ep.reward for ep in multi.rewards.endpoints] == ["hps", "clip"]
    binary = load_config(ROOT / "configs/flux_binary_hps.yaml")
    assert binary.rewards.endpoints[0].threshold is not None
    bon = load_config(ROOT / "configs/flux_best_of_n.yaml")
    assert bon.rewards.best_of_n.enabled and bon.sampling.group_size == 24


def test_dotted_overrides_reach_nested_sections_and_list_items() -> None:
    cfg = load_config(
        ROOT / "configs/demo_grpo.yaml",
        ["train.learning_rate=5e-3", "train.lora.rank=4", "rewards.endpoints.0.target=h:1"],
    )
    assert cfg.train.learning_rate == 5e-3
    assert cfg.train.lora.rank == 4
    assert cfg.rewards.endpoints[0].target == "h:1"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("sampling.eta=0", "sampling.eta"),
        ("sampling.group_size=1", "sampling.group_size"),
        ("train.timestep_fraction=1.5", "train.timestep_fraction"),
        ("train.learnig_rate=1", "train.learnig_rate"),
        ("train.micro_batch_size=two", "train.micro_batch_size"),
        ("model.kind=sdxl", "model.kind"),
        ("rewards.endpoints.0.weight=0", "rewards.endpoints[0].weight"),
        ("rewards.best_of_n.top_k=9", "rewards.best_of_n"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("train.skip_last_timestep=maybe", "train.skip_last_timestep"),
        ("sampling.num_steps=1 train.skip_last_timestep=true", "train.skip_last_timestep"),
    ],
)
def test_invalid_values_raise_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]")):
        load_config(ROOT / "configs/demo_grpo.yaml", override.split())


def test_model_path_is_required_for_real_models() -> None:
    with pytest.raises(ConfigError, match="model.path"):
        load_config(ROOT / "configs/demo_grpo.yaml", ["model.kind=flux"])


def test_env_references_expand_with_defaults_and_name_the_field(monkeypatch) -> None:
    monkeypatch.delenv("DANCEGRPO_TEST_UNSET", raising=False)
    assert expand_env("${DANCEGRPO_TEST_UNSET:-localhost:1}", "f") == "localhost:1"
    monkeypatch.setenv("DANCEGRPO_TEST_SET", "/w")
    assert expand_env("${DANCEGRPO_TEST_SET}/flux", "f") == "/w/flux"
    with pytest.raises(ConfigError, match="model.path: environment variable DANCEGRPO_TEST_UNSET"):
        expand_env("${DANCEGRPO_TEST_UNSET}/x", "model.path")


def test_reward_endpoint_auth_and_tls_settings_are_checked(monkeypatch, tmp_path) -> None:
    demo = ROOT / "configs/demo_grpo.yaml"
    monkeypatch.delenv("DANCEGRPO_TEST_TOKEN", raising=False)
    with pytest.raises(
        ConfigError,
        match=r"^rewards\.endpoints\[0\]\.token_env: environment variable "
        "DANCEGRPO_TEST_TOKEN",
    ):
        load_config(demo, ["rewards.endpoints.0.token_env=DANCEGRPO_TEST_TOKEN"])
    with pytest.raises(ConfigError, match=r"^rewards\.endpoints\[0\]\.token_env: must name"):
        load_config(demo, ["rewards.endpoints.0.token_env=not-a-name"])
    monkeypatch.setenv("DANCEGRPO_TEST_TOKEN", "s3cret")
    cfg = load_config(demo, ["rewards.endpoints.0.token_env=DANCEGRPO_TEST_TOKEN"])
    assert cfg.rewards.endpoints[0].token_env == "DANCEGRPO_TEST_TOKEN"
    missing = tmp_path / "nope.pem"
    for key in ("tls_ca", "tls_cert", "tls_key"):
        with pytest.raises(
            ConfigError, match=rf"^rewards\.endpoints\[0\]\.{key}: file not found: {missing}"
        ):
            load_config(demo, [f"rewards.endpoints.0.{key}={missing}"])
    pem = tmp_path / "x.pem"
    pem.write_text("pem")
    with pytest.raises(ConfigError, match=r"^rewards\.endpoints\[0\]\.tls_cert: .*go together"):
        load_config(demo, [f"rewards.endpoints.0.tls_cert={pem}"])
    cfg = load_config(demo, [f"rewards.endpoints.0.tls_{k}={pem}" for k in ("ca", "cert", "key")])
    assert cfg.rewards.endpoints[0].tls_key == str(pem)
