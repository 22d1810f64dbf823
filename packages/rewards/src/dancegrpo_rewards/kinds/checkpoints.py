"""Checkpoint files: existence checks, fast digests, state-dict loading, version strings.

Digests are *fast fingerprints*, not full hashes: SHA-256 over the file size, the first
MiB and the last MiB (``file_digest``). That reads 2 MiB of a 4 GB ViT-H checkpoint
instead of 4 GB, and still changes whenever a file is replaced by another export,
fine-tune or truncated copy (sizes or headers/tails differ). A reward's ``version`` is
``"<kind>-<16 hex>"`` of the digests of its files combined with its output-affecting
options (``version_string``), so ``ListRewards`` tells clients exactly what scored them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dancegrpo_rewards.base import RewardConfigError

#: Bytes hashed from each end of a file by ``file_digest``.
DIGEST_CHUNK_BYTES = 1 << 20
#: Where users read how to obtain checkpoints (named in every checkpoint error).
DOCS = "docs/rewards.md"


class CheckpointError(RewardConfigError):
    """A checkpoint file is missing or not in the expected format."""


def checkpoint_error(
    path: Path, what: str, expected: str, docs_section: str, problem: str
) -> CheckpointError:
    """A ``CheckpointError`` naming the path, the expected format and the docs section."""
    return CheckpointError(
        f"{what} {problem}: {path}\n  expected: {expected}\n"
        f"  see {DOCS}, section {docs_section!r}, for where to get it"
    )


@contextlib.contextmanager
def load_errors_as_checkpoint_error(
    path: Path,
    *,
    what: str,
    expected: str,
    docs_section: str,
    problem: str = "could not be loaded",
) -> Iterator[None]:
    """Turns any failure inside the ``with`` block (a library's loader meeting a bad
    folder or file) into a ``CheckpointError`` "``problem`` (the error)" naming ``path``, the
    expected format and the docs section."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure means files that do not fit
        raise checkpoint_error(path, what, expected, docs_section, f"{problem} ({err})") from err


def require_file(path: Path, *, what: str, expected: str, docs_section: str) -> Path:
    """Returns ``path`` if it is a readable file, else raises ``CheckpointError``."""
    if not path.exists():
        raise checkpoint_error(path, what, expected, docs_section, "not found")
    if not path.is_file():
        raise checkpoint_error(path, what, expected, docs_section, "is not a file")
    return path


def require_dir(
    path: Path, required: Iterable[str], *, what: str, expected: str, docs_section: str
) -> Path:
    """Returns ``path`` if it is a folder holding every file in ``required``."""
    if not path.is_dir():
        raise checkpoint_error(path, what, expected, docs_section, "folder not found")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        problem = f"folder lacks {', '.join(missing)}"
        raise checkpoint_error(path, what, expected, docs_section, problem)
    return path


def file_digest(path: Path) -> str:
    """SHA-256 hex of (size, first MiB, last MiB) of a file — a fast fingerprint."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(DIGEST_CHUNK_BYTES))
        if size > DIGEST_CHUNK_BYTES:
            f.seek(max(DIGEST_CHUNK_BYTES, size - DIGEST_CHUNK_BYTES))
            h.update(f.read(DIGEST_CHUNK_BYTES))
    return h.hexdigest()


def folder_digest(path: Path) -> str:
    """``file_digest`` of every file in a folder (recursively), by relative name."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file_digest(file).encode())
    return h.hexdigest()


def version_string(kind: str, digests: Mapping[str, str], options: Mapping[str, Any]) -> str:
    """``"<kind>-<16 hex>"`` of the file digests and the output-affecting options."""
    payload = json.dumps(
        {"digests": dict(digests), "options": dict(options)}, sort_keys=True, default=str
    )
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def load_state_dict_file(
    path: Path, *, what: str, expected: str, docs_section: str
) -> dict[str, Any]:
    """Loads a state dict from ``.safetensors``, a ``torch.save`` file or a TorchScript archive.

    Accepts ``{"state_dict": sd, ...}`` (hpsv2 / open_clip training checkpoints), a bare
    state dict, and OpenAI's TorchScript CLIP files; strips a ``module.`` prefix (DDP).
    ``torch.load`` runs with ``weights_only=True``: checkpoints are data, never code.

    Raises:
        CheckpointError: the file is missing or holds no tensor state dict.
    """
    import torch

    require_file(path, what=what, expected=expected, docs_section=docs_section)
    with load_errors_as_checkpoint_error(
        path, what=what, expected=expected, docs_section=docs_section, problem="could not be read"
    ):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif _is_torchscript_archive(path):
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise checkpoint_error(path, what, expected, docs_section, "holds no tensor state dict")
    state_dict = dict(obj)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict
