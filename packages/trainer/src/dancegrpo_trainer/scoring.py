"""Remote scoring: sends decoded frames to the reward services and collects named outputs.

The trainer talks to rewards only through ``dancegrpo_proto.RewardClient`` over gRPC.
Each configured endpoint is one ``(target, reward, output)`` term; terms that share a
``(target, reward)`` are scored with one call, which carries the samples' metadata (e.g.
GenEval specs) when any of its endpoints sets ``metadata: true``. Calls are asynchronous
so scoring overlaps with the next rollout chunk.

Outages: a call that fails with ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED`` or
``DEADLINE_EXCEEDED`` after the client's own retries (a replica restarting, rescheduled or
overloaded) is sent again with capped exponential backoff, logging the wait (at most every
``OUTAGE_LOG_EVERY_S``), until it has been failing for ``outage_budget_s``
(``rewards.outage_budget_s``). Only the failed calls are resent, with the same samples, so
training resumes where it stopped with the results of an uninterrupted run. The one
``ListRewards`` per target (below) rides out an outage under the same budget. Any other
failure, or an outage past the budget, raises :class:`RewardScoringError` naming the
endpoint; a missing output or a non-finite value is an error too. There is no fallback
reward: a silent 0 or −1 would train on garbage.

Routing (``data.sources``): ``submit(..., routes=...)`` gives each sample the terms that
score it; a call receives only the samples routed to one of its terms (none: no call),
and the other samples' values of its terms are NaN with weight 0 in :class:`Scores`.

Group-wise rewards (``RewardInfo.scoring_scope`` = group, read once per target with
``ListRewards``) get each call's samples with ``group_sizes`` from ``groups=`` (the
sample's prompt-group index), so every group reaches the service whole, in one request.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_trainer.config import ConfigError, RewardEndpoint, expand_env

log = logging.getLogger("dancegrpo_trainer.scoring")

#: gRPC codes that mean "the service is down or overloaded": the codes ``RewardClient``
#: retries, and the ones the outage budget rides out.
OUTAGE_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
#: Waits between resends of a call during an outage: none before the first (the client
#: has already retried for ~1.5 s), then 0.5 s doubling to at most 10 s, so a replica that
#: comes back is used again within ~10 s plus the client's own retries.
OUTAGE_INITIAL_WAIT_S = 0.5
OUTAGE_MAX_WAIT_S = 10.0
#: Seconds between two log lines about the same ongoing outage.
OUTAGE_LOG_EVERY_S = 30.0


class RewardScoringError(RuntimeError):
    """Scoring failed; the message names the endpoint (target and reward)."""


@dataclasses.dataclass
class Scores:
    """Scores of one batch.

    Attributes:
        terms: endpoint label → float32 ``(N,)``: the value that trains (thresholded to
            0/1 for binary endpoints); NaN for samples not routed to the term.
        outputs: ``reward/output`` → float32 ``(N,)`` for every output the services
            returned (logged, whether or not it trains); NaN where not scored.
        weights: label → float32 ``(N,)``, each sample's weight of the term (0 where not
            routed); ``None`` when the batch was not routed (every term at its endpoint
            weight for every sample).
    """

    terms: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    weights: dict[str, np.ndarray] | None = None

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """The parts in order; a column one part lacks (a reward no sample of it was routed
        to) is NaN there."""

        def join(columns: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
            keys = list(dict.fromkeys(k for c in columns for k in c))
            sizes = [len(next(iter(p.terms.values()))) for p in parts]
            return {
                k: np.concatenate(
                    [
                        c.get(k, np.full(n, np.nan, np.float32))
                        for c, n in zip(columns, sizes, strict=True)
                    ]
                )
                for k in keys
            }

        weights = None
        if parts[0].weights is not None:
            weights = join([p.weights for p in parts])  # type: ignore[misc]
        return Scores(
            terms=join([p.terms for p in parts]),
            outputs=join([p.outputs for p in parts]),
            weights=weights,
        )


def group_run_lengths(groups: Sequence[int]) -> list[int]:
    """Sizes of the consecutive runs of equal group ids, e.g. ``[0,0,1,1,1] → [2, 3]``."""
    sizes: list[int] = []
    for i, g in enumerate(groups):
        if i and g == groups[i - 1]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def make_reward_client(target: str, endpoint: RewardEndpoint | None = None) -> Any:
    """The ``RewardClient`` the trainer and ``dancegrpo-eval`` use for ``target``.

    ``target`` (already ``${ENV}``-expanded) may be a comma-separated list of replicas (one
    channel each). ``endpoint`` adds its bearer token (``token_env``) and TLS files.
    """
    from dancegrpo_proto import RewardClient

    targets = [t.strip() for t in target.split(",")] if "," in target else target
    kwargs: dict[str, Any] = {}
    if endpoint is not None:
        if endpoint.token_env is not None:
            token = os.environ.get(endpoint.token_env)
            if not token:
                raise ConfigError(
                    f"token_env: environment variable {endpoint.token_env} (the bearer token "
                    f"for {target}) is not set or empty"
                )
            kwargs["token"] = token
        for key, param in (
            ("tls_ca", "root_certificates"),
            ("tls_cert", "certificate_chain"),
            ("tls_key", "private_key"),
        ):
            path = getattr(endpoint, key)
            if path is not None:
                kwargs[param] = Path(path).read_bytes()
    return RewardClient(targets, **kwargs)


class RewardScorer:
    """Scores frames with the configured reward endpoints.

    Args:
        endpoints: the reward terms (from ``rewards.endpoints``).
        client_factory: ``(target, endpoint) -> client`` (default ``make_reward_client``;
            tests may inject another implementation of the ``RewardClient`` interface).
            Endpoints sharing a target must share its ``token_env``/``tls_*`` settings.
        outage_budget_s: how long a call (``Score``, or the first use's ``ListRewards``) may
            keep failing with an outage code before scoring gives up
            (``rewards.outage_budget_s``; 0 = at the first failure).
    """

    def __init__(
        self,
        endpoints: Sequence[RewardEndpoint],
        client_factory: Callable[[str, RewardEndpoint], Any] = make_reward_client,
        *,
        outage_budget_s: float = 300.0,
    ) -> None:
        if outage_budget_s < 0:
            raise ValueError(f"outage_budget_s must be >= 0, got {outage_budget_s}")
        self.outage_budget_s = outage_budget_s
        self.endpoints = list(endpoints)
        self._targets = {
            ep.label: expand_env(ep.target, f"rewards.endpoints[{i}].target")
            for i, ep in enumerate(self.endpoints)
        }
        first: dict[str, tuple[int, RewardEndpoint]] = {}
        for i, ep in enumerate(self.endpoints):
            j, other = first.setdefault(self._targets[ep.label], (i, ep))
            if ep.security != other.security:
                raise ConfigError(
                    f"rewards.endpoints[{i}]: token_env/tls_* differ from rewards.endpoints"
                    f"[{j}] with the same target; one target has one connection"
                )
        self._clients: dict[str, Any] = {}
        for target, (_, ep) in first.items():
            self._clients[target] = client_factory(target, ep)
        # One call per (target, reward); each endpoint reads one output of it.
        self._calls: dict[tuple[str, str], list[RewardEndpoint]] = {}
        for ep in self.endpoints:
            self._calls.setdefault((self._targets[ep.label], ep.reward), []).append(ep)
        # The calls that send metadata (any of their endpoints asks), with the first
        # endpoint asking, for error messages.
        self._metadata_calls: dict[tuple[str, str], int] = {}
        for i, ep in enumerate(self.endpoints):
            if ep.metadata:
                self._metadata_calls.setdefault((self._targets[ep.label], ep.reward), i)
        self._group_wise: frozenset[tuple[str, str]] | None = None  # read on first use
        # Each call's output names (ListRewards), so routed batches that skip a call still
        # carry its columns (NaN): every chunk and rank then logs the same keys.
        self._output_names: dict[tuple[str, str], list[str]] = {
            call: list(dict.fromkeys(ep.output for ep in eps)) for call, eps in self._calls.items()
        }

    @property
    def group_wise_calls(self) -> frozenset[tuple[str, str]]:
        """The ``(target, reward)`` calls whose reward is group-wise, from each target's
        ``ListRewards`` (asked once). A reward the target does not host fails here, naming
        the endpoint. Clients without ``list_rewards`` (test doubles) count as per-sample."""
        if self._group_wise is None:
            from dancegrpo_proto.v1 import rewards_pb2 as pb

            found = set()
            for target, client in self._clients.items():
                list_rewards = getattr(client, "list_rewards", None)
                if list_rewards is None:
                    continue
                calls = [(r, eps) for (tg, r), eps in self._calls.items() if tg == target]
                timeout = max(ep.timeout_s for _, eps in calls for ep in eps)
                replies = _ride_out_outages(
                    target,
                    calls[0][0],
                    functools.partial(list_rewards, timeout=timeout),
                    self.outage_budget_s,
                    during="reading ListRewards, to learn whether the reward is group-wise",
                )
                infos = {info.name: info for info in replies}
                for (call_target, reward), eps in self._calls.items():
                    if call_target != target:
                        continue
                    if reward not in infos:
                        i = self.endpoints.index(eps[0])
                        raise RewardScoringError(
                            f"rewards.endpoints[{i}].reward: {reward!r} is not hosted at "
                            f"{target} (it hosts {sorted(infos)})"
                        )
                    if getattr(infos[reward], "scoring_scope", 0) == pb.SCORING_SCOPE_GROUP:
                        found.add((target, reward))
                    names = list(getattr(infos[reward], "output_names", []))
                    self._output_names[(target, reward)] = list(
                        dict.fromkeys([*names, *self._output_names[(target, reward)]])
                    )
            self._group_wise = frozenset(found)
        return self._group_wise

    def output_names(self) -> dict[tuple[str, str], list[str]]:
        """Each call's output names (its services' ``ListRewards``, else its endpoints')."""
        self.group_wise_calls  # noqa: B018 - reads ListRewards once
        return self._output_names

    @property
    def needs_whole_groups(self) -> bool:
        """Whether some call is group-wise: batches must then be submitted in whole groups."""
        return bool(self.group_wise_calls)

    def group_wise_labels(self) -> set[str]:
        """Labels of the terms whose reward is group-wise."""
        calls = self.group_wise_calls
        return {ep.label for key, eps in self._calls.items() if key in calls for ep in eps}

    def wait_until_ready(self, timeout: float) -> None:
        """Blocks until every target reports SERVING (raises naming the target otherwise)."""
        for target, client in self._clients.items():
            try:
                client.wait_until_ready(timeout)
            except Exception as e:
                raise RewardScoringError(
                    f"reward service at {target} is not ready after {timeout:.0f} s: {e}"
                ) from e

    def submit(
        self,
        frames: torch.Tensor | np.ndarray,
        prompts: Sequence[str],
        condition_images: torch.Tensor | np.ndarray | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        routes: Sequence[Mapping[str, float]] | None = None,
        groups: Sequence[int] | None = None,
    ) -> PendingScores:
        """Starts scoring ``frames`` (``uint8 [N,H,W,3]`` images or ``[N,T,H,W,3]`` videos).

        ``metadata``: one ``{"geneval": {...}}`` (or ``None``) per sample, in the order of
        ``frames``; sent only to the calls whose endpoints set ``metadata: true``, which
        fail here when it is missing.
        ``routes``: per sample, ``label → weight`` of the terms that score it (``None``:
        every term, at its endpoint weight); a call gets only its routed samples.
        ``groups``: per sample, its prompt group's index (consecutive samples of a group
        share it); required when a call is group-wise, whose requests then carry the
        groups' sizes (so whole groups only: submit whole groups).
        """
        media = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        n = media.shape[0]
        if media.dtype != np.uint8 or media.ndim not in (4, 5) or media.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N,H,W,3] or [N,T,H,W,3], got {media.shape}")
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} samples")
        for name, column in (("metadata", metadata), ("routes", routes), ("groups", groups)):
            if column is not None and len(column) != n:
                raise ValueError(f"{len(column)} {name} entries for {n} samples")
        cond = condition_images
        if isinstance(cond, torch.Tensor):
            cond = cond.cpu().numpy()
        calls: dict[tuple[str, str], tuple[list[int] | None, _Call]] = {}
        for (target, reward), eps in self._calls.items():
            labels = {ep.label for ep in eps}
            if routes is None:
                rows = None
            else:
                rows = [i for i in range(n) if labels.intersection(routes[i])]
                if not rows:
                    continue  # no sample of this batch is scored by this reward
                if len(rows) == n:
                    rows = None
            kwargs = self._call_kwargs(
                (target, reward), rows, media, prompts, cond, metadata, groups
            )
            kwargs["timeout"] = max(ep.timeout_s for ep in eps)
            calls[(target, reward)] = (rows, _Call(self._clients[target], reward, kwargs))
        for (target, reward), (_, call) in calls.items():
            try:
                call.send()
            except Exception as e:
                raise RewardScoringError(_describe(target, reward, e)) from e
        return PendingScores(self, calls, n, routes)

    def _call_kwargs(
        self,
        call: tuple[str, str],
        rows: list[int] | None,
        media: np.ndarray,
        prompts: Sequence[str],
        cond: np.ndarray | Sequence[Any] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        groups: Sequence[int] | None,
    ) -> dict[str, Any]:
        """The client arguments of one call: its samples (``rows``; ``None``: all)."""

        def pick(column: Any) -> Any:
            if column is None or rows is None:
                return column
            if isinstance(column, np.ndarray):
                return column[rows]
            return [column[i] for i in rows]

        kwargs: dict[str, Any] = {"prompts": list(pick(list(prompts)))}
        kwargs["images" if media.ndim == 4 else "videos"] = pick(media)
        if cond is not None:
            kwargs["condition_images"] = pick(cond)
        meta = self._metadata_kwargs(call, pick(metadata))
        kwargs.update(meta)
        if call in self.group_wise_calls:
            if groups is None:
                i = self.endpoints.index(self._calls[call][0])
                raise ValueError(
                    f"rewards.endpoints[{i}]: reward {call[1]!r} is group-wise, so samples "
                    "must be submitted with their prompt groups (groups=)"
                )
            kwargs["group_sizes"] = group_run_lengths(pick(list(groups)))
        return kwargs

    def _metadata_kwargs(
        self, call: tuple[str, str], metadata: Sequence[Mapping[str, Any] | None] | None
    ) -> dict[str, Any]:
        """``{"metadata": [...]}`` for a call that sends metadata, else ``{}``."""
        if call not in self._metadata_calls:
            return {}
        if metadata is None:
            i = self._metadata_calls[call]
            raise ValueError(
                f"rewards.endpoints[{i}].metadata is true, but these samples carry no "
                "metadata (prompts from a .jsonl file of GenEval rows do)"
            )
        return {"metadata": list(metadata)}

    def close(self) -> None:
        for client in self._clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()


class PendingScores:
    """The in-flight calls for one batch; :meth:`result` waits (riding out outages) and
    validates."""

    def __init__(
        self,
        scorer: RewardScorer,
        calls: dict[tuple[str, str], tuple[list[int] | None, _Call]],
        num_samples: int,
        routes: Sequence[Mapping[str, float]] | None = None,
    ) -> None:
        self._scorer = scorer
        self._calls = calls
        self._n = num_samples
        self._routes = routes

    def result(self) -> Scores:
        terms: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] = {}
        for (target, reward), (rows, call) in self._calls.items():
            response = call.result_riding_out_outages(target, self._scorer.outage_budget_s)
            expected = self._n if rows is None else len(rows)
            values: dict[str, np.ndarray] = {}
            for name, column in response.items():
                arr = np.asarray(column, dtype=np.float32).reshape(-1)
                if arr.shape[0] != expected:
                    raise RewardScoringError(
                        f"reward {reward!r} at {target} returned {arr.shape[0]} values for "
                        f"output {name!r}, expected {expected}"
                    )
                if not np.isfinite(arr).all():
                    raise RewardScoringError(
                        f"reward {reward!r} at {target} returned non-finite values for "
                        f"output {name!r}"
                    )
                values[name] = arr
                outputs[f"{reward}/{name}"] = self._spread(arr, rows)
            for ep in self._scorer._calls[(target, reward)]:
                if ep.output not in response:
                    raise RewardScoringError(
                        f"reward {reward!r} at {target} has no output {ep.output!r} "
                        f"(it returned {sorted(response)}); fix rewards.endpoints output"
                    )
                value = values[ep.output]
                if ep.threshold is not None:
                    value = (value >= ep.threshold).astype(np.float32)
                terms[ep.label] = self._spread(value, rows)
        if self._routes is None:
            return Scores(terms=terms, outputs=outputs)
        # Terms and outputs of calls no sample was routed to are all NaN, weight 0.
        nan = np.full(self._n, np.nan, np.float32)
        for ep in self._scorer.endpoints:
            terms.setdefault(ep.label, nan)
        for (_, reward), names in self._scorer.output_names().items():
            for name in names:
                outputs.setdefault(f"{reward}/{name}", nan)
        weights = {
            label: np.asarray([route.get(label, 0.0) for route in self._routes], np.float32)
            for label in terms
        }
        for label, column in terms.items():  # a routed sample always has its term
            assert not np.isnan(column[weights[label] > 0]).any(), label
        return Scores(terms=terms, outputs=outputs, weights=weights)

    def _spread(self, values: np.ndarray, rows: list[int] | None) -> np.ndarray:
        """A call's values in the batch's rows (NaN where the call had no sample)."""
        if rows is None:
            return values
        full = np.full(self._n, np.nan, np.float32)
        full[rows] = values
        return full


@dataclasses.dataclass
class _Call:
    """One ``score`` call of a batch, kept so that it can be sent again after an outage."""

    client: Any
    reward: str
    kwargs: dict[str, Any]
    future: concurrent.futures.Future | None = None

    def send(self) -> None:
        self.future = self.client.score_async(self.reward, **self.kwargs)

    def result_riding_out_outages(self, target: str, budget_s: float) -> dict[str, Any]:
        """The call's response, resending it while it fails with an outage code."""

        def result() -> dict[str, Any]:
            assert self.future is not None
            return self.future.result()

        return _ride_out_outages(target, self.reward, result, budget_s, resend=self.send)


def _ride_out_outages(
    target: str,
    reward: str,
    attempt: Callable[[], Any],
    budget_s: float,
    *,
    resend: Callable[[], None] | None = None,
    during: str = "",
) -> Any:
    """``attempt()``'s result; while it fails with an outage code, calls ``resend`` (if
    any: ``attempt`` then reads the resent call) and tries again, with capped exponential
    waits, until it has been failing for ``budget_s``. Raises ``RewardScoringError``
    otherwise (``during`` says what the call was for)."""
    suffix = f" ({during})" if during else ""
    failing_since: float | None = None
    next_log = 0.0
    resends = 0
    while True:
        try:
            response = attempt()
        except Exception as e:
            code = getattr(getattr(e, "code", None), "name", None)
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            down_s = now - failing_since
            if code not in OUTAGE_CODES:
                raise RewardScoringError(_describe(target, reward, e) + suffix) from e
            if down_s >= budget_s:
                raise RewardScoringError(
                    f"{_describe(target, reward, e)}{suffix}; still failing after "
                    f"{down_s:.0f} s (rewards.outage_budget_s = {budget_s:g}; raise it to "
                    "ride out longer outages)"
                ) from e
            if now >= next_log:
                log.warning(
                    "reward %r at %s: %s for %.0f s; resending (outage budget %g s, %.0f s left)",
                    reward,
                    target,
                    code,
                    down_s,
                    budget_s,
                    budget_s - down_s,
                )
                next_log = now + OUTAGE_LOG_EVERY_S
            if resends:
                wait = min(OUTAGE_INITIAL_WAIT_S * 2 ** (resends - 1), OUTAGE_MAX_WAIT_S)
                time.sleep(min(wait, budget_s - down_s))
            resends += 1
            if resend is not None:
                try:
                    resend()
                except Exception as send_error:
                    raise RewardScoringError(_describe(target, reward, send_error)) from send_error
            continue
        if failing_since is not None:
            log.warning(
                "reward %r at %s: scoring again after %.0f s of outage",
                reward,
                target,
                time.monotonic() - failing_since,
            )
        return response


def _describe(target: str, reward: str, error: BaseException) -> str:
    message = f"scoring with reward {reward!r} at {target} failed: {type(error).__name__}: {error}"
    if getattr(getattr(error, "code", None), "name", None) == "UNAUTHENTICATED":
        message += (
            " (the server needs a bearer token: set the endpoint's token_env to the name of "
            "the environment variable holding it)"
        )
    return message


class ChunkSubmitter:
    """``on_chunk`` of a training rollout: sends each finished chunk to the reward services
    and keeps ``chunks`` (``(rows, pending scores)``, in order).

    When a reward is group-wise (``scorer.needs_whole_groups``), a chunk that ends inside a
    prompt group waits for the rest of its group: every submission is whole groups, so
    every group reaches its service in one request. Otherwise chunks go out as they finish.

    Args:
        scorer: the reward scorer.
        group_size: samples per prompt group (rows ``[kG, (k+1)G)`` are group ``k``).
        prompts, condition_images, metadata, routes: per-row columns of the rollout
            (``None``: absent; ``routes`` as in :meth:`RewardScorer.submit`).
    """

    def __init__(
        self,
        scorer: RewardScorer,
        group_size: int,
        prompts: Sequence[str],
        *,
        condition_images: torch.Tensor | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        routes: Sequence[Mapping[str, float]] | None = None,
    ) -> None:
        self.scorer = scorer
        self.group_size = group_size
        self.prompts = list(prompts)
        self.condition_images = condition_images
        self.metadata = metadata
        self.routes = routes
        # Duck-typed scorers (test doubles) without group-wise support score per sample.
        self.whole_groups = bool(getattr(scorer, "needs_whole_groups", False))
        self.chunks: list[tuple[slice, PendingScores]] = []
        self._held: list[tuple[slice, torch.Tensor]] = []

    def __call__(self, rows: slice, frames: torch.Tensor) -> None:
        self._held.append((rows, frames))
        if self.whole_groups and rows.stop % self.group_size:
            return  # the chunk ends inside a group: wait for the group's last sample
        rows = slice(self._held[0][0].start, rows.stop)
        if len(self._held) > 1:
            frames = torch.cat([f for _, f in self._held])
        self._held.clear()
        images = self.condition_images[rows] if self.condition_images is not None else None
        meta = self.metadata[rows] if self.metadata is not None else None
        extra: dict[str, Any] = {}
        if self.routes is not None:
            extra["routes"] = self.routes[rows]
        if self.whole_groups:
            extra["groups"] = [i // self.group_size for i in range(rows.start, rows.stop)]
        pending = self.scorer.submit(frames, self.prompts[rows], images, meta, **extra)
        self.chunks.append((rows, pending))
