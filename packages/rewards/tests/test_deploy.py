"""Deployment files under services/: they parse, validate with the config loader, and the
Kubernetes/compose/Docker wiring points at the gRPC health service and the right ports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dancegrpo_rewards.config import load_config
from dancegrpo_rewards.registry import REWARD_KINDS

SERVICES = Path(__file__).resolve().parents[3] / "services"
WEIGHTS_ENV = {"DANCEGRPO_WEIGHTS": "/weights"}


def _k8s(name):
    return list(yaml.safe_load_all((SERVICES / "k8s" / name).read_text()))


def test_demo_config_validates_with_files_checked():
    config = load_config(SERVICES / "demo.yaml", env={})
    assert {s.kind for s in config.rewards.values()} == {
        "color_match",
        "brightness",
        "jpeg_compressibility",
    }
    assert config.server.host == "127.0.0.1"


def test_rewards_config_validates_and_names_real_kinds():
    config = load_config(SERVICES / "rewards.yaml", env=WEIGHTS_ENV, require_files=False)
    kinds = {s.kind for s in config.rewards.values()}
    assert kinds == {
        "hps",
        "clip",
        "aesthetic",
        "video_frames",
        "threshold",
        "videoalign",
        "geneval",
        "pickscore",
        "imagereward",
    }
    assert kinds <= set(REWARD_KINDS)
    assert config.rewards["hps"].options["checkpoint"] == "/weights/hps/HPS_v2.1_compressed.pt"
    assert config.rewards["hps_binary"].options["reward"]["kind"] == "hps"
    assert config.server.max_message_bytes >= 8 * 53 * 480 * 480 * 3


def test_rewards_config_requires_the_weights_without_the_flag():
    with pytest.raises(Exception, match="file not found: /weights/"):
        load_config(SERVICES / "rewards.yaml", env=WEIGHTS_ENV)


def test_configmap_holds_a_valid_config_binding_all_interfaces():
    (configmap,) = _k8s("configmap.yaml")
    raw = yaml.safe_load(configmap["data"]["rewards.yaml"])
    config = load_config(raw, env=WEIGHTS_ENV, require_files=False)
    assert config.server.host == "0.0.0.0" and config.server.port == 50051


def test_deployment_probes_use_grpc_health_on_the_grpc_port():
    (deployment,) = _k8s("deployment.yaml")
    (configmap,) = _k8s("configmap.yaml")
    port = yaml.safe_load(configmap["data"]["rewards.yaml"])["server"]["port"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    server = yaml.safe_load(configmap["data"]["rewards.yaml"])["server"]
    assert server["drain_s"] > 0
    assert grace > server["drain_s"] + server["grace_period_s"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert str(Path(config_arg).parent) in mounts


def test_service_is_headless_and_selects_the_deployment():
    (service,) = _k8s("service.yaml")
    (deployment,) = _k8s("deployment.yaml")
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"] for p in service["spec"]["ports"]} >= {"grpc"}
    kustomization = yaml.safe_load((SERVICES / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        ["configmap.yaml", "deployment.yaml", "service.yaml"]
    )


def test_compose_and_dockerfile_wiring():
    compose = yaml.safe_load((SERVICES / "compose.yaml").read_text())
    rewards = compose["services"]["rewards"]
    assert rewards["build"]["dockerfile"] == "services/Dockerfile"
    assert "127.0.0.1:50051:50051" in rewards["ports"]
    assert rewards["stop_signal"] == "SIGTERM"
    dockerfile = (SERVICES / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dancegrpo-rewards", "serve"' in dockerfile
    assert "EXPOSE 50051 9464" in dockerfile
    assert "USER 10001" in dockerfile
