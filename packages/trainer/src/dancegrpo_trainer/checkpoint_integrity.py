"""Checkpoint integrity: a manifest of sha256 checksums, durable writes, verification.

``manifest.json`` lists every file of a checkpoint with its size and sha256 and is
written last, after every file has been flushed to disk (``fsync``), so a checkpoint
folder is complete exactly when its manifest is present. A resume checks the files it
reads against the manifest before loading any of them, so a bit flip, a truncated file
or a missing part fails with a :class:`CheckpointError` that names the file, instead
of silently training on from different weights or failing with a raw parser error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "manifest.json"
_FORMAT = "dancegrpo-checkpoint/1"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flushes a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    """Fsyncs every file in ``folder``, then writes and fsyncs ``manifest.json`` listing
    their sizes and sha256 checksums, then fsyncs the folder."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"format": _FORMAT, "step": step, "files": files}, indent=1))
    fsync_path(manifest)
    fsync_path(folder)


def read_manifest(folder: Path) -> dict[str, dict[str, object]]:
    """The ``files`` table of a checkpoint's manifest (``name → {bytes, sha256}``)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {folder}: {MANIFEST} is missing, so the checkpoint is incomplete "
            "or was written by a dancegrpo-trainer without checksums; it cannot be verified"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupt ({exc})") from None
    return files


def verify_files(folder: Path, names: Iterable[str]) -> None:
    """Checks that every manifest entry exists and that ``names`` match their size and
    sha256. Raises :class:`CheckpointError` naming the first bad file."""
    files = read_manifest(folder)
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing (listed in {MANIFEST})")
    for name in names:
        path = folder / name
        entry = files.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {folder}: {name} is not listed in {MANIFEST}")
        size, expected = path.stat().st_size, entry["bytes"]
        if size < expected:
            raise CheckpointError(
                f"checkpoint {folder}: {name} is truncated ({size} of {expected} bytes)"
            )
        if size != expected:
            raise CheckpointError(
                f"checkpoint {folder}: {name} has {size} bytes, {MANIFEST} says {expected}"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {folder}: {name} is corrupt (sha256 differs from {MANIFEST}); "
                "restore it or resume from an earlier checkpoint (run.resume=PATH)"
            )
