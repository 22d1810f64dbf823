"""Service config loading: defaults, env expansion, and errors that name the key or file."""

from __future__ import annotations

import pytest

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RewardSpec,
    load_config,
    path_options,
)


def test_minimal_config_gets_safe_defaults():
    config = load_config({"rewards": {"c": {"kind": "color_match"}}})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 50051 and config.server.metrics_port == 9464
    assert config.server.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    # proportionate: 32 images of 1024x1024x3 uint8 fit, 8 videos of 53x480x480x3 need more
    assert 32 * 1024 * 1024 * 3 < config.server.max_message_bytes < 8 * 53 * 480 * 480 * 3
    assert (config.server.max_connection_age_s, config.server.max_connection_age_grace_s) == (
        300,
        120,
    )
    assert config.server.drain_s == 0  # no drain by default (local use)
    assert (
        load_config({"server": {"drain_s": 2.5}, "rewards": {"c": {"kind": "x"}}}).server.drain_s
        == 2.5
    )
    spec = config.rewards["c"]
    assert (spec.max_batch_size, spec.max_queue_size, spec.max_queue_delay_ms) == (32, 256, 5.0)


def test_yaml_file_and_env_expansion(tmp_path):
    ckpt = tmp_path / "w" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {port: 0, metrics_port: null, log_format: json}\n"
        "rewards:\n"
        "  m:\n"
        "    kind: brightness\n"
        "    options: {checkpoint: '${W}/model.pt', note: '${UNSET_X:-fallback}'}\n"
    )
    config = load_config(path, env={"W": str(tmp_path / "w")})
    assert config.server.metrics_port is None
    assert config.rewards["m"].options == {"checkpoint": str(ckpt), "note": "fallback"}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"rewards": {"c": {"kind": "color_match", "max_batch": 3}}}, "rewards.c.max_batch"),
        ({"rewards": {"c": {"kind": "color_match", "max_batch_size": "8"}}}, "max_batch_size"),
        ({"rewards": {"c": {"kind": "color_match", "max_batch_size": 0}}}, "max_batch_size"),
        ({"rewards": {"c": {"kind": "color_match", "max_queue_delay_ms": -1}}}, "delay_ms"),
        ({"rewards": {"c": {"max_batch_size": 2}}}, "rewards.c.kind"),
        ({"rewards": {"c": {"kind": "color_match", "options": [1]}}}, "rewards.c.options"),
        ({"rewards": {}}, "rewards"),
        ({"server": {"port": 70000}, "rewards": {"c": {"kind": "x"}}}, "server.port"),
        ({"server": {"prot": 1}, "rewards": {"c": {"kind": "x"}}}, "server.prot"),
        ({"server": {"log_format": "xml"}, "rewards": {"c": {"kind": "x"}}}, "server.log_format"),
        ({"server": {"tls": {"cert": "a"}}, "rewards": {"c": {"kind": "x"}}}, "server.tls.key"),
        ({"server": {"auth": {"token_env": "1x"}}, "rewards": {"c": {"kind": "x"}}}, "token_env"),
        (
            {"server": {"drain_s": -1}, "rewards": {"c": {"kind": "x"}}},
            "server.drain_s: must be >=",
        ),
        (
            {"server": {"drain_s": "5"}, "rewards": {"c": {"kind": "x"}}},
            "server.drain_s: must be a",
        ),
        (
            {"server": {"max_connection_age_s": 0}, "rewards": {"c": {"kind": "x"}}},
            "server.max_connection_age_s: must be >=",
        ),
        (
            {"server": {"max_connection_age_grace_s": -1}, "rewards": {"c": {"kind": "x"}}},
            "server.max_connection_age_grace_s: must be >=",
        ),
        ({"extra": 1, "rewards": {"c": {"kind": "x"}}}, "<config>.extra"),
    ],
)
def test_errors_name_the_key(raw, key):
    with pytest.raises(RewardConfigError, match=key.replace(".", r"\.")):
        load_config(raw)


def test_missing_env_var_and_missing_file_are_named(tmp_path):
    raw = {"rewards": {"h": {"kind": "hps", "options": {"checkpoint": "${NO_SUCH_VAR}/x.pt"}}}}
    with pytest.raises(RewardConfigError, match=r"rewards\.h\.options\.checkpoint.*NO_SUCH_VAR"):
        load_config(raw, env={})
    missing = str(tmp_path / "absent.pt")
    raw = {"rewards": {"h": {"kind": "hps", "options": {"open_clip_checkpoint": missing}}}}
    with pytest.raises(RewardConfigError, match="file not found: .*absent.pt"):
        load_config(raw)
    assert load_config(raw, require_files=False).rewards["h"].options["open_clip_checkpoint"]


def test_path_options_finds_nested_paths_and_json_archs():
    options = {
        "checkpoint": "a.pt",
        "arch": "cfg.json",
        "base": {"options": {"weights_path": "b.bin", "arch": "ViT-H-14"}},
        "threshold": 0.5,
    }
    assert sorted(k for k, _ in path_options(options, "o")) == [
        "o.arch",
        "o.base.options.weights_path",
        "o.checkpoint",
    ]


def test_invalid_yaml_and_missing_file_report_the_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [unclosed")
    with pytest.raises(RewardConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(RewardConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_request_limits_default_finite_and_a_request_must_fit_the_queue():
    config = load_config({"rewards": {"a": {"kind": "brightness"}, "b": {"kind": "brightness",
                          "max_queue_size": 64}}})  # fmt: skip
    assert config.server.max_decoded_bytes == 2 * 1024**3
    assert config.rewards["a"].max_samples_per_request == 256  # = max_queue_size
    assert config.rewards["b"].max_samples_per_request == 64
    bad = {"rewards": {"a": {"kind": "brightness", "max_samples_per_request": 300}}}
    with pytest.raises(RewardConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert message.startswith("rewards.a.max_samples_per_request: 300 exceeds")
    assert "rewards.a.max_queue_size=256" in message
    for key, value in (("max_samples_per_request", 0), ("max_queue_size", 0)):
        with pytest.raises(RewardConfigError, match=f"rewards.a.{key}: must be >= 1"):
            load_config({"rewards": {"a": {"kind": "brightness", key: value}}})
    with pytest.raises(RewardConfigError, match="server.max_decoded_bytes: must be >= 1"):
        load_config({"server": {"max_decoded_bytes": 0}, "rewards": {"a": {"kind": "brightness"}}})


def test_dispatch_when_idle_is_a_validated_per_reward_key() -> None:
    assert RewardSpec(name="r", kind="brightness").dispatch_when_idle is False
    assert RewardSpec(name="r", kind="brightness", dispatch_when_idle=True).dispatch_when_idle
    with pytest.raises(RewardConfigError, match=r"rewards\.r\.dispatch_when_idle"):
        RewardSpec(name="r", kind="brightness", dispatch_when_idle="yes")


def test_connection_age_becomes_grpc_server_options_and_null_disables_it():
    from dancegrpo_rewards.server import server_options

    raw = {"server": {"max_connection_age_s": 2.5}, "rewards": {"c": {"kind": "x"}}}
    options = dict(server_options(load_config(raw)))
    assert options["grpc.max_connection_age_ms"] == 2500
    assert options["grpc.max_connection_age_grace_ms"] == 120_000
    assert options["grpc.max_receive_message_length"] == DEFAULT_MAX_MESSAGE_BYTES
    raw["server"] = {"max_connection_age_s": None, "max_connection_age_grace_s": None}
    options = dict(server_options(load_config(raw)))
    assert "grpc.max_connection_age_ms" not in options
    assert "grpc.max_connection_age_grace_ms" not in options
