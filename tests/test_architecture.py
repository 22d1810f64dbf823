"""The dependency direction of DESIGN §1: rewards and trainer depend on proto; neither
imports the other; proto imports neither and never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "dancegrpo_proto": ROOT / "packages/proto/src/dancegrpo_proto",
    "dancegrpo_rewards": ROOT / "packages/rewards/src/dancegrpo_rewards",
    "dancegrpo_trainer": ROOT / "packages/trainer/src/dancegrpo_trainer",
}
FORBIDDEN = {
    "dancegrpo_proto": {"dancegrpo_rewards", "dancegrpo_trainer", "torch"},
    "dancegrpo_rewards": {"dancegrpo_trainer"},
    "dancegrpo_trainer": {"dancegrpo_rewards"},
}


def imported_top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_imported_top_level_names_sees_every_import_form(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import a.b\nfrom c.d import e\nfrom . import f\n"
        "import importlib\nimportlib.import_module('g.h')\n"
    )
    assert imported_top_level_names(src) == {"a", "c", "importlib", "g"}


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_no_source_file_imports_a_forbidden_package(package: str) -> None:
    files = sorted(SOURCES[package].rglob("*.py"))
    assert files, f"no sources found for {package}"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_top_level_names(f) & FORBIDDEN[package])
        for f in files
    }
    offenders = {f: names for f, names in offenders.items() if names}
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def _modules_loaded_after_importing_everything(package: str) -> set[str]:
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package} as p\n"
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    if m.name.rsplit('.', 1)[-1] != '__main__':\n"
        "        importlib.import_module(m.name)\n"
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return set(out.stdout.split())


def test_proto_imports_without_torch() -> None:
    code = "import sys, dancegrpo_proto; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("package", "must_not_load"),
    [
        ("dancegrpo_proto", {"torch", "dancegrpo_rewards", "dancegrpo_trainer"}),
        ("dancegrpo_trainer", {"dancegrpo_rewards"}),
        ("dancegrpo_rewards", {"dancegrpo_trainer"}),
    ],
)
def test_importing_every_module_loads_no_forbidden_package(
    package: str, must_not_load: set[str]
) -> None:
    loaded = _modules_loaded_after_importing_everything(package)
    assert package in loaded
    assert not (loaded & must_not_load), f"{package} loaded {sorted(loaded & must_not_load)}"
