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
training resumes where it stopped with the results of an uninterrupted run. Any other
failure, or an outage past the budget, raises :class:`RewardScoringError` naming the
endpoint; a missing output or a non-finite value is an error too. There is no fallback
reward: a silent 0 or −1 would train on garbage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
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
            0/1 for binary endpoints).
        outputs: ``reward/output`` → float32 ``(N,)`` for every output the services
            returned (logged, whether or not it trains).
    """

    terms: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        return Scores(
            terms={k: np.concatenate([p.terms[k] for p in parts]) for k in parts[0].terms},
            outputs={k: np.concatenate([p.outputs[k] for p in parts]) for k in parts[0].outputs},
        )


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
        outage_budget_s: how long a call may keep failing with an outage code before
            scoring gives up (``rewards.outage_budget_s``; 0 = at the first failure).
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
    ) -> PendingScores:
        """Starts scoring ``frames`` (``uint8 [N,H,W,3]`` images or ``[N,T,H,W,3]`` videos).

        ``metadata``: one ``{"geneval": {...}}`` (or ``None``) per sample, in the order of
        ``frames``; sent only to the calls whose endpoints set ``metadata: true``, which
        fail here when it is missing.
        """
        media = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if media.dtype != np.uint8 or media.ndim not in (4, 5) or media.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N,H,W,3] or [N,T,H,W,3], got {media.shape}")
        if len(prompts) != media.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {media.shape[0]} samples")
        if metadata is not None and len(metadata) != media.shape[0]:
            raise ValueError(f"{len(metadata)} metadata entries for {media.shape[0]} samples")
        kwargs: dict[str, Any] = {"prompts": list(prompts)}
        kwargs["images" if media.ndim == 4 else "videos"] = media
        if condition_images is not None:
            cond = condition_images
            kwargs["condition_images"] = (
                cond.cpu().numpy() if isinstance(cond, torch.Tensor) else cond
            )
        calls = {}
        for (target, reward), eps in self._calls.items():
            call_kwargs = {
                "timeout": max(ep.timeout_s for ep in eps),
                **kwargs,
                **self._metadata_kwargs((target, reward), metadata),
            }
            calls[(target, reward)] = _Call(self._clients[target], reward, call_kwargs)
        for (target, reward), call in calls.items():
            try:
                call.send()
            except Exception as e:
                raise RewardScoringError(_describe(target, reward, e)) from e
        return PendingScores(self, calls, media.shape[0])

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


@dataclasses.dataclass
class _Call:
    """One ``score`` call of a batch, kept so that it can be sent again after an outage."""

    client: Any
    reward: str
    kwargs: dict[str, Any]
    future: concurrent.futures.Future | None = None

    def send(self) -> None:
        self.future = self.client.score_async(self.reward, **self.kwargs)


class PendingScores:
    """The in-flight calls for one batch; :meth:`result` waits (riding out outages) and
    validates."""

    def __init__(
        self,
        scorer: RewardScorer,
        calls: dict[tuple[str, str], _Call],
        num_samples: int,
    ) -> None:
        self._scorer = scorer
        self._calls = calls
        self._n = num_samples

    def result(self) -> Scores:
        terms: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] = {}
        for (target, reward), call in self._calls.items():
            response = _await_riding_out_outages(target, call, self._scorer.outage_budget_s)
            for name, values in response.items():
                arr = np.asarray(values, dtype=np.float32).reshape(-1)
                if arr.shape[0] != self._n:
                    raise RewardScoringError(
                        f"reward {reward!r} at {target} returned {arr.shape[0]} values for "
                        f"output {name!r}, expected {self._n}"
                    )
                if not np.isfinite(arr).all():
                    raise RewardScoringError(
                        f"reward {reward!r} at {target} returned non-finite values for "
                        f"output {name!r}"
                    )
                outputs[f"{reward}/{name}"] = arr
            for ep in self._scorer._calls[(target, reward)]:
                if ep.output not in response:
                    raise RewardScoringError(
                        f"reward {reward!r} at {target} has no output {ep.output!r} "
                        f"(it returned {sorted(response)}); fix rewards.endpoints output"
                    )
                value = outputs[f"{reward}/{ep.output}"]
                if ep.threshold is not None:
                    value = (value >= ep.threshold).astype(np.float32)
                terms[ep.label] = value
        return Scores(terms=terms, outputs=outputs)


def _await_riding_out_outages(target: str, call: _Call, budget_s: float) -> dict[str, Any]:
    """``call``'s response; resends it while it fails with an outage code, until it has been
    failing for ``budget_s``. Raises ``RewardScoringError`` otherwise."""
    reward = call.reward
    failing_since: float | None = None
    next_log = 0.0
    resends = 0
    while True:
        assert call.future is not None
        try:
            response = call.future.result()
        except Exception as e:
            code = getattr(getattr(e, "code", None), "name", None)
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            down_s = now - failing_since
            if code not in OUTAGE_CODES:
                raise RewardScoringError(_describe(target, reward, e)) from e
            if down_s >= budget_s:
                raise RewardScoringError(
                    f"{_describe(target, reward, e)}; still failing after {down_s:.0f} s "
                    f"(rewards.outage_budget_s = {budget_s:g}; raise it to ride out longer "
                    "outages)"
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
            try:
                call.send()
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
