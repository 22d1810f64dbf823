"""Checkpoints: model (or LoRA) weights, optimiser, scheduler, RNG states, trainer state.

Layout of ``<run>/checkpoints/step_000123/``::

    model.safetensors              trainable-module state (LoRA: adapter weights only; + EMA)
    optimizer.safetensors          optimiser state (param groups as JSON in its metadata)
    scheduler.json                 learning-rate scheduler state_dict
    trainer_state.json             step, prompt-sampler position, grad-norm history, tracker
    rng_state_<rank>.safetensors   python / numpy / torch (/ cuda) RNG states of each rank
    manifest.json                  size and sha256 of every file above, written last

No file is a pickle (safetensors or JSON only; see :mod:`checkpoint_format`), so loading
a checkpoint never runs code from it. Written by rank 0 (RNG states by every rank) into a
temporary folder; every file is fsynced, the manifest written, and the folder renamed
when complete, so a crash mid-save never leaves a checkpoint that looks valid. A resume
verifies the files it reads against the manifest first (:mod:`checkpoint_integrity`) and
fails naming the file on a bit flip, a truncated file or a missing part.

A module sharded with FSDP (``train.fsdp``) is saved in the same, unsharded layout: every
rank joins in gathering the full model and optimiser state, which rank 0 writes, and a
resume loads the full tensors back into the shards (the files look like an unsharded
run's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from dancegrpo_trainer import distributed as dist_utils
from dancegrpo_trainer.checkpoint_format import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    load_optimizer_state,
    load_rng_state,
    load_scheduler_state,
    rng_file_name,
    save_optimizer_state,
    save_rng_state,
    save_scheduler_state,
)
from dancegrpo_trainer.checkpoint_integrity import (
    CheckpointError,
    fsync_path,
    verify_files,
    write_manifest,
)

_PREFIX = "step_"


def module_state(module: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the trainable module (LoRA: adapter tensors only)."""
    state = module.state_dict()
    if lora:
        state = {k: v for k, v in state.items() if "lora_" in k}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimised parameter, in the order ``optimizer.state_dict()``
    numbers them (param groups in order)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimiser state of an FSDP module, numbered like
    ``optimizer.state_dict()`` (collective; only rank 0 receives the tensors)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(module, optimizer, options=opts)
    if not state:  # ranks other than 0
        return {}
    index = {n: i for i, n in enumerate(_param_names(module, optimizer))}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def _load_full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Loads ``optimizer.state_dict()``-numbered full state into an FSDP module's shards."""
    names = _param_names(module, optimizer)
    by_name = {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    opts = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(module, optimizer, by_name, options=opts)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    module: nn.Module,
    lora: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Saves step ``step``; returns its folder. Call on every rank (collective)."""
    root = run_dir / "checkpoints"
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp_{_PREFIX}{step:06d}"
    rank = dist_utils.rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    rng_file = tmp / rng_file_name(rank)
    save_rng_state(rng_file)
    fsync_path(rng_file)
    if isinstance(module, FSDPModule):  # collectives: every rank gathers, rank 0 receives
        # LoRA: only the trained (adapter) weights are gathered, not the frozen base.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        tensors = get_model_state_dict(module, options=opts)
        if lora:
            tensors = {k: v for k, v in tensors.items() if "lora_" in k}
        optimizer_state = _full_optimizer_state(module, optimizer)
    elif rank == 0:
        tensors, optimizer_state = module_state(module, lora), optimizer.state_dict()
    if rank == 0:
        tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
        save_file(tensors, str(tmp / "model.safetensors"))
        save_optimizer_state(optimizer_state, tmp / OPTIMIZER_FILE)
        save_scheduler_state(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
    dist_utils.barrier()
    if rank == 0:
        write_manifest(tmp, step)  # after every rank's files: fsyncs them all first
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_path(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``run.resume`` selects: ``never`` → ``None``; ``auto`` → the run's
    latest checkpoint or ``None``; otherwise the given folder, which must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"run.resume: checkpoint folder {path} does not exist")
    return path


def load_checkpoint(
    path: Path,
    *,
    module: nn.Module,
    lora: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restores module, optimiser, scheduler and this rank's RNG states.

    Raises :class:`CheckpointError` (naming the file) when a file it reads is missing,
    truncated or does not match the manifest's checksum.

    Returns:
        ``(trainer_state, extra_tensors)``: the JSON trainer state and the tensors saved
        beside the module state (e.g. ``ema.*``).
    """
    rng_file = rng_file_name(dist_utils.rank())
    # A run resumed on more ranks than it was saved with has no RNG file for the new ranks
    # (nothing in training draws from the global RNGs; every draw has its own seed).
    rng_saved = (path / rng_file).is_file()
    reads = ["trainer_state.json", "model.safetensors", OPTIMIZER_FILE, SCHEDULER_FILE]
    verify_files(path, reads + [rng_file] * rng_saved)
    tensors = load_file(str(path / "model.safetensors"))
    sharded = isinstance(module, FSDPModule)
    # The keys module_state saves (without copying every tensor to the CPU to list them).
    own = dict.fromkeys(k for k in module.state_dict() if not lora or "lora_" in k)
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (was it saved with another train.lora setting?)"
        )
    extra = {k: v for k, v in tensors.items() if k not in own}
    optimizer_state = load_optimizer_state(path / OPTIMIZER_FILE)
    if sharded:
        opts = StateDictOptions(full_state_dict=True, strict=not lora)
        set_model_state_dict(module, {k: tensors[k] for k in own}, options=opts)
        _load_full_optimizer_state(module, optimizer, optimizer_state)
    else:
        module.load_state_dict({k: tensors[k] for k in own}, strict=not lora)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(load_scheduler_state(path / SCHEDULER_FILE))
    if rng_saved:
        load_rng_state(path / rng_file)
    return json.loads((path / "trainer_state.json").read_text()), extra
