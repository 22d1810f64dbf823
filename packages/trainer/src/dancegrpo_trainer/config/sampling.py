"""``sampling:``: rollout settings (:class:`SamplingConfig`) and the SDE window
(:class:`WindowConfig`: which steps are stochastic and trained)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dancegrpo_trainer.config.errors import _check

WindowKind = Literal["full", "fast", "mixgrpo"]
WindowSchedule = Literal["progressive", "random", "decay"]
#: The rectified-flow samplers (``sampling.sampler``); Stable Diffusion uses ``ddim``.
FLOW_SAMPLER_NAMES = ("dancegrpo", "flow_grpo", "cps")


@dataclasses.dataclass
class WindowConfig:
    """Which rollout steps are stochastic (SDE, recorded, trained); the others are
    deterministic ODE steps. A window's position is a pure function of ``(run.seed,
    train step, this config)``, so resumes and multi-rank runs stay exact.

    Attributes:
        kind: ``full`` (every step, DanceGRPO), ``fast`` (Flow-GRPO-Fast: ``size`` SDE
            steps ``[k, k + size)``, ``k`` drawn uniformly each train step so the window
            lies within ``span``), ``mixgrpo`` (MixGRPO: a window sliding over training).
        size: SDE steps in the window (``fast``/``mixgrpo``; W = 1–3 for Fast, 4 for MixGRPO).
        span: ``fast``: ``[lo, hi]``, the steps the window may cover (``lo <= k``,
            ``k + size <= hi``; Flow-GRPO's ``sde_window_range``); default: every step
            (the last excluded with ``train.skip_last_timestep``).
        branch: ``fast``/``mixgrpo``: a group computes its deterministic prefix (steps
            before the window) once and branches at the window; needs shared noise.
        schedule: ``mixgrpo``: ``progressive`` (start moves by ``stride`` every
            ``iters_per_move`` train steps), ``random`` (uniform start each step) or
            ``decay`` (like progressive, the dwell shrinking linearly from
            ``iters_per_move`` to ``min_iters_per_move`` towards ``max_start``).
        iters_per_move, min_iters_per_move, stride: see ``schedule`` (MixGRPO's
            ``iters_per_group``, ``min_iters_per_group``, ``prog_overlap_step``).
        max_start: ``mixgrpo``: the last window start (default: the last that fits).
        roll_back: ``mixgrpo``: after ``max_start`` start again at 0 (else stay there).
        flash: ``mixgrpo`` progressive: after the window, DPM-Solver++ (2M) on a
            compressed schedule (MixGRPO-Flash).
        flash_compress_ratio: post-window schedule points = ``max(2, ⌊(S − stop + 1) ·
            ratio⌋)`` (MixGRPO's ``dpm_post_compress_ratio``).
    """

    kind: WindowKind = "full"
    size: int = 2
    span: list[int] | None = None
    branch: bool = False
    schedule: WindowSchedule = "progressive"
    iters_per_move: int = 25
    min_iters_per_move: int = 1
    stride: int = 1
    max_start: int | None = None
    roll_back: bool = True
    flash: bool = False
    flash_compress_ratio: float = 0.4

    def validate(self, num_steps: int, skip_last: bool, shared_noise: bool) -> None:
        w = "sampling.window"
        _check(
            self.kind in ("full", "fast", "mixgrpo"),
            f"{w}.kind",
            f"must be full, fast or mixgrpo, got {self.kind!r}",
        )
        if self.kind == "full":
            for key in ("branch", "flash"):
                _check(not getattr(self, key), f"{w}.{key}", "needs kind fast or mixgrpo")
            return
        usable = num_steps - int(skip_last)
        _check(
            1 <= self.size <= usable,
            f"{w}.size",
            f"must be in [1, {usable}] (sampling.num_steps={num_steps}"
            + (", minus the last step: train.skip_last_timestep)" if skip_last else ")"),
        )
        _check(
            not self.branch or shared_noise,
            f"{w}.branch",
            "shares a group's deterministic prefix, so the group must share its initial "
            "noise: set sampling.shared_noise: true",
        )
        if self.kind == "fast":
            _check(not self.flash, f"{w}.flash", "is MixGRPO-Flash: needs kind mixgrpo")
            lo, hi = self.fast_span(num_steps, skip_last)
            _check(
                lo >= 0 and hi <= usable and hi - lo >= self.size,
                f"{w}.span",
                f"must be [lo, hi] with 0 <= lo, hi <= {usable} and hi - lo >= size "
                f"({self.size}), got {self.span}",
            )
            return
        _check(
            self.schedule in ("progressive", "random", "decay"),
            f"{w}.schedule",
            f"must be progressive, random or decay, got {self.schedule!r}",
        )
        _check(self.iters_per_move >= 1, f"{w}.iters_per_move", "must be >= 1")
        _check(
            1 <= self.min_iters_per_move <= self.iters_per_move,
            f"{w}.min_iters_per_move",
            "must be in [1, iters_per_move]",
        )
        _check(self.stride >= 1, f"{w}.stride", "must be >= 1")
        last = self.last_start(num_steps, skip_last)
        _check(
            0 <= last <= usable - self.size,
            f"{w}.max_start",
            f"must be in [0, {usable - self.size}] (the window must fit), got {self.max_start}",
        )
        _check(
            not self.flash or self.schedule == "progressive",
            f"{w}.flash",
            "needs schedule progressive (MixGRPO-Flash's post-window solver; MixGRPO "
            "asserts it too)",
        )
        _check(
            0 < self.flash_compress_ratio <= 1,
            f"{w}.flash_compress_ratio",
            "must be in (0, 1]",
        )

    def fast_span(self, num_steps: int, skip_last: bool) -> tuple[int, int]:
        if self.span is None:
            return 0, num_steps - int(skip_last)
        _check(len(self.span) == 2, "sampling.window.span", f"must be [lo, hi], got {self.span}")
        return int(self.span[0]), int(self.span[1])

    def last_start(self, num_steps: int, skip_last: bool) -> int:
        if self.max_start is not None:
            return self.max_start
        return num_steps - int(skip_last) - self.size


@dataclasses.dataclass
class SamplingConfig:
    """Rollout settings.

    Attributes:
        num_steps: denoising steps per sample.
        eta: SDE noise level of rollouts (> 0: GRPO needs a stochastic policy).
        group_size: samples per prompt (G, or N for Best-of-N).
        prompts_per_step: prompts per optimisation step on each process; the global batch
            is ``prompts_per_step * group_size * world_size`` samples.
        shared_noise: one initial noise per group (DanceGRPO's default) instead of one per sample.
        rollout_batch_size: samples denoised together; finished chunks are decoded and sent
            to the reward services while the next chunk is sampled.
        sampler: the SDE of flow policies: ``dancegrpo`` (DanceGRPO, ``g = η``),
            ``flow_grpo`` (Flow-GRPO, ``g = η·√(σ/(1−σ))``) or ``cps`` (coefficients-
            preserving sampling, ``η ∈ (0, 1]``); ``null``: the policy's default
            (``dancegrpo``; Stable Diffusion: DDIM-η, the only sampler it takes).
        window: which steps are stochastic (:class:`WindowConfig`).
    """

    num_steps: int = 16
    eta: float = 0.7
    group_size: int = 8
    prompts_per_step: int = 4
    shared_noise: bool = True
    rollout_batch_size: int = 16
    sampler: str | None = None
    window: WindowConfig = dataclasses.field(default_factory=WindowConfig)

    def validate(self) -> None:
        _check(self.num_steps >= 1, "sampling.num_steps", "must be >= 1")
        _check(self.eta > 0, "sampling.eta", "must be > 0 for training rollouts (try 0.3-1.0)")
        _check(
            self.group_size >= 2, "sampling.group_size", "must be >= 2 (advantages need a group)"
        )
        _check(self.prompts_per_step >= 1, "sampling.prompts_per_step", "must be >= 1")
        _check(self.rollout_batch_size >= 1, "sampling.rollout_batch_size", "must be >= 1")
        samplers = (*FLOW_SAMPLER_NAMES, "ddim")
        _check(
            self.sampler is None or self.sampler in samplers,
            "sampling.sampler",
            f"must be one of {list(samplers)} (or null: the policy's default), got {self.sampler!r}",
        )
        _check(
            self.sampler != "cps" or self.eta <= 1,
            "sampling.eta",
            f"must be in (0, 1] with sampling.sampler cps (σ̃ = σ_next·sin(η·π/2)), got {self.eta}",
        )
