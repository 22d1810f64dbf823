"""Training algorithms, one module each, chosen by ``train.algorithm``.

The registry maps a name to ``"module:Class"`` and imports the module only when the
algorithm is built, so adding an algorithm is one new module plus one line here. The
trainer composes prompts → rollout (policy + sampler + window) → remote rewards →
advantages → :meth:`Algorithm.loss` → optimiser and never branches on the algorithm.
"""

from __future__ import annotations

import importlib

#: name → ``"module:Class"`` (a module of this package; the class itself also works, e.g.
#: for an algorithm defined outside the package).
ALGORITHMS: dict[str, str | type] = {
    "grpo": "grpo:GRPO",
    "grpo_guard": "grpo_guard:GRPOGuard",
    "nft": "nft:DiffusionNFT",
}


def algorithm_class(name: str) -> type:
    """The :class:`~dancegrpo_trainer.algorithms.base.Algorithm` subclass named ``name``."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: choose from {sorted(ALGORITHMS)}")
    entry = ALGORITHMS[name]
    if not isinstance(entry, str):
        return entry
    module, cls = entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["ALGORITHMS", "algorithm_class"]
