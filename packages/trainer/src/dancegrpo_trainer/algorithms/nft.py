"""DiffusionNFT (``train.algorithm: nft``): online RL on the forward process.

Zheng et al. 2025, *DiffusionNFT: Online Diffusion Reinforcement with Forward Process*;
semantics from the official code, github.com/NVlabs/DiffusionNFT (``scripts/
train_nft_sd3.py``: the training step, loss, old-policy update ``return_decay``;
``config/nft.py``: settings; ``flow_grpo/diffusers_patch/solver.py``: ``dpm2`` rollouts).

- **Rollouts**: deterministic ODE rollouts (no log-probabilities) sampled with the *old*
  policy ``v_old`` (the official code switches to its ``old`` adapter to sample), by
  DPM-Solver++ (2M) (``ode_solver: dpm2``, the official ``sample.solver``) or Euler.
- **Loss** per sample, at noise levels ``t`` drawn from the rollout's own schedule (each
  sample a random subset of ``K = ⌊timestep_fraction · S⌋`` of its ``S`` sigmas, without
  replacement, as the official per-sample ``randperm`` of the sampling timesteps; per
  step group where the policy has them, see :meth:`DiffusionNFT.level_groups`) and
  fresh noise ``ε``: ``x_t = (1−t)·x0 + t·ε`` from the rollout's final latent ``x0``,
  then (:func:`nft_loss`)::

      r    = clamp(clamp(A, −c, c)/c/2 + ½, 0, 1)            (c = train.adv_clip_max)
      v⁺   = β·v_θ + (1−β)·v_old,    v⁻ = (1+β)·v_old − β·v_θ
      x̂0±  = x_t − t·v±,   w± = max(mean|x̂0± − x0|, 1e-5)   (no gradient)
      L    = c·[r·mean((x̂0⁺ − x0)²/w⁺) + (1−r)·mean((x̂0⁻ − x0)²/w⁻)]/β
      loss = mean_b L + kl_coef·mean_b mean((v_θ − v_ref)²)

  ``v_old`` is computed without gradient, so only ``v_θ`` trains.
- **Old policy**: a float32 copy of the trainable parameters (LoRA: the adapter weights
  only), initially the trained weights, blended after every optimiser step ``n``
  (1-based, skipped steps included): ``old ← d(n)·old + (1 − d(n))·θ`` with the official
  ``return_decay``: ``d(n) = 0`` for ``n < flat``, else ``min(rate·(n − flat), max)``.
  Checkpointed (``nft.old.*``, ``nft.steps_taken``), so a resume continues exactly.
  While the last blend had decay 0 the old policy *is* ``θ``: ``v_old = v_θ`` detached,
  without a second forward pass.
- **CFG**: the official code trains and samples CFG-free (``sample.guidance_scale =
  1.0``): true classifier-free guidance on any adapter that has it (a weight above 1 in
  ``policy_factory.cfg_weights``: SD3's ``model.guidance_scale``, SkyReels' and
  Qwen-Image's ``true_cfg_scale``, Wan's ``guidance_scale`` / ``guidance_scale_2``) is a
  config error unless ``train.cfg_free`` sets them to 1. A distilled guidance *embedding*
  (FLUX, FLUX.1-Kontext, HunyuanVideo) is an input of the one forward pass and stays as
  configured. ODE rollouts also need ``sampling.shared_noise: false`` and the ``full``
  window (checked at load, ``check_ode_rollout_sampling``).

Random draws: a micro-batch's terms carry one seed (from the trainer's generator of that
global micro-batch); a row's noise levels and noise come from that seed and a hash of the
row's initial noise ``x_T``, so they do not depend on how the batch is cut into parts or
ranks (``sampling.shared_noise`` is off for ODE rollouts, so every row's ``x_T`` differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any, Literal

import torch

from dancegrpo_trainer.algorithms.base import (
    Algorithm,
    LossTerm,
    RolloutSpec,
    check_ode_rollout_sampling,
)
from dancegrpo_trainer.config import ConfigError
from dancegrpo_trainer.core.losses import velocity_kl
from dancegrpo_trainer.core.timesteps import num_train_timesteps
from dancegrpo_trainer.policies.base import Schedule
from dancegrpo_trainer.policies.flow import FlowPolicy
from dancegrpo_trainer.rollout import Rollout, derive_seed, draw_row_noise
from dancegrpo_trainer.weights import swapped_weights, trainable_parameters

#: A term is ``seed · _TERM_STRIDE + k``: the micro-batch's seed and the k-th noise level.
_TERM_STRIDE = 1 << 20
#: Floor of the adaptive weight (official ``.clip(min=0.00001)``).
_WEIGHT_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class NFTOptions:
    """``train.algorithm_options`` of ``nft`` (defaults: the official ``config/nft.py``).

    Attributes:
        beta: ``β`` of the velocity mixtures (official ``config.beta``: 1.0; 0.1 for its
            OCR and multi-reward configs).
        decay_flat, decay_rate, decay_max: the old policy's decay schedule
            ``d(n) = 0 if n < flat else min(rate·(n − flat), max)``; official
            ``decay_type`` 1 (the default): 0, 0.001, 0.5; ``decay_type`` 2 (OCR): 75,
            0.0075, 0.999; ``decay_type`` 0: 0, 0, 0 (the old policy is the current one).
        ode_solver: the rollouts' ODE steps, ``dpm2`` (official) or ``euler``.
    """

    beta: float = 1.0
    decay_flat: int = 0
    decay_rate: float = 0.001
    decay_max: float = 0.5
    ode_solver: Literal["dpm2", "euler"] = "dpm2"

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"train.algorithm_options.{key}: {message}")

        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.decay_flat >= 0, "decay_flat", f"must be >= 0, got {self.decay_flat}")
        check(self.decay_rate >= 0, "decay_rate", f"must be >= 0, got {self.decay_rate}")
        check(0 <= self.decay_max < 1, "decay_max", f"must be in [0, 1), got {self.decay_max}")
        check(
            self.ode_solver in ("dpm2", "euler"),
            "ode_solver",
            f"must be 'dpm2' or 'euler', got {self.ode_solver!r}",
        )

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> NFTOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"train.algorithm_options.{unknown[0]}: not an option of nft "
                f"(options: {sorted(names)})"
            )
        return cls(**options)


def old_policy_decay(step: int, *, flat: int, rate: float, max_decay: float) -> float:
    """The old policy's decay after optimiser step ``step`` (1-based): DiffusionNFT's
    ``return_decay``, ``0`` before ``flat``, then ``min(rate·(step − flat), max_decay)``."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, max_decay)


@dataclasses.dataclass
class NFTLossOutput:
    """:func:`nft_loss` and its diagnostics.

    Attributes:
        loss: scalar, ``policy_loss`` (the KL term is added by the caller).
        policy_loss: ``mean_b(c·[r·L⁺ + (1−r)·L⁻]/β)``.
        unweighted_policy_loss: the same without the factor ``c``.
        r: ``[B]`` the optimality probability from the advantage.
        old_deviate: ``mean((v_θ − v_old)²)`` (detached).
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    unweighted_policy_loss: torch.Tensor
    r: torch.Tensor
    old_deviate: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {
            "policy_loss": float(self.policy_loss.detach()),
            "unweighted_policy_loss": float(self.unweighted_policy_loss.detach()),
            "r_mean": float(self.r.mean()),
            "old_deviate": float(self.old_deviate),
        }


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    adv_clip_max: float,
) -> NFTLossOutput:
    """DiffusionNFT's policy loss (official ``train_nft_sd3.py``, see the module docstring).

    Args:
        v_theta: the trained velocity ``[B, ...]`` (with gradient).
        v_old: the old policy's velocity at the same inputs ``[B, ...]`` (detached here).
        x_t: the noised clean latents ``(1−t)·x0 + t·ε`` ``[B, ...]``.
        x0: the rollouts' final latents ``[B, ...]``.
        t: noise levels ``[B]`` (rectified-flow σ in ``(0, 1]``).
        advantages: ``[B]`` normalised advantages.
        beta: ``β > 0``.
        adv_clip_max: ``c``: advantages are clipped to ``[−c, c]`` and mapped to
            ``r = A/(2c) + ½``.

    Returns:
        :class:`NFTLossOutput` (float32 inputs; the adaptive weights are float64 as the
        official code computes them, so the losses are float64).
    """
    v_theta, v_old = v_theta.float(), v_old.detach().float()
    x_t, x0 = x_t.float(), x0.float()
    dims = tuple(range(1, x0.ndim))
    t = t.to(device=x0.device, dtype=torch.float32).reshape(-1, *[1] * (x0.ndim - 1))
    a = advantages.to(device=x0.device, dtype=torch.float32)
    r = (a.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2.0 + 0.5).clamp(0, 1)
    positive = beta * v_theta + (1 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_theta

    def weighted_error(v: torch.Tensor) -> torch.Tensor:
        x0_hat = x_t - t * v
        with torch.no_grad():  # adaptive weighting, float64 as the official code
            w = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True)
            w = w.clip(min=_WEIGHT_FLOOR)
        return ((x0_hat - x0) ** 2 / w).mean(dim=dims)

    unweighted = r * weighted_error(positive) / beta + (1.0 - r) * weighted_error(negative) / beta
    policy_loss = (unweighted * adv_clip_max).mean()
    return NFTLossOutput(
        loss=policy_loss,
        policy_loss=policy_loss,
        unweighted_policy_loss=unweighted.mean(),
        r=r.detach(),
        old_deviate=((v_theta.detach() - v_old) ** 2).mean(),
    )


def row_keys(initial_latents: torch.Tensor) -> list[str]:
    """A stable key per row of ``x_T`` ``[B, ...]`` (a hash of its float32 bytes)."""
    data = initial_latents.detach().to("cpu", torch.float32).contiguous()
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).hexdigest() for row in data]


class DiffusionNFT(Algorithm):
    """DiffusionNFT's forward-process loss on ODE rollouts (see the module docstring)."""

    name = "nft"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.policy, FlowPolicy):
            raise ValueError(
                f"train.algorithm nft needs a rectified-flow policy, got {type(self.policy)}"
            )
        self.options = NFTOptions.from_dict(dict(self.train.algorithm_options))
        named = trainable_parameters(self.policy.trainable_module())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.old = [p.detach().float().clone() for p in self.params]
        self.steps_taken = torch.zeros((), dtype=torch.int64)

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        NFTOptions.from_dict(dict(cfg.train.algorithm_options))
        kind, why = cfg.model.kind, "train.algorithm nft"
        if kind == "stable_diffusion":
            raise ConfigError(
                f"model.kind: {why} trains the rectified-flow forward process "
                "(x_t = (1−t)·x0 + t·ε); stable_diffusion is a DDIM model"
            )
        # True CFG (a second, unconditional forward per step) on any adapter that has it;
        # a distilled guidance embedding (FLUX, Kontext, HunyuanVideo) is not CFG.
        from dancegrpo_trainer.policy_factory import cfg_weights

        weights = cfg_weights(cfg.model, cfg_free=cfg.train.cfg_free)
        for field, weight in weights.items():
            if weight > 1:
                raise ConfigError(
                    f"{field}: {why} trains and samples CFG-free, as DiffusionNFT does: set "
                    f"it to 1 or set train.cfg_free: true (got {weight})"
                )
        check_ode_rollout_sampling(cfg.sampling, "nft")
        if cfg.train.fsdp:
            raise ConfigError(
                f"train.fsdp: {why} swaps in its old policy by pointer, which is "
                "unsupported on sharded parameters"
            )

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic="none", keep=(), ode_solver=self.options.ode_solver)

    def old_policy(self) -> contextlib.AbstractContextManager[None]:
        """Swaps the old policy's weights in."""
        cast = [o.to(p.dtype) for o, p in zip(self.old, self.params, strict=True)]
        return swapped_weights(self.params, cast)

    def rollout_weights(self) -> contextlib.AbstractContextManager[None]:
        return self.old_policy()

    def level_groups(self, schedule: Schedule) -> list[list[int]]:
        """The schedule indices noise levels are drawn from, group by group: the policy's
        step groups where it has them (``Policy.step_groups``: sub-networks such as Wan2.2's
        experts; a term stays within one group, as ``algorithms/base.py`` asks), else one
        group of every step; the last step left out with ``train.skip_last_timestep``."""
        n = schedule.num_steps
        groups = self.policy.step_groups(schedule)
        if groups is None:
            groups = [list(range(n))]
        if self.train.skip_last_timestep:
            groups = [[i for i in group if i != n - 1] for group in groups]
        groups = [list(group) for group in groups if group]
        if not groups:
            raise ValueError("no noise level is left to train once the last step is skipped")
        return groups

    def term_plan(self, schedule: Schedule) -> list[tuple[int, int]]:
        """``(group, j)`` of every term of a micro-batch: ``K_g = max(1, ⌊timestep_fraction ·
        |g|⌋)`` draws per group, group after group (one group: the official
        ``int(S · timestep_fraction)``)."""
        fraction = self.train.timestep_fraction
        return [
            (g, j)
            for g, group in enumerate(self.level_groups(schedule))
            for j in range(num_train_timesteps(len(group), fraction))
        ]

    def terms(self, rollout: Rollout, generator: torch.Generator | None) -> list[int]:
        seed = int(torch.randint(0, 2**40, (1,), generator=generator))
        return [seed * _TERM_STRIDE + k for k in range(len(self.term_plan(rollout.schedule)))]

    def draws(self, batch: Rollout, term: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Term ``term``'s per-row schedule indices (int64 ``[B]``) and float32 noise
        ``[B, ...]``: row ``j`` trains its own random subset of each group's sigmas (a
        per-row permutation, its ``j``-th entry for the group's ``j``-th term)."""
        seed, k = divmod(term, _TERM_STRIDE)
        g, j = self.term_plan(batch.schedule)[k]
        group = self.level_groups(batch.schedule)[g]
        keys = row_keys(batch.latents[:, 0])
        picks = [
            torch.randperm(len(group), generator=_generator(seed, key, "level", g))[j]
            for key in keys
        ]
        idx = torch.tensor([group[int(p)] for p in picks], dtype=torch.int64)
        noise = draw_row_noise(batch.latents[:, -1], [_generator(seed, key, k) for key in keys])
        return idx, noise

    def loss(self, batch: Rollout, advantages: torch.Tensor, term: int) -> LossTerm:
        cfg, policy = self.train, self.policy
        assert isinstance(policy, FlowPolicy)
        schedule = batch.schedule
        if schedule.sigmas is None:
            raise ValueError("train.algorithm nft needs a flow schedule with sigmas")
        idx, noise = self.draws(batch, term)
        x0 = batch.latents[:, -1]
        t = schedule.sigmas[idx.to(schedule.sigmas.device)].to(x0.device, torch.float32)
        t_b = t.reshape(-1, *[1] * (x0.ndim - 1))
        x_t = ((1 - t_b) * x0.float() + t_b * noise).to(x0.dtype)
        timesteps = schedule.timesteps[idx.to(schedule.timesteps.device)]
        with self.autocast():
            v_theta = policy.predict(x_t, timesteps, batch.cond)
        if self.old_is_live():
            v_old = v_theta.detach()
        else:
            with torch.no_grad(), self.old_policy(), self.autocast():
                v_old = policy.predict(x_t, timesteps, batch.cond)
        out = nft_loss(
            v_theta,
            v_old,
            x_t,
            x0,
            t,
            advantages,
            beta=self.options.beta,
            adv_clip_max=cfg.adv_clip_max,
        )
        loss, kl = out.loss, torch.zeros((), device=x0.device)
        if cfg.kl_coef > 0:
            if self.reference is None:
                raise ValueError("train.kl_coef > 0 needs a reference policy")
            with torch.no_grad(), self.reference.active(), self.autocast():
                v_ref = policy.predict(x_t, timesteps, batch.cond)
            kl = velocity_kl(v_theta, v_ref).mean()
            loss = loss + cfg.kl_coef * kl
        metrics = {"loss": float(loss.detach()), "kl": float(kl.detach()), **out.metrics()}
        return LossTerm(loss=loss, metrics=metrics)

    def decay(self, step: int) -> float:
        """The old policy's decay after optimiser step ``step`` (:func:`old_policy_decay`)."""
        o = self.options
        return old_policy_decay(step, flat=o.decay_flat, rate=o.decay_rate, max_decay=o.decay_max)

    def old_is_live(self) -> bool:
        """Whether the old policy *is* the trained weights: at the start, and after a blend
        with decay 0 (``old·0 + θ·1 = θ`` exactly: on-policy ``decay_rate: 0``, or before
        ``decay_flat``). Then ``v_old`` is ``v_θ`` detached and its forward pass is skipped."""
        return self.decay(int(self.steps_taken)) == 0.0

    @torch.no_grad()
    def after_optimizer_step(self, skipped: bool) -> None:
        """Advances the old policy (every step, as the official code's once per epoch)."""
        self.steps_taken += 1
        decay = self.decay(int(self.steps_taken))
        for old, p in zip(self.old, self.params, strict=True):
            old.copy_(old * decay + p.detach().float() * (1.0 - decay))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"nft.old.{n}": o for n, o in zip(self.names, self.old, strict=True)}
        state["nft.steps_taken"] = self.steps_taken
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [
            k for k in ("nft.steps_taken", *(f"nft.old.{n}" for n in self.names)) if k not in state
        ]
        if missing:
            raise ValueError(
                f"the checkpoint has no DiffusionNFT state ({missing[0]} missing): it was "
                "not trained with train.algorithm nft and these trainable weights"
            )
        for name, old in zip(self.names, self.old, strict=True):
            old.copy_(state[f"nft.old.{name}"])
        self.steps_taken.copy_(state["nft.steps_taken"])


def _generator(seed: int, *parts: str | int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
