"""Weight bookkeeping around the trainable module: LoRA injection, EMA, and a frozen
reference copy for the KL penalty."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

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
    params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Temporarily points ``params`` at ``tensors`` (a pointer swap, no copy)."""
    saved = [p.data for p in params]
    try:
        for p, t in zip(params, tensors, strict=True):
            p.data = t
        yield
    finally:
        for p, t in zip(params, saved, strict=True):
            p.data = t


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
        return (
            lora_disabled(self.module) if self.lora else swapped_weights(self.params, self.frozen)
        )


class EMA:
    """Exponential moving average of the trainable parameters (float32 shadow copy)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
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
        return swapped_weights(self.params, cast)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": s for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[f"ema.{n}"])
