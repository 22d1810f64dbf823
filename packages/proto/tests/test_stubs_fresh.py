"""The committed stubs equal what `make proto` generates from the committed .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROTO_PKG = Path(__file__).resolve().parents[1]
COMMITTED = PROTO_PKG / "src/dancegrpo_proto/v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_stubs", PROTO_PKG / "tools/generate_stubs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generator = _load_generator()
    written = generator.generate(tmp_path)
    assert {p.name for p in written} == set(generator.GENERATED)
    stale = [p.name for p in written if p.read_text() != (COMMITTED / p.name).read_text()]
    assert not stale, f"stubs out of date: {stale}; run `make proto` and commit the result"


def test_generated_stubs_import_through_the_package_not_protoc_paths() -> None:
    grpc_stub = (COMMITTED / "rewards_pb2_grpc.py").read_text()
    assert "from dancegrpo_proto.v1 import rewards_pb2" in grpc_stub
    assert "from dancegrpo.rewards.v1" not in grpc_stub
