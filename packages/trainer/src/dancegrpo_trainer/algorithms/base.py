"""The interface a training algorithm implements (``train.algorithm``).

An algorithm declares

- which steps of a rollout are stochastic and recorded (:attr:`RolloutSpec.stochastic`:
  ``"window"`` follows ``sampling.window`` — every step for ``full``; ``"none"`` samples
  deterministic ODE rollouts, e.g. DiffusionNFT),
- what the rollout keeps besides its latents (:attr:`RolloutSpec.keep`: ``log_probs``,
  ``means``, ``stds``, ``noise``) and, for ODE rollouts, which solver takes their steps
  (:attr:`RolloutSpec.ode_solver`),
- which weights sample the train rollouts (:meth:`Algorithm.rollout_weights`; DiffusionNFT
  samples with its "old" policy),
- the loss on a stored trajectory: :meth:`Algorithm.terms` picks what one micro-batch
  trains (GRPO: step indices; a forward-process method: noise-level draws) and
  :meth:`Algorithm.loss` returns the loss of one term, which the update backpropagates at
  once (scaled to a mean over samples and terms) and logs.

Terms and sub-networks (a constraint on every algorithm): a policy may route steps to
different sub-networks, and then lists each one's steps in
:meth:`~dancegrpo_trainer.policies.base.Policy.step_groups` (Wan2.2 A14B: the high-noise and
the low-noise expert, split at ``boundary_ratio``; ``None`` for every other adapter). Under
``train.fsdp`` every forward of a sharded sub-network is a collective, so every rank must run
the same sequence of sub-networks, micro-batch after micro-batch:

- one term runs one group: all rows of a micro-batch at steps of the same group. An
  algorithm that gives rows their own step indices (an int64 ``[B]`` ``step_index``, e.g.
  per-row noise levels) must draw them within one group per term: rows on both sides of
  Wan's boundary make ``WanPolicy.predict`` run both experts, while a rank whose rows all
  fall on one side runs one, and the ranks' collectives no longer match (both experts'
  blocks have the same shapes, so the mismatch may hang or silently mix weights rather than
  fail);
- every micro-batch visits the groups in the same order with the same number of terms each
  (GRPO: ``timestep_fraction`` of each group, group after group, see ``GRPO.terms``);
- steps outside the groups (a frozen expert's) are never terms: they carry no gradient.

Single-group policies (``step_groups`` is ``None``) have no such constraint.

State that must survive a resume (e.g. an EMA "old" policy) goes through
:meth:`Algorithm.state_dict` / :meth:`Algorithm.load_state_dict` (tensors, saved with the
checkpoint) and is advanced in :meth:`Algorithm.after_optimizer_step`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from dancegrpo_trainer.config import ConfigError
from dancegrpo_trainer.policies.base import Policy
from dancegrpo_trainer.rollout import ROLLOUT_KEEP, Rollout

Stochastic = Literal["window", "none"]
OdeSolver = Literal["euler", "dpm2"]


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """What an algorithm needs from a rollout.

    Attributes:
        stochastic: ``"window"``: the SDE steps ``sampling.window`` selects (all of them for
            the default ``full`` window), sampled with ``sampling.sampler`` at
            ``sampling.eta`` and recorded; ``"none"``: a deterministic ODE rollout.
        keep: per-step tensors to store besides the latents (see ``ROLLOUT_KEEP``).
        ode_solver: the steps of an ODE rollout (``stochastic="none"``): ``"euler"``, the
            sampler's deterministic step, or ``"dpm2"``, DPM-Solver++ (2M) on every step
            (first order at the first and the last step).
    """

    stochastic: Stochastic = "window"
    keep: tuple[str, ...] = ("log_probs",)
    ode_solver: OdeSolver = "euler"

    def __post_init__(self) -> None:
        if self.stochastic not in ("window", "none"):
            raise ValueError(f"stochastic must be 'window' or 'none', got {self.stochastic!r}")
        if self.ode_solver not in ("euler", "dpm2"):
            raise ValueError(f"ode_solver must be 'euler' or 'dpm2', got {self.ode_solver!r}")
        if self.ode_solver != "euler" and self.stochastic != "none":
            raise ValueError("ode_solver applies to ODE rollouts (stochastic='none') only")
        unknown = set(self.keep) - set(ROLLOUT_KEEP)
        if unknown:
            raise ValueError(f"keep: unknown {sorted(unknown)}; choose from {list(ROLLOUT_KEEP)}")


def check_ode_rollout_sampling(sampling: Any, algorithm: str) -> None:
    """Raises ``ConfigError`` naming the field when ``sampling`` (the ``sampling`` config
    section) asks what deterministic ODE rollouts (``RolloutSpec.stochastic="none"``) cannot
    give: a group sharing its initial noise (identical samples, zero advantages) or an SDE
    window. Called by the trainer for every such algorithm and by those algorithms'
    :meth:`Algorithm.validate_config`, so ``load_config`` fails before any model loads."""
    name = f"train.algorithm {algorithm} samples deterministic ODE rollouts"
    if sampling.shared_noise:
        raise ConfigError(
            f"sampling.shared_noise: {name}, so a group sharing its initial noise gives "
            "identical samples and zero advantages: set it to false"
        )
    if sampling.window.kind != "full":
        raise ConfigError(f"sampling.window.kind: {name}; it has no SDE window")


@dataclasses.dataclass
class LossTerm:
    """The loss of one training term and what to log about it.

    Attributes:
        loss: scalar with gradient.
        metrics: floats; averaged over terms (weighted like the loss) unless the
            algorithm's ``metric_reductions`` says ``"min"`` or ``"max"``.
    """

    loss: torch.Tensor
    metrics: dict[str, float]


class Algorithm(abc.ABC):
    """A training algorithm over stored trajectories.

    Args:
        train: the ``train`` config section (``train.algorithm_options`` holds the
            algorithm's own options).
        policy: the policy being trained.
        reference: the frozen reference policy (``train.kl_coef > 0``), or ``None``.
        autocast: mixed-precision context factory for model calls.
    """

    name: ClassVar[str]
    #: metric name → ``"min"`` / ``"max"`` (how it combines over terms and ranks);
    #: unlisted metrics are weighted means.
    metric_reductions: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        train: Any,
        policy: Policy,
        *,
        reference: Any | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.train = train
        self.policy = policy
        self.reference = reference
        self.autocast = autocast

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Extra checks on the whole ``GRPOConfig`` (raise ``ConfigError`` naming the field)."""
        return None

    @abc.abstractmethod
    def rollout_spec(self) -> RolloutSpec:
        """What the rollout must provide."""

    @abc.abstractmethod
    def terms(self, rollout: Rollout, generator: torch.Generator | None) -> list[int]:
        """The terms one micro-batch of ``rollout`` trains, drawn from ``generator`` (one
        per global micro-batch, so the draw does not depend on the rank layout). With
        ``policy.step_groups``, each term stays within one group and every micro-batch
        visits the groups alike (see the module docstring)."""

    @abc.abstractmethod
    def loss(self, batch: Rollout, advantages: torch.Tensor, term: int) -> LossTerm:
        """The loss of ``term`` on the micro-batch ``batch`` (``advantages`` ``[len(batch)]``)."""

    def rollout_weights(self) -> contextlib.AbstractContextManager[Any]:
        """The weights the train rollouts sample with (default: the live ones)."""
        return contextlib.nullcontext()

    def after_optimizer_step(self, skipped: bool) -> None:
        """Called after every optimiser step (``skipped``: the step was skipped)."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (names must not collide with the model's)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`."""
        return None
