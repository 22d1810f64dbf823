"""Pickle-free files for the non-model parts of a checkpoint: optimiser, scheduler, RNG.

Loading a pickle runs whatever code the file names, so a checkpoint folder someone else
could write to (a shared file system, a downloaded run) must never be unpickled. Every
file here is safetensors (tensors; a JSON header that cannot execute anything) or JSON:

- optimiser: ``optimizer.safetensors``, one tensor per ``state[i][name]`` under the key
  ``state.<i>.<name>``; the param groups and any non-tensor state values as JSON in the
  file's metadata.
- scheduler: ``scheduler.json`` (``state_dict()`` of a scheduler whose state is plain
  numbers, as :class:`torch.optim.lr_scheduler.LambdaLR`'s is: its lambdas are not saved).
- RNG: ``rng_state_<rank>.safetensors``: python ``random``'s Mersenne-Twister words,
  numpy's legacy ``RandomState`` key, torch's CPU generator state and every CUDA device's
  generator state as tensors; the remaining scalars as JSON in the metadata.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
_OPTIMIZER_FORMAT = "dancegrpo-optimizer/1"
_RNG_FORMAT = "dancegrpo-rng/1"


def rng_file_name(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def _tag_tuples(value: Any) -> Any:
    """JSON has no tuple: ``(a, b)`` becomes ``{"__tuple__": [a, b]}`` (e.g. Adam's betas),
    so that a loaded state equals the saved one."""
    if isinstance(value, tuple):
        return {"__tuple__": [_tag_tuples(v) for v in value]}
    if isinstance(value, list):
        return [_tag_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_tuples(v) for k, v in value.items()}
    return value


def _untag_tuples(obj: dict[str, Any]) -> Any:
    return tuple(obj["__tuple__"]) if obj.keys() == {"__tuple__"} else obj


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(_tag_tuples(value))
    except TypeError as exc:
        raise TypeError(f"{what} is not JSON-serialisable ({exc}); cannot checkpoint it") from None


def _unjson(text: str) -> Any:
    return json.loads(text, object_hook=_untag_tuples)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


# ------------------------------------------------------------------ optimiser


def save_optimizer_state(state: dict[str, Any], path: Path) -> None:
    """Writes ``optimizer.state_dict()`` (ints index the parameters) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            key = f"state.{int(index)}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    metadata = {
        "format": _OPTIMIZER_FORMAT,
        "param_groups": _json(state["param_groups"], "optimizer param_groups"),
        "scalars": _json(scalars, "optimizer state"),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """Reads what :func:`save_optimizer_state` wrote, in ``optimizer.state_dict()`` form."""
    tensors, metadata = _read(path)
    if metadata.get("format") != _OPTIMIZER_FORMAT:
        raise ValueError(f"{path} is not a dancegrpo optimiser state file")
    state: dict[int, dict[str, Any]] = {}
    values = {**_unjson(metadata["scalars"]), **tensors}
    for key, value in values.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    groups = _unjson(metadata["param_groups"])
    return {"state": dict(sorted(state.items())), "param_groups": groups}


# ------------------------------------------------------------------ scheduler


def save_scheduler_state(state: dict[str, Any], path: Path) -> None:
    path.write_text(_json(state, "scheduler state_dict"))


def load_scheduler_state(path: Path) -> dict[str, Any]:
    return _unjson(path.read_text())


# ------------------------------------------------------------------ RNG


def save_rng_state(path: Path) -> None:
    """Writes this process's python / numpy / torch (/ CUDA) RNG states."""
    version, words, gauss_next = random.getstate()
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors = {
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "torch": torch.get_rng_state(),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda.{i}": s for i, s in enumerate(cuda)})
    scalars = {
        "python_version": version,
        "python_gauss_next": gauss_next,
        "numpy_algorithm": algorithm,
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
        "cuda_devices": len(cuda),
    }
    save_file(tensors, str(path), metadata={"format": _RNG_FORMAT, "scalars": json.dumps(scalars)})


def load_rng_state(path: Path) -> None:
    """Restores the states :func:`save_rng_state` wrote (CUDA only where CUDA is present)."""
    tensors, metadata = _read(path)
    if metadata.get("format") != _RNG_FORMAT:
        raise ValueError(f"{path} is not a dancegrpo RNG state file")
    s = json.loads(metadata["scalars"])
    words = tuple(int(w) for w in tensors["python"].tolist())
    random.setstate((s["python_version"], words, s["python_gauss_next"]))
    key = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            s["numpy_algorithm"],
            key,
            s["numpy_pos"],
            s["numpy_has_gauss"],
            s["numpy_cached_gaussian"],
        )
    )
    torch.set_rng_state(tensors["torch"])
    if s["cuda_devices"] and torch.cuda.is_available():
        devices = min(s["cuda_devices"], torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(devices)])
