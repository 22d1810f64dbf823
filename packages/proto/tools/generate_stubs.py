"""Regenerate the committed Python stubs of the rewards.v1 contract.

    python packages/proto/tools/generate_stubs.py [--out DIR]

Runs grpcio-tools' protoc on ``packages/proto/proto`` and writes ``rewards_pb2.py``,
``rewards_pb2.pyi`` and ``rewards_pb2_grpc.py`` into ``dancegrpo_proto/v1`` (or ``--out``),
rewriting protoc's ``dancegrpo.rewards.v1`` import to the installed package name, and
copies the published ``service_config.json`` (the recommended client policy, which sits
beside the proto) into the package, where ``RewardClient`` reads it. The
descriptor keeps its canonical file name ``dancegrpo/rewards/v1/rewards.proto`` so that
server reflection and other languages see the buf-style path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PROTO_FILE = "dancegrpo/rewards/v1/rewards.proto"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "dancegrpo_proto" / "v1"
SERVICE_CONFIG_FILE = "dancegrpo/rewards/v1/service_config.json"
STUBS = ("rewards_pb2.py", "rewards_pb2.pyi", "rewards_pb2_grpc.py")
GENERATED = (*STUBS, "service_config.json")


def generate(out_dir: Path) -> list[Path]:
    """Compile the contract into ``out_dir``; returns the written files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        copied = out_dir / "service_config.json"
        copied.write_text((PROTO_ROOT / SERVICE_CONFIG_FILE).read_text())
        written = [copied]
        for name in STUBS:
            text = (Path(tmp) / "dancegrpo/rewards/v1" / name).read_text()
            text = text.replace(
                "from dancegrpo.rewards.v1 import rewards_pb2",
                "from dancegrpo_proto.v1 import rewards_pb2",
            )
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    if shutil.which("buf"):
        print("note: buf is installed; `buf lint packages/proto/proto` checks style")
    return 0


if __name__ == "__main__":
    sys.exit(main())
