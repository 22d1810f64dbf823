"""Remote scoring: sends decoded frames to the reward services and collects named outputs.

The trainer talks to rewards only through ``dancegrpo_proto.RewardClient`` over gRPC.
Each configured endpoint is one ``(target, reward, output)`` term; terms that share a
``(target, reward)`` are scored with one call. Calls are asynchronous so scoring overlaps
with the next rollout chunk. A failure (after the client's own retries) raises
:class:`RewardScoringError` naming the endpoint; a missing output or a non-finite value is
an error too. There is no fallback reward: a silent 0 or −1 would train on garbage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dancegrpo_trainer.config import RewardEndpoint, expand_env


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


def _default_client_factory(target: str) -> Any:
    from dancegrpo_proto import RewardClient

    targets = [t.strip() for t in target.split(",")] if "," in target else target
    return RewardClient(targets)


class RewardScorer:
    """Scores frames with the configured reward endpoints.

    Args:
        endpoints: the reward terms (from ``rewards.endpoints``).
        client_factory: builds a client for a target (tests may inject another
            implementation of the ``RewardClient`` interface).
    """

    def __init__(
        self,
        endpoints: Sequence[RewardEndpoint],
        client_factory: Callable[[str], Any] = _default_client_factory,
    ) -> None:
        self.endpoints = list(endpoints)
        self._targets = {
            ep.label: expand_env(ep.target, f"rewards.endpoints[{i}].target")
            for i, ep in enumerate(self.endpoints)
        }
        self._clients: dict[str, Any] = {}
        for target in dict.fromkeys(self._targets.values()):
            self._clients[target] = client_factory(target)
        # One call per (target, reward); each endpoint reads one output of it.
        self._calls: dict[tuple[str, str], list[RewardEndpoint]] = {}
        for ep in self.endpoints:
            self._calls.setdefault((self._targets[ep.label], ep.reward), []).append(ep)

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
    ) -> PendingScores:
        """Starts scoring ``frames`` (``uint8 [N,H,W,3]`` images or ``[N,T,H,W,3]`` videos)."""
        media = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if media.dtype != np.uint8 or media.ndim not in (4, 5) or media.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N,H,W,3] or [N,T,H,W,3], got {media.shape}")
        if len(prompts) != media.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {media.shape[0]} samples")
        kwargs: dict[str, Any] = {"prompts": list(prompts)}
        kwargs["images" if media.ndim == 4 else "videos"] = media
        if condition_images is not None:
            cond = condition_images
            kwargs["condition_images"] = (
                cond.cpu().numpy() if isinstance(cond, torch.Tensor) else cond
            )
        futures = {}
        for (target, reward), eps in self._calls.items():
            timeout = max(ep.timeout_s for ep in eps)
            try:
                futures[(target, reward)] = self._clients[target].score_async(
                    reward, timeout=timeout, **kwargs
                )
            except Exception as e:
                raise RewardScoringError(_describe(target, reward, e)) from e
        return PendingScores(self, futures, media.shape[0])

    def close(self) -> None:
        for client in self._clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()


class PendingScores:
    """The in-flight calls for one batch; :meth:`result` waits and validates."""

    def __init__(
        self,
        scorer: RewardScorer,
        futures: dict[tuple[str, str], concurrent.futures.Future],
        num_samples: int,
    ) -> None:
        self._scorer = scorer
        self._futures = futures
        self._n = num_samples

    def result(self) -> Scores:
        terms: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] = {}
        for (target, reward), future in self._futures.items():
            try:
                response = future.result()
            except Exception as e:
                raise RewardScoringError(_describe(target, reward, e)) from e
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


def _describe(target: str, reward: str, error: BaseException) -> str:
    return f"scoring with reward {reward!r} at {target} failed: {type(error).__name__}: {error}"
