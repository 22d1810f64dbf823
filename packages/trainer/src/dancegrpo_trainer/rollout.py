"""Rollouts: batched stochastic sampling that keeps every step's latent and log-probability.

Samples are denoised in chunks of ``rollout_batch_size``; each finished chunk is decoded
and handed to ``on_chunk`` (the trainer sends it to the reward services there), so
scoring of chunk ``k`` overlaps with sampling of chunk ``k + 1``, and the trainer starts
the update of the groups chunk ``k`` completes (:func:`group_parts`) while later chunks are
still being scored. Everything stays in memory: nothing is written to disk and read back.

Random draws can come from one generator per sample (``row_generators``) instead of one
for the batch: then a sample's noise depends only on its own seed, not on which chunk,
rank or batch it was drawn in, which is what lets N ranks reproduce a 1-rank run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dancegrpo_trainer.core.dpm_solver import dpm_solver_pp_step
from dancegrpo_trainer.core.gaussian import sample_noise
from dancegrpo_trainer.core.step_output import StepOutput
from dancegrpo_trainer.policies.base import Conditioning, Policy, Schedule


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed hashed from ``parts`` (e.g. run seed, step, stream name, index).

    Hashing (rather than a linear combination) keeps distinct tuples from colliding.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generators(
    indices: Iterable[int], *parts: int | str, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per index, seeded with ``derive_seed(*parts, index)``."""
    return [torch.Generator(device).manual_seed(derive_seed(*parts, i)) for i in indices]


#: What a rollout can keep besides the latents: per-step log-probabilities, the Gaussian
#: means and stds of each step (GRPO-Guard), and the standard-normal step noise (replay).
ROLLOUT_KEEP = ("log_probs", "means", "stds", "noise")


@dataclasses.dataclass
class Rollout:
    """A batch of sampled trajectories.

    Attributes:
        latents: ``[N, S + 1, ...]``: ``x_0`` (initial noise) … ``x_S`` (final latent).
        log_probs: float32 ``[N, S]``: log-density of step ``i``'s transition under the
            sampling policy (0 at deterministic steps).
        frames: decoded ``uint8`` ``[N, H, W, 3]`` or ``[N, T, H, W, 3]`` (CPU), or ``None``
            for a latents-only rollout (``decode=False``).
        cond: the conditioning each sample was generated with (``len == N``).
        schedule: the sampling schedule (shared by all samples).
        stochastic: bool ``[S]``: the steps sampled with noise (recorded, trainable);
            ``None`` means all of them.
        eta: the SDE noise level of the stochastic steps.
        sampler: the step rule (``None``: the policy's default).
        means: float32 ``[N, S, ...]`` step means, if kept.
        stds: float32 ``[N, S]`` step stds, if kept.
        noise: float32 ``[N, S, ...]`` standard-normal step noise (zeros at deterministic
            steps), if kept: ``sample_rollout(..., step_noise=rollout.noise)`` replays it.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    frames: torch.Tensor | None
    cond: Conditioning
    schedule: Schedule
    stochastic: torch.Tensor | None = None
    eta: float | None = None
    sampler: str | None = None
    means: torch.Tensor | None = None
    stds: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def recorded_steps(self) -> list[int]:
        """Indices of the stochastic (recorded, trainable) steps."""
        if self.stochastic is None:
            return list(range(self.schedule.num_steps))
        return [i for i, s in enumerate(self.stochastic.tolist()) if s]

    def _rows(self, index: torch.Tensor | slice, cond: Conditioning) -> Rollout:
        def pick(t: torch.Tensor | None, cpu: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            if isinstance(index, slice):
                return t[index]
            return t[index.cpu() if cpu else index.to(t.device)]

        return dataclasses.replace(
            self,
            latents=pick(self.latents),
            log_probs=pick(self.log_probs),
            frames=pick(self.frames, cpu=True),
            cond=cond,
            means=pick(self.means),
            stds=pick(self.stds),
            noise=pick(self.noise),
        )

    def select(self, index: torch.Tensor) -> Rollout:
        """The trajectories at ``index`` (e.g. Best-of-N's top-k and bottom-k)."""
        index = index.to(torch.long)
        return self._rows(index, self.cond.select(index))

    def rows(self, start: int, stop: int) -> Rollout:
        """Trajectories ``start:stop`` (views, no copy of the latents)."""
        return self._rows(slice(start, stop), self.cond.select(range(start, stop)))


@dataclasses.dataclass
class RolloutPlan:
    """How each step of a rollout is taken.

    Attributes:
        schedule: the sampling schedule (``S`` steps).
        stochastic: bool ``[S]``: SDE steps (noise ``eta``, recorded) vs deterministic
            ODE steps (``eta = 0``); ``None``: every step is stochastic.
        sampler: the step rule (``None``: the policy's default).
        dpm_from: steps ``>= dpm_from`` use DPM-Solver++ (2M) instead of the sampler's
            ODE step (MixGRPO-Flash, after the window); they must be deterministic.
        branch_at: the rows of each prompt group share steps ``[0, branch_at)``, computed
            once per group (Flow-GRPO-Fast branching); those steps must be deterministic
            and the group's initial noise shared.
    """

    schedule: Schedule
    stochastic: torch.Tensor | None = None
    sampler: str | None = None
    dpm_from: int | None = None
    branch_at: int | None = None

    def __post_init__(self) -> None:
        n = self.schedule.num_steps
        if self.stochastic is not None:
            self.stochastic = torch.as_tensor(self.stochastic, dtype=torch.bool).cpu()
            if self.stochastic.shape != (n,):
                raise ValueError(f"stochastic must be [{n}], got {tuple(self.stochastic.shape)}")
        for name in ("dpm_from", "branch_at"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= n:
                raise ValueError(f"{name} must be in [0, {n}], got {value}")
        if self.dpm_from is not None and self.is_stochastic(range(self.dpm_from, n)):
            raise ValueError("steps from dpm_from on must be deterministic (stochastic=False)")
        if self.branch_at is not None and self.is_stochastic(range(self.branch_at)):
            raise ValueError("steps before branch_at must be deterministic (stochastic=False)")

    def is_stochastic(self, steps: Iterable[int]) -> bool:
        """Whether any of ``steps`` is stochastic."""
        steps = list(steps)
        if not steps:
            return False
        return self.stochastic is None or bool(self.stochastic[steps].any())

    def step_is_stochastic(self, i: int) -> bool:
        return self.stochastic is None or bool(self.stochastic[i])


def group_parts(chunk_stops: Sequence[int], group_size: int) -> list[tuple[int, int]]:
    """Row ranges of the whole prompt groups that each rollout chunk completes.

    Chunks are contiguous and scored in order, so once chunks ``0..c`` are scored every
    group that ends at or before ``chunk_stops[c]`` has all its rewards. Part ``c`` is the
    range of those groups not in an earlier part (empty, ``start == stop``, when chunk
    ``c`` completes no group). Chunks need not align with groups.

    Args:
        chunk_stops: the end row (exclusive) of each chunk, increasing; the last one is
            the batch size, a multiple of ``group_size``.
        group_size: samples per prompt group.

    Returns:
        one ``(start, stop)`` per chunk, covering ``0..chunk_stops[-1]`` in order.
    """
    if not chunk_stops or chunk_stops[-1] % group_size != 0:
        raise ValueError(
            f"the last chunk must end at a multiple of group_size ({group_size}), got "
            f"chunk ends {list(chunk_stops)}"
        )
    if any(b <= a for a, b in zip([0, *chunk_stops], chunk_stops, strict=False)):
        raise ValueError(f"chunk ends must increase from 0, got {list(chunk_stops)}")
    parts, done = [], 0
    for stop in chunk_stops:
        complete = stop // group_size * group_size
        parts.append((done, complete))
        done = complete
    return parts


def initial_noise(
    policy: Policy,
    num_groups: int,
    group_size: int,
    *,
    shared: bool,
    generator: torch.Generator | None = None,
    group_generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Initial latents for ``num_groups × group_size`` samples (group-major order).

    With ``shared`` every sample of a group starts from the same noise (DanceGRPO), so the
    group's spread comes from the SDE noise alone; otherwise each sample draws its own.
    Draws from ``generator``, or group ``g``'s noise from ``group_generators[g]``.
    """
    if group_generators is not None:
        if len(group_generators) != num_groups:
            raise ValueError(f"{len(group_generators)} group generators for {num_groups} groups")
        per_group = 1 if shared else group_size
        parts = [policy.initial_noise(per_group, generator=g) for g in group_generators]
        noise = torch.cat(parts)
        return noise.repeat_interleave(group_size, dim=0) if shared else noise
    if generator is None:
        raise ValueError("initial_noise needs generator or group_generators")
    if shared:
        noise = policy.initial_noise(num_groups, generator=generator)
        return noise.repeat_interleave(group_size, dim=0)
    return policy.initial_noise(num_groups * group_size, generator=generator)


def draw_row_noise(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard-normal float32 noise shaped like ``like`` ``[B, ...]``, row ``j`` drawn from
    ``generators[j]`` (so a row's noise does not depend on the batch it is drawn in)."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"{len(generators)} generators for {like.shape[0]} samples")
    return torch.cat([sample_noise(like[j : j + 1], g) for j, g in enumerate(generators)])


def _check_branch(noise: torch.Tensor, group_size: int) -> None:
    n = noise.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"branching needs whole groups: {n} samples, group_size {group_size}")
    heads = noise[::group_size].repeat_interleave(group_size, dim=0)
    if not torch.equal(heads, noise):
        raise ValueError(
            "branching shares a group's deterministic prefix, so every sample of a group must "
            "start from the same noise (sampling.shared_noise: true)"
        )


@torch.no_grad()
def sample_rollout(
    policy: Policy,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    num_steps: int | None = None,
    eta: float,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
    chunk_size: int,
    on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
    autocast: Callable[[], object] | None = None,
    progress: bool = False,
    desc: str = "rollout",
    schedule: Schedule | None = None,
    plan: RolloutPlan | None = None,
    step_noise: torch.Tensor | None = None,
    keep: Collection[str] = ("log_probs",),
    decode: bool = True,
    group_size: int | None = None,
) -> Rollout:
    """Samples ``len(noise)`` trajectories in chunks of ``chunk_size``.

    Args:
        policy: the policy to sample from (its trainable module in eval mode is the
            caller's concern).
        cond: conditioning, one row per sample.
        noise: initial latents ``[N, ...]``.
        num_steps: denoising steps on ``policy.schedule(num_steps)`` (or give ``schedule``
            or ``plan``).
        eta: SDE noise level of the stochastic steps (0 = deterministic ODE sampling).
        generator: RNG for the step noise of the whole batch, or
        row_generators: one RNG per sample (``len(noise)``): the rollout of a sample then
            does not depend on the chunking or on the other samples' draws.
        chunk_size: samples denoised together.
        on_chunk: called as ``on_chunk(rows, frames)`` after each chunk is decoded, with
            ``rows`` the chunk's slice of the batch and ``frames`` its ``uint8`` frames.
        autocast: context-manager factory wrapping model calls (mixed precision).
        progress: show a tqdm bar over chunks × steps.
        schedule: an explicit schedule instead of ``policy.schedule(num_steps)``.
        plan: the per-step plan (schedule, SDE window, sampler, DPM-Solver tail, branching).
        step_noise: float32 ``[N, S, ...]`` standard-normal noise of every step (e.g. a
            kept ``rollout.noise``): replays those draws exactly instead of drawing.
        keep: what to store besides latents: any of ``log_probs``, ``means``, ``stds``,
            ``noise`` (log-probs are always returned; the others are ``None`` unless kept).
        decode: ``False`` gives a latents-only rollout (``frames is None``; ``on_chunk``
            is then called with the chunk's final latents instead of frames).
        group_size: prompt-group size (rows are group-major), needed by ``plan.branch_at``.

    Returns:
        the :class:`Rollout`.
    """
    n = noise.shape[0]
    if len(cond) != n:
        raise ValueError(f"conditioning has {len(cond)} rows for {n} samples")
    if row_generators is not None and len(row_generators) != n:
        raise ValueError(f"{len(row_generators)} row generators for {n} samples")
    unknown = set(keep) - set(ROLLOUT_KEEP)
    if unknown:
        raise ValueError(f"keep: unknown {sorted(unknown)}; choose from {list(ROLLOUT_KEEP)}")
    if plan is None:
        if schedule is None:
            if num_steps is None:
                raise ValueError("sample_rollout needs num_steps, schedule or plan")
            schedule = policy.schedule(num_steps)
        plan = RolloutPlan(schedule=schedule)
    schedule = plan.schedule
    steps = schedule.num_steps
    if step_noise is not None and tuple(step_noise.shape[:2]) != (n, steps):
        raise ValueError(f"step_noise must be [{n}, {steps}, ...], got {tuple(step_noise.shape)}")
    keep = {"log_probs", *keep}
    ctx = autocast if autocast is not None else contextlib.nullcontext
    first_step, prefix = 0, None
    if plan.branch_at:
        if group_size is None:
            raise ValueError("plan.branch_at needs group_size")
        _check_branch(noise, group_size)
        heads = range(0, n, group_size)
        prefix = _run_steps(
            policy,
            plan,
            noise[::group_size],
            cond.select(heads),
            0,
            plan.branch_at,
            eta=eta,
            chunk_size=chunk_size,
            ctx=ctx,
            keep=keep,
        )
        prefix = {k: v.repeat_interleave(group_size, dim=0) for k, v in prefix.items()}
        first_step = plan.branch_at
    parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    frames = []
    bar = tqdm(total=n * steps, desc=desc, unit="step", disable=not progress, leave=False)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        x = noise[rows] if prefix is None else prefix["latents"][rows, -1]
        out = _run_steps(
            policy,
            plan,
            x,
            cond.select(range(rows.start, rows.stop)),
            first_step,
            steps,
            eta=eta,
            chunk_size=rows.stop - rows.start,
            ctx=ctx,
            keep=keep,
            generator=generator,
            row_generators=row_generators[rows] if row_generators is not None else None,
            step_noise=step_noise[rows] if step_noise is not None else None,
            bar=bar,
        )
        if prefix is not None:
            out = {
                k: torch.cat([prefix[k][rows][:, : -1 if k == "latents" else None], v], dim=1)
                for k, v in out.items()
            }
        for k, v in out.items():
            parts[k].append(v)
        final = out["latents"][:, -1]
        if decode:
            chunk_frames = policy.decode(final).cpu()
            frames.append(chunk_frames)
        if on_chunk is not None:
            on_chunk(rows, chunk_frames if decode else final)
    bar.close()
    merged = {k: torch.cat(v) for k, v in parts.items()}
    return Rollout(
        latents=merged["latents"],
        log_probs=merged["log_probs"],
        frames=torch.cat(frames) if decode else None,
        cond=cond,
        schedule=schedule,
        stochastic=plan.stochastic,
        eta=eta,
        sampler=plan.sampler,
        means=merged.get("means"),
        stds=merged.get("stds"),
        noise=merged.get("noise"),
    )


def _run_steps(
    policy: Policy,
    plan: RolloutPlan,
    x: torch.Tensor,
    cond: Conditioning,
    first: int,
    stop: int,
    *,
    eta: float,
    chunk_size: int,
    ctx: Callable[[], Any],
    keep: Collection[str],
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
    step_noise: torch.Tensor | None = None,
    bar: Any = None,
) -> dict[str, torch.Tensor]:
    """Steps ``first..stop-1`` of ``plan`` from ``x`` (one batch of rows, at most
    ``chunk_size`` denoised together); returns per-step tensors stacked on dim 1:
    ``latents`` ``[B, stop-first+1, ...]`` and those of ``log_probs``/``means``/``stds``/
    ``noise`` named in ``keep`` ``[B, stop-first, ...]`` (only those are stored)."""
    if x.shape[0] > chunk_size:  # the branched prefix: one head per group, in chunks
        pieces = [
            _run_steps(
                policy,
                plan,
                x[a : a + chunk_size],
                cond.select(range(a, min(a + chunk_size, x.shape[0]))),
                first,
                stop,
                eta=eta,
                chunk_size=chunk_size,
                ctx=ctx,
                keep=keep,
            )
            for a in range(0, x.shape[0], chunk_size)
        ]
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    schedule = plan.schedule
    latents = [x]
    recorded: dict[str, list[torch.Tensor]] = {k: [] for k in keep}
    history: tuple[torch.Tensor, float] | None = None
    for i in range(first, stop):
        sde = plan.step_is_stochastic(i) and eta != 0
        eps = None
        if sde:
            if step_noise is not None:
                eps = step_noise[:, i].to(torch.float32)
            elif row_generators is not None:
                eps = draw_row_noise(x, row_generators)
            else:
                eps = sample_noise(x, generator)
        with ctx():
            out = policy.denoise_step(
                x, i, schedule, cond, eta=eta if sde else 0.0, noise=eps, sampler=plan.sampler
            )
        if plan.dpm_from is not None and i >= plan.dpm_from:
            out, history = _dpm_solver_step(out, x, schedule, i, history, plan.dpm_from)
        x = out.prev_sample
        latents.append(x)
        for k, values in recorded.items():
            values.append(_step_record(k, out, eps, x))
        if bar is not None:
            bar.update(x.shape[0])
    result = {"latents": torch.stack(latents, dim=1)}
    for k, values in recorded.items():
        if values:
            result[k] = torch.stack(values, dim=1)
        else:
            per_row = k in ("log_probs", "stds")
            shape = (x.shape[0], 0) if per_row else (x.shape[0], 0, *x.shape[1:])
            result[k] = x.new_zeros(shape, dtype=torch.float32)
    return result


def _step_record(
    key: str, out: StepOutput, eps: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """Step ``out``'s value of the kept ``key`` (float32): its log-probability ``[B]``,
    mean ``[B, ...]``, std ``[B]`` or standard-normal noise ``eps`` (zeros when the step
    drew none)."""
    if key == "log_probs":
        return out.log_prob.float()
    if key == "means":
        return out.mean.detach().float()
    if key == "stds":
        return out.std.detach().float().reshape(x.shape[0])
    if eps is None:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return eps


def _dpm_solver_step(
    out: StepOutput,
    x: torch.Tensor,
    schedule: Schedule,
    i: int,
    history: tuple[torch.Tensor, float] | None,
    dpm_from: int,
) -> tuple[StepOutput, tuple[torch.Tensor, float]]:
    """Replaces the ODE step ``i`` by DPM-Solver++ (2M) from the model's ``x0`` prediction:
    first order at the first solver step (fresh history, as diffusers' scheduler started
    at the window's end) and at the final one (``lower_order_final``), second order
    between."""
    assert schedule.sigmas is not None
    sigma, sigma_next = float(schedule.sigmas[i]), float(schedule.sigmas[i + 1])
    x0 = out.pred_original_sample
    last = i == schedule.num_steps - 1
    if history is None or last:
        x_next = dpm_solver_pp_step(x, x0, sigma, sigma_next)
    else:
        x_next = dpm_solver_pp_step(
            x, x0, sigma, sigma_next, prev_x0=history[0], prev_sigma=history[1]
        )
    x_next = x_next.to(x.dtype)
    step = dataclasses.replace(
        out, prev_sample=x_next, mean=x_next.float(), log_prob=torch.zeros_like(out.log_prob)
    )
    return step, (x0, sigma)
