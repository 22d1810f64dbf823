"""No code path of the product unpickles anything (loading a pickle runs code from the file).

Scans the syntax tree of every Python file of the repository: product code imports no
pickle-family module; every ``torch.load`` anywhere passes ``weights_only=True``;
nothing passes ``weights_only=False`` or ``allow_pickle=True``. The only exception is the
benchmark's HTTP+pickle *baseline* (Flow-GRPO's serving pattern, measured for comparison,
loopback only), which the product never imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [ROOT / "packages" / p / "src" for p in ("proto", "rewards", "trainer")]
BASELINE = ROOT / "benchmarks" / "http_pickle_baseline.py"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
SKIP_DIRS = {".venv", ".git", "build", "dist", "runs", "__pycache__", ".cache"}


def python_files() -> list[Path]:
    return sorted(
        p for p in ROOT.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
    )


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, *, product: bool) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if product and isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                if name and name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"line {line}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        if _is_constant(_keyword(node, "weights_only"), False):
            found.append(f"line {line}: weights_only=False")
        if _is_constant(_keyword(node, "allow_pickle"), True):
            found.append(f"line {line}: allow_pickle=True")
        func = node.func
        is_torch_load = (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id == "torch"
        )
        if is_torch_load and not _is_constant(_keyword(node, "weights_only"), True):
            found.append(f"line {line}: torch.load without weights_only=True")
    return found


def test_the_scanner_sees_each_unsafe_form() -> None:
    bad = (
        "import pickle\nfrom dill import loads\nimport torch\n"
        "torch.load(f, weights_only=False)\ntorch.load(f)\nnp.load(f, allow_pickle=True)\n"
    )
    assert len(violations(bad, product=True)) == 6
    assert violations("torch.load(f, map_location='cpu', weights_only=True)", product=True) == []


def test_no_file_unpickles() -> None:
    files = [p for p in python_files() if p not in (BASELINE, Path(__file__).resolve())]
    assert len(files) > 50, "the scan found too few files: is ROOT right?"
    found = {
        str(path.relative_to(ROOT)): bad
        for path in files
        if (bad := violations(path.read_text(), product=any(r in path.parents for r in PRODUCT)))
    }
    assert found == {}


def test_the_product_never_imports_the_pickle_baseline() -> None:
    for root in PRODUCT:
        for path in root.rglob("*.py"):
            assert "http_pickle_baseline" not in path.read_text(), path
