"""``rewards:``: the reward terms (:class:`RewardEndpoint`), Best-of-N selection and how
rewards become advantages (:class:`RewardsConfig`)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Literal

from dancegrpo_trainer.config.errors import _check

AdvantageMode = Literal["group", "per_prompt"]


@dataclasses.dataclass
class RewardEndpoint:
    """One reward term: a named output of a reward hosted by a reward service.

    Attributes:
        target: gRPC target, e.g. ``localhost:50051``, ``dns:///rewards:50051``, or a
            comma-separated list of replicas. ``${ENV}`` references expand at start-up.
        reward: the reward's name on that server (``hps``, ``clip``, ``color_match``...).
        output: which of the reward's outputs trains (``score``, ``vq``, ``binary``...).
        weight: weight of this term in the aggregated advantage.
        threshold: if set, the term is binary: ``1`` where ``output >= threshold`` else ``0``.
        timeout_s: per-call deadline passed to the client.
        name: label used in metrics; defaults to ``reward/output``.
        metadata: send each sample's prompt metadata (its GenEval spec, from a ``.jsonl``
            prompt file of GenEval rows): rewards such as ``geneval`` need it. Every
            train and eval prompt must then carry one (checked at start-up).
        token_env: name of the environment variable holding the bearer token the server
            expects (its ``server.auth.token_env``); ``None`` sends no token.
        tls_ca: PEM CA bundle to verify the server's certificate; setting any ``tls_*``
            connects with TLS (system roots when ``tls_ca`` is unset).
        tls_cert, tls_key: PEM client certificate chain and private key, for mTLS.
    """

    target: str = ""
    reward: str = ""
    output: str = "score"
    weight: float = 1.0
    threshold: float | None = None
    timeout_s: float = 120.0
    name: str = ""
    metadata: bool = False
    token_env: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.reward}/{self.output}"

    def validate(self, where: str) -> None:
        _check(bool(self.target), f"{where}.target", "is required (e.g. 'localhost:50051')")
        _check(bool(self.reward), f"{where}.reward", "is required (the reward's server name)")
        _check(bool(self.output), f"{where}.output", "is required (e.g. 'score')")
        _check(self.weight > 0, f"{where}.weight", "must be > 0 (drop the entry to disable it)")
        _check(self.timeout_s > 0, f"{where}.timeout_s", "must be > 0")
        if self.token_env is not None:
            _check(
                bool(re.fullmatch(r"[A-Za-z_]\w*", self.token_env)),
                f"{where}.token_env",
                f"must name an environment variable, got {self.token_env!r}",
            )
            _check(
                bool(os.environ.get(self.token_env)),
                f"{where}.token_env",
                f"environment variable {self.token_env} (the bearer token) is not set or empty",
            )
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path is not None:
                _check(Path(path).is_file(), f"{where}.{key}", f"file not found: {path}")
        _check(
            (self.tls_cert is None) == (self.tls_key is None),
            f"{where}.tls_cert",
            "tls_cert and tls_key go together (mTLS needs both)",
        )

    @property
    def security(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``(token_env, tls_ca, tls_cert, tls_key)``: how a client connects to ``target``."""
        return self.token_env, self.tls_ca, self.tls_cert, self.tls_key


@dataclasses.dataclass
class BestOfNConfig:
    """Best-of-N training: roll out ``group_size`` (= N) samples, train on the ``top_k``
    best and ``bottom_k`` worst of each group. Disabled when both are 0."""

    top_k: int = 0
    bottom_k: int = 0

    @property
    def enabled(self) -> bool:
        return self.top_k > 0 or self.bottom_k > 0


@dataclasses.dataclass
class RewardsConfig:
    """The reward terms and how they become advantages.

    Attributes:
        endpoints: the reward terms (at least one).
        advantage: ``group`` (normalise within each prompt group, DanceGRPO) or
            ``per_prompt`` (running per-prompt statistics across steps).
        best_of_n: optional top-k/bottom-k selection within each group.
        tracker_buffer_size, tracker_min_count: ``per_prompt`` tracker settings.
        outage_budget_s: how long a reward call may keep failing with ``UNAVAILABLE``,
            ``RESOURCE_EXHAUSTED`` or ``DEADLINE_EXCEEDED`` (a replica restarting or
            rescheduled) while it is resent with backoff, before the run stops with an
            error; ``0`` stops at the first such failure.
    """

    endpoints: list[RewardEndpoint] = dataclasses.field(default_factory=list)
    advantage: AdvantageMode = "group"
    best_of_n: BestOfNConfig = dataclasses.field(default_factory=BestOfNConfig)
    tracker_buffer_size: int = 32
    tracker_min_count: int = 16
    outage_budget_s: float = 300.0

    def validate(self) -> None:
        _check(len(self.endpoints) >= 1, "rewards.endpoints", "needs at least one endpoint")
        for i, ep in enumerate(self.endpoints):
            ep.validate(f"rewards.endpoints[{i}]")
        labels = [ep.label for ep in self.endpoints]
        _check(
            len(set(labels)) == len(labels),
            "rewards.endpoints",
            f"labels must be unique, got {labels}: set a distinct `name` on duplicates",
        )
        _check(
            self.advantage in ("group", "per_prompt"),
            "rewards.advantage",
            "must be 'group' or 'per_prompt'",
        )
        _check(self.best_of_n.top_k >= 0, "rewards.best_of_n.top_k", "must be >= 0")
        _check(self.best_of_n.bottom_k >= 0, "rewards.best_of_n.bottom_k", "must be >= 0")
        _check(self.tracker_buffer_size >= 1, "rewards.tracker_buffer_size", "must be >= 1")
        _check(self.tracker_min_count >= 1, "rewards.tracker_min_count", "must be >= 1")
        _check(
            0 <= self.outage_budget_s < float("inf"),  # NaN fails too
            "rewards.outage_budget_s",
            f"must be a finite number of seconds >= 0 (0 = stop at the first outage), "
            f"got {self.outage_budget_s}",
        )
