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

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from dancegrpo_trainer.core.gaussian import gaussian_log_prob, sample_noise
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


@dataclasses.dataclass
class Rollout:
    """A batch of sampled trajectories.

    Attributes:
        latents: ``[N, S + 1, ...]``: ``x_0`` (initial noise) … ``x_S`` (final latent).
        log_probs: float32 ``[N, S]``: log-density of step ``i``'s transition under the
            sampling policy.
        frames: decoded ``uint8`` ``[N, H, W, 3]`` or ``[N, T, H, W, 3]`` (CPU).
        cond: the conditioning each sample was generated with (``len == N``).
        schedule: the sampling schedule (shared by all samples).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    frames: torch.Tensor
    cond: Conditioning
    schedule: Schedule

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def select(self, index: torch.Tensor) -> Rollout:
        """The trajectories at ``index`` (e.g. Best-of-N's top-k and bottom-k)."""
        index = index.to(torch.long)
        return Rollout(
            latents=self.latents[index.to(self.latents.device)],
            log_probs=self.log_probs[index.to(self.log_probs.device)],
            frames=self.frames[index.cpu()],
            cond=self.cond.select(index),
            schedule=self.schedule,
        )

    def rows(self, start: int, stop: int) -> Rollout:
        """Trajectories ``start:stop`` (views, no copy of the latents)."""
        return Rollout(
            latents=self.latents[start:stop],
            log_probs=self.log_probs[start:stop],
            frames=self.frames[start:stop],
            cond=self.cond.select(range(start, stop)),
            schedule=self.schedule,
        )


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


def denoise_step_row_noise(
    policy: Policy,
    x: torch.Tensor,
    step_index: int,
    schedule: Schedule,
    cond: Conditioning,
    *,
    eta: float,
    generators: Sequence[torch.Generator],
) -> StepOutput:
    """``policy.denoise_step`` with row ``j``'s step noise drawn from ``generators[j]``.

    The policy computes the Gaussian (mean, std) of the step (evaluated at a placeholder
    ``prev_sample``, which does not affect them); the sample and its log-probability are
    then formed exactly as ``flow_sde_step`` / ``ddim_step`` do
    (``mean + std · N(0, I)`` cast to the latent dtype; float32 log-density averaged over
    the non-batch dims).
    """
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for {x.shape[0]} samples")
    out = policy.denoise_step(x, step_index, schedule, cond, eta=eta, prev_sample=x)
    if eta == 0:
        drawn = out.mean
    else:
        noise = torch.cat([sample_noise(x[j : j + 1], g) for j, g in enumerate(generators)])
        drawn = out.mean + out.std * noise
    prev_sample = drawn.detach().to(x.dtype)
    log_prob = gaussian_log_prob(prev_sample, out.mean, out.std)
    return dataclasses.replace(out, prev_sample=prev_sample, log_prob=log_prob)


@torch.no_grad()
def sample_rollout(
    policy: Policy,
    cond: Conditioning,
    noise: torch.Tensor,
    *,
    num_steps: int,
    eta: float,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
    chunk_size: int,
    on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
    autocast: Callable[[], object] | None = None,
    progress: bool = False,
    desc: str = "rollout",
) -> Rollout:
    """Samples ``len(noise)`` trajectories in chunks of ``chunk_size``.

    Args:
        policy: the policy to sample from (its trainable module in eval mode is the
            caller's concern).
        cond: conditioning, one row per sample.
        noise: initial latents ``[N, ...]``.
        num_steps: denoising steps.
        eta: SDE noise level (0 = deterministic ODE sampling).
        generator: RNG for the step noise of the whole batch, or
        row_generators: one RNG per sample (``len(noise)``): the rollout of a sample then
            does not depend on the chunking or on the other samples' draws.
        chunk_size: samples denoised together.
        on_chunk: called as ``on_chunk(rows, frames)`` after each chunk is decoded, with
            ``rows`` the chunk's slice of the batch and ``frames`` its ``uint8`` frames.
        autocast: context-manager factory wrapping model calls (mixed precision).
        progress: show a tqdm bar over chunks × steps.

    Returns:
        the :class:`Rollout`.
    """
    n = noise.shape[0]
    if len(cond) != n:
        raise ValueError(f"conditioning has {len(cond)} rows for {n} samples")
    if row_generators is not None and len(row_generators) != n:
        raise ValueError(f"{len(row_generators)} row generators for {n} samples")
    schedule = policy.schedule(num_steps)
    latents, log_probs, frames = [], [], []
    bar = tqdm(total=n * num_steps, desc=desc, unit="step", disable=not progress, leave=False)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        chunk_cond = cond.select(range(rows.start, rows.stop))
        x = noise[rows]
        steps, logps = [x], []
        for i in range(num_steps):
            with autocast() if autocast is not None else contextlib.nullcontext():
                if row_generators is None:
                    out = policy.denoise_step(
                        x, i, schedule, chunk_cond, eta=eta, generator=generator
                    )
                else:
                    out = denoise_step_row_noise(
                        policy,
                        x,
                        i,
                        schedule,
                        chunk_cond,
                        eta=eta,
                        generators=row_generators[rows],
                    )
            x = out.prev_sample
            steps.append(x)
            logps.append(out.log_prob.float())
            bar.update(rows.stop - rows.start)
        chunk_frames = policy.decode(x).cpu()
        if on_chunk is not None:
            on_chunk(rows, chunk_frames)
        latents.append(torch.stack(steps, dim=1))
        log_probs.append(torch.stack(logps, dim=1))
        frames.append(chunk_frames)
    bar.close()
    return Rollout(
        latents=torch.cat(latents),
        log_probs=torch.cat(log_probs),
        frames=torch.cat(frames),
        cond=cond,
        schedule=schedule,
    )
