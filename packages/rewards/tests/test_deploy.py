"""Deployment files under services/: they parse, validate with the config loader, the
Kubernetes/compose/Docker wiring points at the gRPC health service and the right ports, the
reward groups' configs, locks and images agree, and the offline checks of
``services/check_deploy.py`` (hadolint, Compose v2, kustomize + Kubernetes schemas, Pod
Security "restricted") pass and catch what they claim to."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dancegrpo_rewards.config import load_config
from dancegrpo_rewards.registry import KIND_EXTRAS, REWARD_KINDS, kinds_in_options

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ROOT / "services"
GROUPS = ("image", "video")
WEIGHTS_ENV = {"DANCEGRPO_WEIGHTS": "/weights"}


def _load_check_deploy():
    spec = importlib.util.spec_from_file_location("check_deploy", SERVICES / "check_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_deploy = _load_check_deploy()


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    """``kubectl kustomize services/k8s``: both reward groups."""
    return check_deploy.render(SERVICES / "k8s")


def _of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _group_config(group: str):
    return load_config(
        SERVICES / "groups" / group / "rewards.yaml", env=WEIGHTS_ENV, require_files=False
    )


def _pins(group: str) -> dict[str, str]:
    lines = (SERVICES / "groups" / group / "requirements.lock").read_text().splitlines()
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[A-Za-z0-9._+-]+", version), line
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


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


def test_the_offline_deployment_checks_pass() -> None:
    """What .ci/run runs (make check-deploy): hadolint, compose config, kustomize + schemas."""
    result = subprocess.run(
        [sys.executable, str(SERVICES / "check_deploy.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "0 problem(s)" in result.stdout


def test_restricted_check_flags_the_pod_the_review_found() -> None:
    """The Deployment before the hardening (issue 14): fails the restricted level and ours."""
    old = yaml.safe_load(Path(__file__).with_name("old_deployment.yaml").read_text())
    ((where, pod),) = check_deploy.pod_templates([old])
    problems = check_deploy.restricted_problems(where, pod)
    problems += check_deploy.hardening_problems(where, pod)
    text = "\n".join(problems)
    for rule in (
        "allowPrivilegeEscalation must be false",
        "capabilities.drop must include ALL",
        "seccompProfile.type must be RuntimeDefault",
        "readOnlyRootFilesystem must be true",
        "writable emptyDir mounted at /tmp",
        "startupProbe.timeoutSeconds must be > 1",
        "readinessProbe.timeoutSeconds must be > 1",
    ):
        assert rule in text, rule
    host = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    host_problems = check_deploy.restricted_problems("p", {**pod, **host})
    assert any("hostNetwork" in p for p in host_problems)
    assert any("hostPath" in p for p in host_problems)


def test_rendered_pods_meet_the_restricted_level(rendered: list[dict]) -> None:
    pods = check_deploy.pod_templates(rendered)
    assert len(pods) == len(GROUPS)
    for where, pod in pods:
        assert check_deploy.restricted_problems(where, pod) == []
        assert check_deploy.hardening_problems(where, pod) == []
    assert check_deploy.wiring_problems(rendered) == []


def test_schema_validation_and_wiring_reject_broken_objects(rendered: list[dict]) -> None:
    (deployment, *_) = _of_kind(rendered, "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    probe = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["timeoutSecondz"] = probe.pop("timeoutSeconds")
    (problem,) = check_deploy.schema_problems([broken])
    assert "timeoutSecondz" in problem
    no_budget = [o for o in rendered if o["kind"] != "PodDisruptionBudget"]
    assert len(check_deploy.wiring_problems(no_budget)) == len(GROUPS)


def test_compose_and_dockerfile_checks_catch_mistakes(tmp_path: Path) -> None:
    bad_compose = tmp_path / "compose.yaml"
    bad_compose.write_text("services:\n  a:\n    image: x\n    bogus_key: 1\n")
    assert "bogus_key" in check_deploy.compose_problems(bad_compose)[0]
    bad_dockerfile = tmp_path / "Dockerfile"
    bad_dockerfile.write_text("FROM python\nRUN pip install flask\n")
    codes = " ".join(check_deploy.dockerfile_problems(bad_dockerfile))
    assert "DL3006" in codes and "DL3013" in codes  # untagged base image, unpinned pip


def test_each_group_is_a_service_with_its_own_image_config_and_budget(
    rendered: list[dict],
) -> None:
    deployments = {d["metadata"]["name"]: d for d in _of_kind(rendered, "Deployment")}
    services = {s["metadata"]["name"]: s for s in _of_kind(rendered, "Service")}
    configmaps = {c["metadata"]["name"]: c for c in _of_kind(rendered, "ConfigMap")}
    for group in GROUPS:
        name = f"dancegrpo-rewards-{group}"
        pod = deployments[name]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert container["image"] == f"dancegrpo-rewards-{group}:0.1.0"
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == group
        svc = services[name]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == group
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
        data = configmaps[volume["configMap"]["name"]]["data"]["rewards.yaml"]
        assert data == (SERVICES / "groups" / group / "rewards.yaml").read_text()


def test_deployment_probes_use_grpc_health_on_the_grpc_port(rendered: list[dict]) -> None:
    for deployment in _of_kind(rendered, "Deployment"):
        group = deployment["metadata"]["name"].rsplit("-", 1)[1]
        server = yaml.safe_load((SERVICES / "groups" / group / "rewards.yaml").read_text())
        server = server["server"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == server["port"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == server["port"], probe
            assert container[probe]["timeoutSeconds"] > 1, probe
        assert server["host"] == "0.0.0.0" and server["drain_s"] > 0
        assert pod["terminationGracePeriodSeconds"] > server["drain_s"] + server["grace_period_s"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        config_arg = container["args"][container["args"].index("--config") + 1]
        assert str(Path(config_arg).parent) in mounts


@pytest.mark.parametrize("group", GROUPS)
def test_group_configs_validate_and_the_lock_carries_their_extras(group: str) -> None:
    from dancegrpo_rewards.cli import main

    config = _group_config(group)
    pins = _pins(group)
    assert "torch" in pins and not any(name.startswith("dancegrpo") for name in pins)
    assert {"setuptools", "wheel"} <= set(pins)  # the image builds our packages without isolation
    pyproject = (ROOT / "packages/rewards/pyproject.toml").read_text()
    import tomllib

    extras = tomllib.loads(pyproject)["project"]["optional-dependencies"]
    kinds = set()
    for spec in config.rewards.values():
        kinds |= {spec.kind} | kinds_in_options(spec.options)
    for extra in {KIND_EXTRAS[k] for k in kinds if k in KIND_EXTRAS}:
        for requirement in extras[extra]:
            name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
            assert name.lower() in pins, f"{group}: lock lacks {requirement} of [{extra}]"
    path = str(SERVICES / "groups" / group / "rewards.yaml")
    env = {"DANCEGRPO_WEIGHTS": "/weights"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert main(["check", "--config", path, "--no-file-check"]) == 0


def test_the_groups_conflict_and_together_host_every_reward_of_rewards_yaml() -> None:
    image, video = _pins("image"), _pins("video")
    assert image["transformers"].split(".")[0] != video["transformers"].split(".")[0]
    everything = load_config(SERVICES / "rewards.yaml", env=WEIGHTS_ENV, require_files=False)
    hosted = [set(_group_config(g).rewards) for g in GROUPS]
    assert not (hosted[0] & hosted[1])
    assert hosted[0] | hosted[1] == set(everything.rewards)


def test_compose_and_dockerfile_wiring() -> None:
    compose = yaml.safe_load((SERVICES / "compose.yaml").read_text())
    assert "version" not in compose  # Compose v2: the top-level version key is obsolete
    for group in GROUPS:
        service = compose["services"][f"rewards-{group}"]
        assert service["build"]["dockerfile"] == "services/Dockerfile"
        assert service["build"]["args"] == {"GROUP": group}
        assert service["stop_signal"] == "SIGTERM"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert any(t.startswith("/tmp") for t in service["tmpfs"])
    dockerfile = (SERVICES / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dancegrpo-rewards", "serve"' in dockerfile
    assert "EXPOSE 50051 9464" in dockerfile
    assert "USER 10001" in dockerfile
    # Dependency layer (the lock) before the source layer.
    assert dockerfile.index("requirements.lock") < dockerfile.index("COPY packages/rewards")
    assert "FROM ${BASE_IMAGE}" in dockerfile
    base = re.search(r"ARG BASE_IMAGE=(\S+)", dockerfile).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base


def test_dockerignore_keeps_the_context_to_what_the_image_copies() -> None:
    rules = (ROOT / ".dockerignore").read_text().split()
    assert rules[rules.index("*") :][0] == "*"  # deny everything first, then allow
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert {"packages/proto/", "packages/rewards/"} <= allowed
    assert not any(r.startswith((".venv", "runs", "benchmarks")) for r in allowed)
