"""Which reward terms score which samples: ``data.sources`` routes each prompt source to
the ``rewards.endpoints`` labels (and weights) it names.

A route is ``label → weight`` for one sample (every sample of a prompt group shares its
prompt's route). Without sources every sample is routed to every endpoint at its
configured weight, and the trainer keeps its unrouted code paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dancegrpo_trainer.config import PromptSource, RewardEndpoint
from dancegrpo_trainer.data import PromptRecord

Route = Mapping[str, float]


class RewardRouting:
    """The routes of a run.

    Args:
        endpoints: ``rewards.endpoints``.
        sources: ``data.sources`` (empty: not routed).
    """

    def __init__(
        self, endpoints: Sequence[RewardEndpoint], sources: Sequence[PromptSource]
    ) -> None:
        self.weights = {ep.label: ep.weight for ep in endpoints}
        self.sources = [s.name for s in sources]
        self._by_source = {s.name: s.reward_weights(endpoints) for s in sources}

    @property
    def routed(self) -> bool:
        """Whether prompt sources pick their rewards (``data.sources`` is set)."""
        return bool(self._by_source)

    def route(self, record: PromptRecord) -> dict[str, float]:
        """``label → weight`` of the terms that score ``record``'s samples."""
        if not self.routed:
            return dict(self.weights)
        if record.source not in self._by_source:
            raise ValueError(f"prompt {record.prompt!r} has no known source ({record.source!r})")
        return dict(self._by_source[record.source])

    def sample_routes(
        self, records: Sequence[PromptRecord], repeats: int
    ) -> list[dict[str, float]] | None:
        """Per sample (each record repeated ``repeats`` times, prompt-major), its route;
        ``None`` when the run is not routed."""
        if not self.routed:
            return None
        routes = [self.route(r) for r in records]
        return [route for route in routes for _ in range(repeats)]
