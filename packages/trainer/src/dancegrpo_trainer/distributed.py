"""Process-group helpers: gradient averaging, gathers and broadcasts across ranks.

The trainer runs under ``torchrun`` or ``accelerate launch`` (one process per device).
Gradients are accumulated locally over every sample and timestep of a step and averaged
across ranks once, right before clipping: the same arithmetic as DDP with ``no_sync`` on
every micro-batch but the last, without requiring the policy to call a wrapped module.
With ``train.fsdp`` the module is sharded in place instead (:func:`shard_module`): FSDP
reduce-scatters the sharded gradients itself, and only unsharded ones are averaged here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def average_gradients(params: Iterable[torch.nn.Parameter], bucket_numel: int = 2**25) -> None:
    """All-reduces ``p.grad`` to its mean over ranks, in flat buckets of ``bucket_numel``.

    A parameter without a gradient counts as a zero gradient, so every rank reduces the
    same buckets in the same order. Sharded (FSDP, ``DTensor``) parameters are skipped:
    their gradients were already averaged over ranks by FSDP's reduce-scatter.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    n = world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= bucket_numel:
            _reduce_bucket(bucket, n)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, n)


def _reduce_bucket(grads: list[torch.Tensor], n: int) -> None:
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()


def shard_module(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> None:
    """Shards ``module`` in place with FSDP2 across all ranks: each submodule of a class in
    ``block_types`` as its own unit, then ``module`` itself (everything else).

    In place: the policy keeps calling its own module, whose parameters become ``DTensor``
    shards gathered around each unit's forward and backward. Gradients are averaged over
    ranks (FSDP's reduce-scatter), like :func:`average_gradients`. Call after LoRA,
    gradient checkpointing and :func:`broadcast_parameters`, before building the optimiser.
    """
    from torch.distributed.fsdp import fully_shard

    if block_types:
        for sub in list(module.modules()):
            if sub is not module and isinstance(sub, block_types):
                fully_shard(sub)
    fully_shard(module)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank (identical starting points)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenates ``t`` ``[n, ...]`` from every rank along dim 0 (equal ``n`` per rank)."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (rank order)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def flatten(lists: Sequence[Sequence[Any]]) -> list[Any]:
    return [x for sub in lists for x in sub]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Waits for every rank, then destroys the process group.

    Call once at the end of a distributed run. A process that exits with the group alive
    can abort in gloo's C++ threads ("terminate called without an active exception")
    while a peer is still finishing its last collective.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
