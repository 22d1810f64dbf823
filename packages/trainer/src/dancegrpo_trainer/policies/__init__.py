"""Model adapters: one module per model family, all implementing ``Policy``."""

from dancegrpo_trainer.policies.base import Conditioning, Policy, SamplerKind, Schedule

__all__ = ["Conditioning", "Policy", "SamplerKind", "Schedule"]
