"""Held-out evaluation of a :class:`~dancegrpo_trainer.trainer.Trainer`'s policy: fixed
prompts, fixed seeds, ``eval.eta`` (0: deterministic) with ``sampling.sampler``, at the
eval resolution (``eval.height/width``, default the training one), scored remotely as
chunks finish, gathered over ranks in prompt order, logged with ``split = eval``.

Routed runs (``data.sources``) score each eval prompt with its source's rewards and log
``source/<name>/...`` too. Group-wise rewards are not called in eval: a win rate within a
group always averages ½, so it says nothing about progress; eval reports the per-sample
terms (a run whose terms are all group-wise logs eval samples without a reward).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dancegrpo_trainer import distributed as dist_utils
from dancegrpo_trainer.data import load_condition_images, repeat_metadata
from dancegrpo_trainer.rollout import RolloutPlan, sample_rollout, seeded_generators
from dancegrpo_trainer.run_logging import save_samples
from dancegrpo_trainer.scoring import RewardScorer, Scores

if TYPE_CHECKING:
    from dancegrpo_trainer.trainer import Trainer


def score_rollout(
    scorer: RewardScorer,
    prompts: Sequence[str],
    cond_images: torch.Tensor | None,
    metadata: Sequence[dict[str, Any] | None] | None,
    generate: Callable[[Callable[[slice, torch.Tensor], None]], Any],
    num_scored: int,
    routes: Sequence[dict[str, float]] | None = None,
) -> tuple[Any, Scores | None, float, float]:
    """Runs ``generate(on_chunk)``, scoring the first ``num_scored`` rows as chunks finish
    (rows past them are padding, generated only to keep sharded forwards in lockstep).
    ``prompts``, ``cond_images``, ``metadata`` and ``routes`` (``None``: none; see
    :meth:`RewardScorer.submit`) are per row.

    Returns ``(generate's result, scores or None if nothing was scored, sample_s,
    reward_wait_s)``.
    """
    pending = []

    def on_chunk(rows: slice, frames: torch.Tensor) -> None:
        stop = min(rows.stop, num_scored)
        if stop <= rows.start:
            return
        real = slice(rows.start, stop)
        images = cond_images[real] if cond_images is not None else None
        meta = metadata[real] if metadata is not None else None
        extra = {"routes": routes[real]} if routes is not None else {}
        pending.append(
            scorer.submit(frames[: stop - rows.start], prompts[real], images, meta, **extra)
        )

    t0 = time.perf_counter()
    result = generate(on_chunk)
    t1 = time.perf_counter()
    scores = Scores.concat([p.result() for p in pending]) if pending else None
    return result, scores, t1 - t0, time.perf_counter() - t1


def evaluate(trainer: Trainer, save_as: Path | None = None) -> dict[str, Any]:
    """Scores fixed held-out prompts with fixed seeds and ``eval.eta`` (0: deterministic).

    Rank ``r`` samples rows ``r, r + world, ...``; the initial noise of every row comes
    from one generator seeded with ``eval.seed`` and its SDE noise (``eval.eta > 0``)
    from a generator per row, so results do not depend on the number of ranks. Logged with ``split = eval``; returns the record.

    With ``train.fsdp`` every rank samples the same number of rows (each forward is a
    collective): ranks short of a row sample a copy of one, which is neither scored
    nor gathered.
    """
    cfg, e, policy = trainer.cfg, trainer.cfg.eval, trainer.eval_policy
    if not trainer.eval_records:
        raise ValueError("data.eval_prompts is empty: nothing to evaluate")
    k = e.samples_per_prompt
    all_prompts = [r.prompt for r in trainer.eval_records for _ in range(k)]
    all_metadata = repeat_metadata(trainer.eval_records, k)
    all_images = load_condition_images(trainer.eval_records)
    repeat_all = torch.arange(len(trainer.eval_records)).repeat_interleave(k)
    noise_all = policy.initial_noise(
        len(all_prompts), generator=torch.Generator().manual_seed(e.seed)
    )
    rows = list(range(trainer.rank, len(all_prompts), trainer.world))
    sampled = list(rows)
    if cfg.train.fsdp:
        pad = -(-len(all_prompts) // trainer.world) - len(rows)
        sampled += [rows[0] if rows else 0] * pad
    prompts = [all_prompts[i] for i in sampled]
    metadata = [all_metadata[i] for i in sampled] if all_metadata is not None else None
    routes = eval_routes(trainer)
    if routes is not None:
        routes = [routes[i // k] for i in sampled]
    idx = repeat_all[sampled]
    images = all_images[idx] if all_images is not None else None
    frames = torch.empty(0)
    scores = None
    if sampled:
        cond = trainer._encode(
            [trainer.eval_records[i].prompt for i in idx.tolist()], images, policy
        )
        row_generators = seeded_generators(sampled, e.seed, "eval_sde_noise")
        module = trainer.policy.trainable_module()
        module.eval()
        ema = trainer.ema.active() if trainer.ema is not None else contextlib.nullcontext()

        def generate(on_chunk: Callable[[slice, torch.Tensor], None]) -> Any:
            with ema:
                return sample_rollout(
                    policy,
                    cond,
                    noise_all[sampled],
                    plan=RolloutPlan(
                        policy.schedule(cfg.sampling.num_steps),
                        sampler=cfg.sampling.sampler,
                    ),
                    eta=e.eta,
                    row_generators=row_generators,
                    chunk_size=cfg.sampling.rollout_batch_size,
                    on_chunk=on_chunk,
                    autocast=trainer._autocast(),
                    progress=trainer._progress(),
                    desc="eval",
                )

        rollout, scores, _, _ = score_rollout(
            trainer.scorer, prompts, images, metadata, generate, len(rows), routes
        )
        frames = rollout.frames[: len(rows)]
    parts = dist_utils.all_gather_object(
        (
            rows,
            scores.terms if scores else {},
            scores.outputs if scores else {},
            frames,
            scores.weights if scores else None,
        )
    )
    order = np.argsort(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]))

    def merged(index: int) -> dict[str, np.ndarray]:
        keys = next(p[index].keys() for p in parts if p[0])
        return {key: np.concatenate([p[index][key] for p in parts if p[0]])[order] for key in keys}

    terms, outputs = merged(1), merged(2)
    weights = merged(4) if routes is not None else None
    sources = None
    if trainer.routing.routed:
        sources = [trainer.eval_records[i // k].source for i in range(len(all_prompts))]
    record: dict[str, Any] = {"step": trainer.step, "split": "eval"}
    record.update(trainer.advantages.stats(terms, outputs, weights, sources))
    record["samples"] = len(all_prompts)
    trainer.metrics.log(record)
    if trainer.rank == 0:
        all_frames = torch.cat([p[3] for p in parts if p[0]])[torch.from_numpy(order)]
        path = save_as or trainer.run_dir / "samples" / f"eval_{trainer.step:06d}.png"
        scale = max(1, 128 // cfg.eval_size()[1])
        save_samples(all_frames.numpy(), path, ncols=k * 2, scale=scale)
    return record


def eval_routes(trainer: Trainer) -> list[dict[str, float]] | None:
    """Per eval prompt, the per-sample terms that score it (group-wise ones left out:
    their group mean is always ½); ``None`` when every term scores every prompt."""
    group_wise = (
        trainer.scorer.group_wise_labels()
        if hasattr(trainer.scorer, "group_wise_labels")
        else set()
    )
    if not trainer.routing.routed and not group_wise:
        return None
    return [
        {k: w for k, w in trainer.routing.route(r).items() if k not in group_wise}
        for r in trainer.eval_records
    ]
