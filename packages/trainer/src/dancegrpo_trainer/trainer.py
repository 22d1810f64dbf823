"""The GRPO training loop: rollout → remote rewards → advantages → updates, plus eval.

One :class:`Trainer` per process. Under ``torchrun`` / ``accelerate launch`` rank ``r``
takes the ``r``-th contiguous slice of the step's global prompt list (whole prompt groups,
``sampling.prompts_per_step`` each), rewards are gathered so that advantage statistics
and logged metrics cover the global batch, gradients are averaged across ranks once per
step (or, with ``train.fsdp``, reduce-scattered into parameter shards), and rank 0 writes
the run folder.

Every random draw of step ``s`` comes from a generator seeded by ``(run.seed, s, what,
global index)``: a group's initial noise by its global group index, a sample's SDE noise
by its global sample index, a micro-batch's timesteps by its global micro-batch index.
So N ranks × B/N prompts draw exactly what 1 rank × B prompts draws, and a resumed run
(with the saved model/optimiser/scheduler/sampler state) continues exactly where the
interrupted one would have, even with a different number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dancegrpo_trainer import distributed as dist_utils
from dancegrpo_trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dancegrpo_trainer.config import ConfigError, GRPOConfig, expand_env
from dancegrpo_trainer.core import (
    PerPromptStatTracker,
    best_of_n_indices,
    multi_reward_advantages,
)
from dancegrpo_trainer.data import (
    PromptSampler,
    load_condition_images,
    load_prompts,
    repeat_metadata,
    require_metadata,
)
from dancegrpo_trainer.policies.base import Conditioning, Policy
from dancegrpo_trainer.policy_factory import build_policy
from dancegrpo_trainer.rollout import (
    Rollout,
    derive_seed,
    group_parts,
    initial_noise,
    sample_rollout,
    seeded_generators,
)
from dancegrpo_trainer.run_logging import (
    MetricsLogger,
    format_kv,
    logger,
    plot_reward_curve,
    save_samples,
)
from dancegrpo_trainer.scoring import PendingScores, RewardScorer, Scores
from dancegrpo_trainer.update import (
    GradientAccumulator,
    GradNormMonitor,
    UpdateResult,
    grpo_update,
)
from dancegrpo_trainer.weights import EMA, ReferencePolicy, apply_lora


def _init_distributed() -> torch.device:
    """Joins the process group started by torchrun/accelerate (if any) via accelerate.

    Without CUDA, ``cpu=True`` makes accelerate join with gloo as a multi-CPU run; by
    default it would start torch's process group yet describe itself as one process.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.device


@dataclasses.dataclass
class _StepUpdate:
    """What a train step's update produced, over the global batch where it says so.

    Attributes:
        terms, outputs: the reward columns of the global batch (rank-major order).
        prompts: the global batch's prompts.
        advantages: float32 ``[global N]``, before any Best-of-N selection.
        keep: this rank's Best-of-N selection (local row indices), or ``None``.
        result: the optimiser step's diagnostics (this rank's).
        wait_s: seconds this rank was blocked waiting for rewards after the rollout.
    """

    terms: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    prompts: list[str]
    advantages: torch.Tensor
    keep: torch.Tensor | None
    result: UpdateResult
    wait_s: float


class Trainer:
    """Runs one GRPO training job described by a :class:`GRPOConfig`.

    Args:
        cfg: the validated configuration.
        policy: an already-built policy (default: built from ``cfg.model``).
        scorer: the reward scorer (default: gRPC clients for ``cfg.rewards.endpoints``).
    """

    def __init__(
        self,
        cfg: GRPOConfig,
        *,
        policy: Policy | None = None,
        scorer: RewardScorer | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = _init_distributed()
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        if cfg.train.fsdp and self.world < 2:
            raise ConfigError(
                "train.fsdp: needs a distributed launch with more than one process "
                f"(torchrun / accelerate launch); this run has {self.world}"
            )
        self.run_dir = Path(cfg.run.output_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        dist_utils.barrier()

        torch.manual_seed(cfg.run.seed)
        use_cache = cfg.data.embedding_cache is not None
        self.policy = policy or build_policy(
            cfg.model,
            self.device,
            load_text_encoders=not use_cache,
            mixed_precision=cfg.train.mixed_precision,
        )
        module = self.policy.trainable_module()
        if cfg.model.init_checkpoint:
            module.load_state_dict(load_file(cfg.model.init_checkpoint))
        self.lora = cfg.train.lora.enabled
        if self.lora:
            apply_lora(module, cfg.train.lora, self.policy.lora_target_modules)
        if cfg.train.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        dist_utils.broadcast_parameters(module)
        # model.dtype is for the frozen parts: trained weights stay float32 (master weights;
        # bf16 autocast does the compute on GPU). In bf16, AdamW steps of ~lr = 1e-5 round
        # away on almost every weight, so a bf16 full fine-tune would silently not train.
        for p in module.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        t = cfg.train
        if t.fsdp:
            dist_utils.shard_module(module, self.policy.fsdp_block_types())
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        warmup = t.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        self.reference = ReferencePolicy(module, self.lora) if t.kl_coef > 0 else None
        self.ema = EMA(module, t.ema_decay) if t.ema_decay > 0 else None
        self.grad_monitor = GradNormMonitor(t.grad_norm_window, t.skip_grad_norm_factor)
        self.trackers = {
            ep.label: PerPromptStatTracker(
                cfg.rewards.tracker_buffer_size,
                min(cfg.rewards.tracker_min_count, cfg.rewards.tracker_buffer_size),
            )
            for ep in cfg.rewards.endpoints
        }

        self.train_records = load_prompts(cfg.data.train_prompts, "data.train_prompts")
        self.eval_records = (
            load_prompts(cfg.data.eval_prompts, "data.eval_prompts")
            if cfg.data.eval_prompts
            else []
        )
        self._check_prompt_metadata()
        self.sampler = PromptSampler(len(self.train_records), cfg.run.seed, cfg.data.shuffle)
        self._cache = None
        if use_cache:
            from dancegrpo_trainer.embedding_cache import EmbeddingCache

            self._cache = EmbeddingCache(
                expand_env(cfg.data.embedding_cache, "data.embedding_cache")
            )
            # Fail now, not at the first eval hours in: every prompt must be cached.
            missing = [
                r.prompt
                for r in self.train_records + self.eval_records
                if r.prompt not in self._cache
            ]
            if missing:
                raise KeyError(
                    f"data.embedding_cache: {len(missing)} train/eval prompt(s) are not in "
                    f"{self._cache.path} (first: {missing[0]!r}); rerun `dancegrpo-train "
                    "preprocess --config ... --overwrite` (it caches train and eval prompts)"
                )

        self.scorer = scorer or RewardScorer(
            cfg.rewards.endpoints, outage_budget_s=cfg.rewards.outage_budget_s
        )
        self.weights = {ep.label: ep.weight for ep in cfg.rewards.endpoints}
        # The per-prompt tracker normalises over the whole global batch (a prompt may
        # recur in it), so its advantages exist only once every reward is in.
        self.pipelined = t.pipeline_update and cfg.rewards.advantage == "group"
        if t.pipeline_update and not self.pipelined and self.rank == 0:
            logger.info(
                "rewards.advantage=per_prompt needs every reward of the global batch: "
                "the update waits for all rewards (train.pipeline_update has no effect)"
            )
        self.metrics = MetricsLogger(self.run_dir, active=self.rank == 0)
        self.step = 0
        self._maybe_resume()

    # ------------------------------------------------------------------ helpers

    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        mp = self.cfg.train.mixed_precision
        if mp == "no" or self.device.type != "cuda":
            return contextlib.nullcontext
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)

    def _encode(self, prompts: Sequence[str], images: torch.Tensor | None) -> Conditioning:
        """Conditioning of ``prompts`` (and their ``uint8 [N,H,W,3]`` conditioning images).

        With an embedding cache the text part is looked up (the cache is keyed by prompt and
        holds text embeddings only) and the images are encoded now by the policy
        (``encode_condition_images``), then merged into the same rows.
        """
        with torch.no_grad():
            if self._cache is None:
                return self.policy.encode_prompts(list(prompts), images)
            cond = self._cache.lookup(list(prompts)).to(self.device)
            if images is None:
                return cond
            image_cond = self.policy.encode_condition_images(images)
        return Conditioning({**cond.tensors, **image_cond.tensors})

    def _progress(self) -> bool:
        return self.cfg.run.progress and self.rank == 0

    def _check_prompt_metadata(self) -> None:
        """Fails at start-up, not at the first reward call, when an endpoint sends metadata
        (``metadata: true``) and a train or eval prompt has none."""
        asking = [i for i, ep in enumerate(self.cfg.rewards.endpoints) if ep.metadata]
        if not asking:
            return
        where = f"rewards.endpoints[{asking[0]}].metadata"
        require_metadata(self.train_records, "data.train_prompts", where)
        require_metadata(self.eval_records, "data.eval_prompts", where)

    # ------------------------------------------------------------------ rewards

    def _score_rollout(
        self,
        prompts: Sequence[str],
        cond_images: torch.Tensor | None,
        metadata: Sequence[dict[str, Any] | None] | None,
        generate: Callable[[Callable[[slice, torch.Tensor], None]], Any],
        num_scored: int,
    ) -> tuple[Any, Scores | None, float, float]:
        """Runs ``generate(on_chunk)``, scoring the first ``num_scored`` rows as chunks finish
        (rows past them are padding, generated only to keep sharded forwards in lockstep).
        ``prompts``, ``cond_images`` and ``metadata`` (``None``: none) are per row.

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
            pending.append(
                self.scorer.submit(frames[: stop - rows.start], prompts[real], images, meta)
            )

        t0 = time.perf_counter()
        result = generate(on_chunk)
        t1 = time.perf_counter()
        scores = Scores.concat([p.result() for p in pending]) if pending else None
        return result, scores, t1 - t0, time.perf_counter() - t1

    def _reward_stats(self, terms: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict:
        total = sum(self.weights.values())
        combined = sum(self.weights[k] * terms[k] for k in terms) / total
        stats: dict[str, float] = {
            "reward_mean": float(np.mean(combined)),
            "reward_std": float(np.std(combined)),
        }
        for k, v in terms.items():
            stats[f"reward/{k}_mean"] = float(np.mean(v))
            stats[f"reward/{k}_std"] = float(np.std(v))
        for k, v in outputs.items():
            stats[f"output/{k}_mean"] = float(np.mean(v))
            stats[f"output/{k}_std"] = float(np.std(v))
        return stats

    @staticmethod
    def _gather_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = sorted(columns)
        local = torch.from_numpy(np.stack([columns[k] for k in keys], axis=1).astype(np.float32))
        full = dist_utils.all_gather_tensor(local).numpy()
        return {k: full[:, i] for i, k in enumerate(keys)}

    def _advantages(self, terms: dict[str, np.ndarray], prompts: list[str]) -> torch.Tensor:
        """Advantages of the global batch (terms already gathered, rank-major order)."""
        group_size = self.cfg.sampling.group_size
        tensors = {k: torch.from_numpy(v) for k, v in terms.items()}
        if self.cfg.rewards.advantage == "group":
            return multi_reward_advantages(tensors, self.weights, group_size=group_size)
        total = torch.zeros(len(prompts))
        for k, v in tensors.items():
            total += self.weights[k] * self.trackers[k].update(prompts, v)
        return total

    # ------------------------------------------------------------------ training

    def train_step(self) -> dict[str, Any]:
        """One optimisation step; returns its metrics record (``split = train``)."""
        cfg, s = self.cfg, self.cfg.sampling
        indices = self.sampler.next_indices(s.prompts_per_step * self.world)
        first_group = self.rank * s.prompts_per_step
        local = indices[first_group : first_group + s.prompts_per_step]
        records = [self.train_records[i] for i in local]
        group_images = load_condition_images(records)
        prompts = [r.prompt for r in records for _ in range(s.group_size)]
        metadata = repeat_metadata(records, s.group_size)
        repeat = torch.arange(len(records)).repeat_interleave(s.group_size)
        cond = self._encode([r.prompt for r in records], group_images).select(repeat)
        cond_images = group_images[repeat] if group_images is not None else None
        seed, step = cfg.run.seed, self.step
        groups = range(first_group, first_group + len(records))
        samples = range(first_group * s.group_size, (first_group + len(records)) * s.group_size)
        noise = initial_noise(
            self.policy,
            len(records),
            s.group_size,
            shared=s.shared_noise,
            group_generators=seeded_generators(groups, seed, step, "initial_noise"),
        )
        sde_generators = seeded_generators(samples, seed, step, "sde_noise")
        self.policy.trainable_module().eval()
        chunks: list[tuple[slice, PendingScores]] = []

        def on_chunk(rows: slice, frames: torch.Tensor) -> None:
            images = cond_images[rows] if cond_images is not None else None
            meta = metadata[rows] if metadata is not None else None
            chunks.append((rows, self.scorer.submit(frames, prompts[rows], images, meta)))

        t0 = time.perf_counter()
        rollout = sample_rollout(
            self.policy,
            cond,
            noise,
            num_steps=s.num_steps,
            eta=s.eta,
            row_generators=sde_generators,
            chunk_size=s.rollout_batch_size,
            on_chunk=on_chunk,
            autocast=self._autocast(),
            progress=self._progress(),
            desc=f"rollout {self.step + 1}",
        )
        t1 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        # Same on every rank (same chunking of the same number of samples), so all ranks
        # take the same path and issue the same collectives.
        parts = group_parts([rows.stop for rows, _ in chunks], s.group_size)
        if self.pipelined and sum(stop > start for start, stop in parts) > 1:
            out = self._update_as_scored(rollout, chunks, parts, prompts)
        else:  # one part holding every group has nothing to overlap with
            out = self._update_after_scoring(rollout, chunks, prompts)
        self.scheduler.step()
        if self.ema is not None and not out.result.skipped:
            self.ema.update()
        train_s = time.perf_counter() - t1 - out.wait_s

        self.step += 1
        record: dict[str, Any] = {"step": self.step, "split": "train"}
        record.update(self._reward_stats(out.terms, out.outputs))
        record.update(self._reduce_update_metrics(out.result.metrics))
        record.update(
            learning_rate=lr,
            advantage_abs_mean=float(out.advantages.abs().mean()),
            sample_s=t1 - t0,
            reward_wait_s=out.wait_s,
            train_s=train_s,
            samples=len(out.prompts),
        )
        self.metrics.log(record)
        every = cfg.run.sample_grid_every
        if self.rank == 0 and every and self.step % every == 0:
            frames = rollout.frames if out.keep is None else rollout.frames[out.keep]
            save_samples(
                frames.numpy(),
                self.run_dir / "samples" / f"train_{self.step:06d}.png",
                ncols=s.group_size,
                scale=max(1, 128 // cfg.model.width),
            )
        return record

    def _update_kwargs(self) -> dict[str, Any]:
        """This step's settings of :class:`GradientAccumulator` / :func:`grpo_update`."""
        seed, step = self.cfg.run.seed, self.step
        return {
            "cfg": self.cfg.train,
            "eta": self.cfg.sampling.eta,
            "timestep_generator": lambda k: torch.Generator().manual_seed(
                derive_seed(seed, step, "timesteps", k)
            ),
            "reference": self.reference,
            "autocast": self._autocast(),
            "progress": self._progress(),
        }

    def _update_after_scoring(
        self, rollout: Rollout, chunks: list[tuple[slice, PendingScores]], prompts: list[str]
    ) -> _StepUpdate:
        """Waits for every reward, computes advantages of the global batch, then updates.

        Needed by ``rewards.advantage=per_prompt`` (the tracker sees the whole global batch
        at once), selected by ``train.pipeline_update=false``, and used when the last chunk
        is the only one that completes groups (e.g. one group per rank): nothing to overlap.
        """
        s, bon = self.cfg.sampling, self.cfg.rewards.best_of_n
        t0 = time.perf_counter()
        scores = Scores.concat([pending.result() for _, pending in chunks])
        wait_s = time.perf_counter() - t0
        all_terms = self._gather_columns(scores.terms)
        all_outputs = self._gather_columns(scores.outputs)
        all_prompts = dist_utils.flatten(dist_utils.all_gather_object(prompts))
        adv_all = self._advantages(all_terms, all_prompts)
        n_local = len(prompts)
        advantages = adv_all[self.rank * n_local : (self.rank + 1) * n_local].to(self.device)
        keep = None
        if bon.enabled:
            keep = best_of_n_indices(
                advantages.cpu(), group_size=s.group_size, top_k=bon.top_k, bottom_k=bon.bottom_k
            )
            rollout, advantages = rollout.select(keep), advantages[keep.to(self.device)]
        result = grpo_update(
            self.policy,
            self.optimizer,
            rollout,
            advantages,
            **self._update_kwargs(),
            # Every rank holds the same number of samples (also after Best-of-N), so
            # this rank's slice of the global batch starts at rank * len(rollout).
            sample_offset=self.rank * len(rollout),
            grad_monitor=self.grad_monitor,
        )
        return _StepUpdate(all_terms, all_outputs, all_prompts, adv_all, keep, result, wait_s)

    def _update_as_scored(
        self,
        rollout: Rollout,
        chunks: list[tuple[slice, PendingScores]],
        parts: list[tuple[int, int]],
        prompts: list[str],
    ) -> _StepUpdate:
        """Accumulates each chunk's whole prompt groups as soon as that chunk is scored.

        Group advantages (and Best-of-N's per-group selection) need only the group's own
        rewards, and the parameters do not move before the single optimiser step, so the
        gradient of a group is the same whenever it is computed: the remaining reward calls
        overlap with the backward passes of the groups already scored. Chunks are taken in
        order (a FIFO service answers in that order anyway), which keeps the step's
        arithmetic independent of reply timing, so runs and resumes stay bit-reproducible.
        Rewards are gathered across ranks afterwards, for logging only.

        ``parts``: the row range of the groups each chunk completes (:func:`group_parts`).
        """
        g, bon = self.cfg.sampling.group_size, self.cfg.rewards.best_of_n
        kept_per_group = bon.top_k + bon.bottom_k if bon.enabled else g
        n_train = len(rollout) // g * kept_per_group
        acc = GradientAccumulator(
            self.policy, self.optimizer, num_samples=n_train, **self._update_kwargs()
        )
        scored: list[Scores] = []
        advantages = torch.zeros(len(rollout))
        keeps: list[torch.Tensor] = []
        wait_s = 0.0
        for (_, pending), (start, stop) in zip(chunks, parts, strict=True):
            t0 = time.perf_counter()
            scored.append(pending.result())
            wait_s += time.perf_counter() - t0
            if start == stop:
                continue
            terms = Scores.concat(scored).terms
            adv = multi_reward_advantages(
                {k: torch.from_numpy(v[start:stop]) for k, v in terms.items()},
                self.weights,
                group_size=g,
            )
            advantages[start:stop] = adv
            part = rollout.rows(start, stop)
            if bon.enabled:
                keep = best_of_n_indices(adv, group_size=g, top_k=bon.top_k, bottom_k=bon.bottom_k)
                part, adv = part.select(keep), adv[keep]
                keeps.append(keep + start)
            offset = self.rank * n_train + start // g * kept_per_group
            acc.accumulate(part, adv.to(self.device), sample_offset=offset)
        result = acc.step(self.grad_monitor)
        scores = Scores.concat(scored)
        return _StepUpdate(
            terms=self._gather_columns(scores.terms),
            outputs=self._gather_columns(scores.outputs),
            prompts=dist_utils.flatten(dist_utils.all_gather_object(prompts)),
            advantages=dist_utils.all_gather_tensor(advantages),
            keep=torch.cat(keeps) if bon.enabled else None,
            result=result,
            wait_s=wait_s,
        )

    def _reduce_update_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return metrics
        gathered = dist_utils.all_gather_object(metrics)
        out = {k: float(np.mean([g[k] for g in gathered])) for k in metrics}
        out["ratio_min"] = min(g["ratio_min"] for g in gathered)
        out["ratio_max"] = max(g["ratio_max"] for g in gathered)
        return out

    # ------------------------------------------------------------------ eval

    def evaluate(self, save_as: Path | None = None) -> dict[str, Any]:
        """Scores fixed held-out prompts with fixed seeds and ``eval.eta`` (0: deterministic).

        Rank ``r`` samples rows ``r, r + world, ...``; the initial noise of every row comes
        from one generator seeded with ``eval.seed`` and its SDE noise (``eval.eta > 0``)
        from a generator per row, so results do not depend on the number of ranks. Logged with ``split = eval``; returns the record.

        With ``train.fsdp`` every rank samples the same number of rows (each forward is a
        collective): ranks short of a row sample a copy of one, which is neither scored
        nor gathered.
        """
        cfg, e = self.cfg, self.cfg.eval
        if not self.eval_records:
            raise ValueError("data.eval_prompts is empty: nothing to evaluate")
        k = e.samples_per_prompt
        all_prompts = [r.prompt for r in self.eval_records for _ in range(k)]
        all_metadata = repeat_metadata(self.eval_records, k)
        all_images = load_condition_images(self.eval_records)
        repeat_all = torch.arange(len(self.eval_records)).repeat_interleave(k)
        noise_all = self.policy.initial_noise(
            len(all_prompts), generator=torch.Generator().manual_seed(e.seed)
        )
        rows = list(range(self.rank, len(all_prompts), self.world))
        sampled = list(rows)
        if cfg.train.fsdp:
            pad = -(-len(all_prompts) // self.world) - len(rows)
            sampled += [rows[0] if rows else 0] * pad
        prompts = [all_prompts[i] for i in sampled]
        metadata = [all_metadata[i] for i in sampled] if all_metadata is not None else None
        idx = repeat_all[sampled]
        images = all_images[idx] if all_images is not None else None
        frames = torch.empty(0)
        scores = None
        if sampled:
            cond = self._encode([self.eval_records[i].prompt for i in idx.tolist()], images)
            row_generators = seeded_generators(sampled, e.seed, "eval_sde_noise")
            module = self.policy.trainable_module()
            module.eval()
            ema = self.ema.active() if self.ema is not None else contextlib.nullcontext()

            def generate(on_chunk: Callable[[slice, torch.Tensor], None]) -> Any:
                with ema:
                    return sample_rollout(
                        self.policy,
                        cond,
                        noise_all[sampled],
                        num_steps=cfg.sampling.num_steps,
                        eta=e.eta,
                        row_generators=row_generators,
                        chunk_size=cfg.sampling.rollout_batch_size,
                        on_chunk=on_chunk,
                        autocast=self._autocast(),
                        progress=self._progress(),
                        desc="eval",
                    )

            rollout, scores, _, _ = self._score_rollout(
                prompts, images, metadata, generate, len(rows)
            )
            frames = rollout.frames[: len(rows)]
        parts = dist_utils.all_gather_object(
            (rows, scores.terms if scores else {}, scores.outputs if scores else {}, frames)
        )
        order = np.argsort(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]))
        terms = {
            key: np.concatenate([p[1][key] for p in parts if p[0]])[order] for key in self.weights
        }
        outputs_keys = next(p[2].keys() for p in parts if p[0])
        outputs = {
            key: np.concatenate([p[2][key] for p in parts if p[0]])[order] for key in outputs_keys
        }
        record: dict[str, Any] = {"step": self.step, "split": "eval"}
        record.update(self._reward_stats(terms, outputs))
        record["samples"] = len(all_prompts)
        self.metrics.log(record)
        if self.rank == 0:
            all_frames = torch.cat([p[3] for p in parts if p[0]])[torch.from_numpy(order)]
            path = save_as or self.run_dir / "samples" / f"eval_{self.step:06d}.png"
            save_samples(
                all_frames.numpy(), path, ncols=k * 2, scale=max(1, 128 // cfg.model.width)
            )
        return record

    # ------------------------------------------------------------------ loop

    def train(self) -> list[dict[str, Any]]:
        """Runs until ``run.max_steps``; returns the eval records of this call."""
        cfg = self.cfg
        evals = []
        if self.eval_records and self.step == 0:
            evals.append(self._log_eval(self.evaluate()))
        while self.step < cfg.run.max_steps:
            record = self.train_step()
            if self.rank == 0:
                logger.info(format_kv({k: v for k, v in record.items() if "/" not in k}))
            last = self.step == cfg.run.max_steps
            if self.eval_records and (self.step % cfg.eval.every_steps == 0 or last):
                evals.append(self._log_eval(self.evaluate()))
            ce = cfg.run.checkpoint_every
            if (ce and self.step % ce == 0) or last:
                self.save()
        if self.rank == 0 and self.metrics.path.is_file():
            plot_reward_curve(self.metrics.path, self.run_dir / "reward_curve.png")
        return evals

    def _log_eval(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.rank == 0:
            logger.info(format_kv({k: v for k, v in record.items() if "/" not in k}))
        return record

    def trainer_state(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "grad_monitor": self.grad_monitor.state_dict(),
            "trackers": {k: t.state_dict() for k, t in self.trackers.items()},
            "world_size": self.world,
            "global_prompts_per_step": self.cfg.sampling.prompts_per_step * self.world,
        }

    def save(self) -> Path:
        """Writes a checkpoint of the current step (collective: call on every rank)."""
        path = save_checkpoint(
            self.run_dir,
            self.step,
            module=self.policy.trainable_module(),
            lora=self.lora,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.trainer_state(),
            extra_tensors=self.ema.state_dict() if self.ema is not None else None,
            keep=self.cfg.run.keep_checkpoints,
        )
        if self.rank == 0:
            logger.info(f"checkpoint step={self.step} path={path}")
        return path

    def _maybe_resume(self) -> None:
        resume = self.cfg.run.resume
        if resume == "never":
            return
        if resume == "auto":
            found = list_checkpoints(self.run_dir)
            if not found:
                return
            path = found[-1]
        else:
            path = Path(resume)
        state, extra = load_checkpoint(
            path,
            module=self.policy.trainable_module(),
            lora=self.lora,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        # Sampling does not depend on the rank layout, only on the global prompts per step.
        pps = self.cfg.sampling.prompts_per_step
        saved = state.get("global_prompts_per_step", state.get("world_size", self.world) * pps)
        if saved != pps * self.world:
            raise ValueError(
                f"checkpoint {path} was trained on {saved} prompts per step; with "
                f"{self.world} processes set sampling.prompts_per_step={saved / self.world:g} "
                "to continue it (or run.resume=never to start over)"
            )
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.grad_monitor.load_state_dict(state["grad_monitor"])
        for k, t in self.trackers.items():
            t.load_state_dict(state["trackers"][k])
        if self.ema is not None:
            self.ema.load_state_dict(extra)
        self.metrics.truncate_after(self.step)
        if self.rank == 0:
            logger.info(f"resumed step={self.step} from={path}")

    def close(self) -> None:
        self.metrics.close()
        self.scorer.close()


def run_summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """First/last eval ``reward_mean`` and the relative change."""
    first, last = records[0]["reward_mean"], records[-1]["reward_mean"]
    change = (last - first) / abs(first) if first else math.inf
    return {"eval_reward_before": first, "eval_reward_after": last, "relative_change": change}


__all__ = ["Trainer", "run_summary"]
