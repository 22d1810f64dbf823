"""Weight bookkeeping around the trainable module: LoRA injection, EMA, and a frozen
reference copy for the KL penalty.

EMA and the full-fine-tune KL reference swap other weights into the live parameters for a
while. Plain parameters swap by pointer (``p.data = t``, no copy). Parameters sharded by
FSDP (``train.fsdp``, ``DTensor``) cannot: FSDP keeps views of their storage, and a pointer
swap crashed. They are swapped by copying into the local shards in place, after which every
FSDP unit of the module is resharded so that its next forward all-gathers the swapped
values (the root unit otherwise keeps its gathered parameters from the last forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dancegrpo_trainer.config import LoraConfig


def apply_lora(module: nn.Module, cfg: LoraConfig, default_targets: Sequence[str]) -> None:
    """Injects LoRA adapters into ``module`` in place (peft) and freezes everything else.

    In place matters: the policy keeps calling its own module, which now holds the
    adapters. Targets come from ``train.lora.target_modules`` or the policy's defaults.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = list(cfg.target_modules or default_targets)
    if not targets:
        raise ValueError(
            "train.lora.target_modules: the policy declares no default LoRA targets; "
            "list module names to adapt"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=targets,
    )
    inject_adapter_in_model(peft_cfg, module)
    trainable = 0
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ValueError(f"train.lora.target_modules={targets} matched no module of the policy")


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def swapped_weights(
    params: Sequence[nn.Parameter],
    tensors: Sequence[torch.Tensor],
    module: nn.Module | None = None,
) -> Iterator[None]:
    """Temporarily gives ``params`` the values of ``tensors``: a pointer swap for plain
    parameters; for FSDP-sharded ones an in-place copy into the local shards (restored on
    exit), resharding ``module``'s FSDP units after each copy."""
    if not any(isinstance(p, DTensor) for p in params):
        saved = [p.data for p in params]
        try:
            for p, t in zip(params, tensors, strict=True):
                p.data = t
            yield
        finally:
            for p, t in zip(params, saved, strict=True):
                p.data = t
        return
    saved = [p.detach().clone() for p in params]
    try:
        _copy_sharded(params, tensors, module)
        yield
    finally:
        _copy_sharded(params, saved, module)


@torch.no_grad()
def _copy_sharded(
    params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor], module: nn.Module | None
) -> None:
    for p, t in zip(params, tensors, strict=True):
        p.copy_(t)
    if module is not None:
        from torch.distributed.fsdp import FSDPModule

        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Runs the base model with every LoRA adapter switched off (the reference policy)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class ReferencePolicy:
    """The initial policy, for the KL penalty: LoRA off, or a frozen copy of the trainable
    weights swapped in (full fine-tuning)."""

    def __init__(self, module: nn.Module, lora: bool) -> None:
        self.module = module
        self.lora = lora
        self.params = [p for _, p in trainable_parameters(module)]
        self.frozen = [] if lora else [p.detach().clone() for p in self.params]

    def active(self) -> contextlib.AbstractContextManager[None]:
        if self.lora:
            return lora_disabled(self.module)
        return swapped_weights(self.params, self.frozen, self.module)


class EMA:
    """Exponential moving average of the trainable parameters (float32 shadow copy)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = module
        self.names = [n for n, _ in trainable_parameters(module)]
        self.params = [p for _, p in trainable_parameters(module)]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    def active(self) -> contextlib.AbstractContextManager[None]:
        """Swaps the EMA weights in (eval, export)."""
        cast = [s.to(p.dtype) for s, p in zip(self.shadow, self.params, strict=True)]
        return swapped_weights(self.params, cast, self.module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights, full (unsharded) tensors: with FSDP a collective that every
        rank calls (as checkpoint saving is)."""
        return {f"ema.{n}": _full(s) for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            shadow, full = self.shadow[i], state[f"ema.{n}"]
            if isinstance(shadow, DTensor):  # every rank holds the full tensor: keep its shard
                full = distribute_tensor(
                    full.to(shadow.device, shadow.dtype), shadow.device_mesh, shadow.placements
                )
            shadow.copy_(full)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t
