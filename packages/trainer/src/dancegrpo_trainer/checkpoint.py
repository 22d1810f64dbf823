"""Checkpoints: model (or LoRA) weights, optimiser, scheduler, RNG states, trainer state.

Layout of ``<run>/checkpoints/step_000123/``::

    model.safetensors        trainable-module state (LoRA: adapter weights only; + EMA)
    optimizer.pt             optimiser state_dict
    scheduler.pt             learning-rate scheduler state_dict
    trainer_state.json       step, prompt-sampler position, grad-norm history, tracker
    rng_state_<rank>.pt      python / numpy / torch (/ cuda) RNG states of each rank

Written by rank 0 (RNG states by every rank) into a temporary folder renamed when
complete, so a crash mid-save never leaves a checkpoint that looks valid.

A module sharded with FSDP (``train.fsdp``) is saved in the same, unsharded layout: every
rank joins in gathering the full model and optimiser state, which rank 0 writes, and a
resume loads the full tensors back into the shards (the files look like an unsharded
run's).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
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
    torch.save(_rng_state(), tmp / f"rng_state_{rank}.pt")
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
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
    dist_utils.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def load_checkpoint(
    path: Path,
    *,
    module: nn.Module,
    lora: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restores module, optimiser, scheduler and this rank's RNG states.

    Returns:
        ``(trainer_state, extra_tensors)``: the JSON trainer state and the tensors saved
        beside the module state (e.g. ``ema.*``).
    """
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    tensors = load_file(str(path / "model.safetensors"))
    sharded = isinstance(module, FSDPModule)
    own = module.state_dict().keys() if sharded else module_state(module, lora).keys()
    if lora:
        own = [k for k in own if "lora_" in k]
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (was it saved with another train.lora setting?)"
        )
    extra = {k: v for k, v in tensors.items() if k not in own}
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    if sharded:
        opts = StateDictOptions(full_state_dict=True, strict=not lora)
        set_model_state_dict(module, {k: tensors[k] for k in own}, options=opts)
        _load_full_optimizer_state(module, optimizer, optimizer_state)
    else:
        module.load_state_dict({k: tensors[k] for k in own}, strict=not lora)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{dist_utils.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text()), extra


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
