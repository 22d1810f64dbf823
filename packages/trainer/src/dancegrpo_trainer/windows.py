"""SDE windows: which steps of a rollout are stochastic (recorded, trained) at each train step.

Pure functions of ``(run seed, train step, config)``, so a resumed or multi-rank run sees
exactly the windows an uninterrupted single-process run sees.

- ``full``: every step (DanceGRPO).
- ``fast``: Flow-GRPO-Fast (Liu et al. 2025, Flow-GRPO's ``pipeline_with_logprob_fast``):
  ODE before ``k``, SDE on ``[k, k + W)``, ODE after; ``k = randint(lo, hi − W)``
  (inclusive) for the configured span ``[lo, hi]``. Flow-GRPO seeds Python's ``random``
  with the process index; here ``k`` is drawn once per train step from
  ``(seed, step)``, the same on every rank.
- ``mixgrpo``: MixGRPO (Li et al. 2025, Tencent-Hunyuan/MixGRPO
  ``GRPOTrainingStates``): the window start ``k`` slides over training —
  ``progressive`` moves it by ``stride`` every ``iters_per_move`` steps, ``decay`` dwells
  ``max(min, ⌊N·(1 − k/K) + min·k/K⌋)`` steps at ``k`` (``K = max_start``), ``random``
  draws it each step; ``roll_back`` starts over after ``K``. Differences from MixGRPO's
  code: windows always hold ``W`` steps (MixGRPO truncates them at ``sampling_steps − 2``,
  exclusive, and ends with an empty window at ``K``), ``K`` defaults to the last start that
  fits, and ``random`` is seeded (MixGRPO draws it unseeded).
- MixGRPO-Flash: after the window, the ODE runs DPM-Solver++ (2M) on a compressed
  schedule: ``max(2, ⌊(S − stop + 1)·ratio⌋)`` points from ``σ_stop`` to 0, evenly spaced
  in unshifted time and shifted like the policy's schedule (MixGRPO's
  ``dpm_apply_strategy="post"``; it uses ``max(1, ...)`` points, which leaves a schedule
  that never reaches 0 when the product rounds to 1).
"""

from __future__ import annotations

import torch

from dancegrpo_trainer.config import ConfigError, SamplingConfig, WindowConfig
from dancegrpo_trainer.core.schedules import shift_sigmas
from dancegrpo_trainer.policies.base import Policy
from dancegrpo_trainer.rollout import RolloutPlan, derive_seed


def _uniform_int(low: int, high: int, *parts: int | str) -> int:
    """An integer uniform in ``[low, high]`` drawn from a generator seeded by ``parts``."""
    gen = torch.Generator().manual_seed(derive_seed(*parts))
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def mixgrpo_dwell(window: WindowConfig, start: int, max_start: int) -> int:
    """Train steps the ``decay`` schedule stays at window start ``start``."""
    n, low = window.iters_per_move, window.min_iters_per_move
    if window.schedule != "decay":
        return n
    progress = start / max_start if max_start > 0 else 0.0
    return max(low, int(n * (1 - progress) + low * progress))


def mixgrpo_start(window: WindowConfig, step: int, max_start: int, seed: int) -> int:
    """MixGRPO's window start at (0-based) train step ``step``."""
    if window.schedule == "random":
        return _uniform_int(0, max_start, seed, step, "sde_window")
    positions = list(range(0, max_start + 1, window.stride))
    dwell = [mixgrpo_dwell(window, p, max_start) for p in positions]
    remaining = step
    if window.roll_back:
        remaining %= sum(dwell)
    for position, stay in zip(positions, dwell, strict=True):
        if remaining < stay:
            return position
        remaining -= stay
    return max_start  # past the last position without roll_back: MixGRPO clips there


def window_bounds(
    window: WindowConfig, num_steps: int, *, step: int, seed: int, skip_last: bool = False
) -> tuple[int, int]:
    """``[start, stop)`` of the SDE window at (0-based) train step ``step``."""
    if window.kind == "full":
        return 0, num_steps
    if window.kind == "fast":
        lo, hi = window.fast_span(num_steps, skip_last)
        start = _uniform_int(lo, hi - window.size, seed, step, "sde_window")
    else:
        start = mixgrpo_start(window, step, window.last_start(num_steps, skip_last), seed)
    return start, start + window.size


def window_starts(window: WindowConfig, num_steps: int, skip_last: bool = False) -> list[int]:
    """Every start the window can take over a run (``window_bounds`` over all steps)."""
    if window.kind == "full":
        return [0]
    if window.kind == "fast":
        lo, hi = window.fast_span(num_steps, skip_last)
        return list(range(lo, hi - window.size + 1))
    last = window.last_start(num_steps, skip_last)
    if window.schedule == "random":
        return list(range(last + 1))
    positions = set(range(0, last + 1, window.stride))
    if not window.roll_back:
        positions.add(last)  # past the last position the start is clipped there
    return sorted(positions)


def check_windows_train(policy: Policy, sampling: SamplingConfig, skip_last: bool) -> None:
    """Raises ``ConfigError`` naming ``sampling.window`` when a window the run can draw
    holds no step the policy trains (only steps of a frozen sub-network: Wan2.2 A14B with
    ``model.options.train_experts`` one expert, ``Policy.step_groups``), which would stop
    the run at the first such train step."""
    window = sampling.window
    if window.kind == "full":
        return
    groups = policy.step_groups(policy.schedule(sampling.num_steps))
    if groups is None:
        return
    trained = {s for group in groups for s in group}
    for start in window_starts(window, sampling.num_steps, skip_last):
        steps = set(range(start, start + window.size))
        if not steps & trained:
            raise ConfigError(
                f"sampling.window: the window can fall on steps {sorted(steps)}, none of which "
                f"the policy trains (its trained steps: {sorted(trained)}; Wan: "
                "model.options.train_experts); keep it on trained steps (span, max_start, "
                "size) or train every sub-network"
            )


def flash_sigmas(sigmas: torch.Tensor, stop: int, shift: float, ratio: float) -> torch.Tensor:
    """MixGRPO-Flash's schedule: ``sigmas[:stop + 1]`` then a compressed tail to 0.

    The tail has ``max(2, ⌊(S − stop + 1)·ratio⌋)`` points evenly spaced in unshifted
    time from ``σ_stop`` to 0, shifted with ``shift`` (``σ = s·u/(1 + (s−1)·u)``); its
    first point is ``σ_stop`` itself.
    """
    num_steps = sigmas.shape[0] - 1
    points = max(2, int((num_steps - stop + 1) * ratio))
    sigma_stop = sigmas[stop].to(torch.float64)
    unshifted = sigma_stop / (shift - (shift - 1.0) * sigma_stop)
    grid = torch.linspace(float(unshifted), 0.0, points, dtype=torch.float64)
    tail = shift_sigmas(grid, shift).to(sigmas.dtype).to(sigmas.device)
    return torch.cat([sigmas[: stop + 1], tail[1:]])


def rollout_plan(
    policy: Policy,
    sampling: SamplingConfig,
    *,
    step: int,
    seed: int,
    skip_last: bool = False,
    stochastic: str = "window",
    ode_solver: str = "euler",
) -> RolloutPlan:
    """The :class:`RolloutPlan` of train step ``step`` (0-based).

    ``stochastic``: the algorithm's :attr:`RolloutSpec.stochastic` (``"none"``: an ODE
    rollout on the full schedule, whose steps ``ode_solver`` takes: ``"euler"``, or
    ``"dpm2"``, DPM-Solver++ (2M) from the first step).
    """
    n, window = sampling.num_steps, sampling.window
    schedule = policy.schedule(n)
    if stochastic == "none":
        dpm_from = 0 if ode_solver == "dpm2" else None
        deterministic = torch.zeros(n, dtype=torch.bool)
        return RolloutPlan(schedule, deterministic, sampling.sampler, dpm_from=dpm_from)
    if window.kind == "full":
        return RolloutPlan(schedule, None, sampling.sampler)
    start, stop = window_bounds(window, n, step=step, seed=seed, skip_last=skip_last)
    dpm_from = None
    if window.flash and stop < n:
        from dancegrpo_trainer.policies.flow import FlowPolicy

        if not isinstance(policy, FlowPolicy):
            raise ValueError("sampling.window.flash needs a rectified-flow policy")
        sigmas = flash_sigmas(
            schedule.sigmas, stop, policy.schedule_shift, window.flash_compress_ratio
        )
        schedule = policy.schedule_from_sigmas(sigmas)
        dpm_from = stop
    mask = torch.zeros(schedule.num_steps, dtype=torch.bool)
    mask[start:stop] = True
    branch_at = start if window.branch and start > 0 else None
    return RolloutPlan(schedule, mask, sampling.sampler, dpm_from=dpm_from, branch_at=branch_at)
