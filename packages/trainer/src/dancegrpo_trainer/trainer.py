"""The training loop: prompts → rollout (policy + sampler + SDE window) → remote rewards →
advantages → the algorithm's loss → optimiser, plus eval.

The loop holds no algorithm-specific code: ``train.algorithm`` picks an
:class:`~dancegrpo_trainer.algorithms.base.Algorithm` (what the rollout records and
keeps, the loss on stored trajectories), ``windows.rollout_plan`` the step's SDE window,
``scored_update`` turns scored chunks into advantages and one optimiser step, and
``trainer_eval`` runs held-out evaluation.

One :class:`Trainer` per process. Under ``torchrun`` / ``accelerate launch`` rank ``r``
takes the ``r``-th contiguous slice of the step's global prompt list (whole prompt groups,
``sampling.prompts_per_step`` each), rewards are gathered so that advantage statistics
and logged metrics cover the global batch, gradients are averaged across ranks once per
step (or, with ``train.fsdp``, reduce-scattered into parameter shards), and rank 0 writes
the run folder.

Every random draw of step ``s`` comes from a generator seeded by ``(run.seed, s, what,
global index)``: a group's initial noise by its global group index, a sample's SDE noise
by its global sample index, a micro-batch's training terms (GRPO: timesteps) by its
global micro-batch index, a step's SDE window by the step alone.
So N ranks × B/N prompts draw exactly what 1 rank × B prompts draws, and a resumed run
(with the saved model/optimiser/scheduler/sampler state) continues exactly where the
interrupted one would have, even with a different number of ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dancegrpo_trainer import distributed as dist_utils
from dancegrpo_trainer.algorithms import algorithm_class
from dancegrpo_trainer.algorithms.base import check_ode_rollout_sampling
from dancegrpo_trainer.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from dancegrpo_trainer.config import ConfigError, GRPOConfig, expand_env
from dancegrpo_trainer.data import (
    load_condition_images,
    load_prompt_sets,
    prompt_sampler,
    repeat_metadata,
    require_metadata,
)
from dancegrpo_trainer.policies.base import Conditioning, Policy
from dancegrpo_trainer.policy_factory import build_policy
from dancegrpo_trainer.rollout import (
    derive_seed,
    group_parts,
    initial_noise,
    sample_rollout,
    seeded_generators,
)
from dancegrpo_trainer.routing import RewardRouting
from dancegrpo_trainer.run_logging import (
    MetricsLogger,
    RunProgress,
    logger,
    plot_reward_curve,
    save_samples,
)
from dancegrpo_trainer.scored_update import (
    RewardAdvantages,
    update_after_scoring,
    update_as_scored,
)
from dancegrpo_trainer.scoring import ChunkSubmitter, RewardScorer
from dancegrpo_trainer.trainer_eval import evaluate
from dancegrpo_trainer.update import (
    GradientAccumulator,
    GradNormMonitor,
    UpdateResult,
    policy_update,
)
from dancegrpo_trainer.weights import EMA, ReferencePolicy, apply_lora
from dancegrpo_trainer.windows import check_windows_train, rollout_plan


def _init_distributed() -> torch.device:
    """Joins the process group started by torchrun/accelerate (if any) via accelerate.

    Without CUDA, ``cpu=True`` makes accelerate join with gloo as a multi-CPU run; by
    default it would start torch's process group yet describe itself as one process.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.device


class Trainer:
    """Runs one training job described by a :class:`GRPOConfig`.

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
            cfg_free=cfg.train.cfg_free,
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
        self.algorithm = algorithm_class(t.algorithm)(
            t, self.policy, reference=self.reference, autocast=self._autocast()
        )
        self.spec = self.algorithm.rollout_spec()
        if self.spec.stochastic == "none":
            # Deterministic rollouts: a group's spread can only come from its initial noise.
            check_ode_rollout_sampling(cfg.sampling, t.algorithm)
        else:  # fail now, not at the first train step whose window trains nothing
            check_windows_train(self.policy, cfg.sampling, t.skip_last_timestep)
        # eval.height/width: the same policy (shared modules) sampling at the eval size.
        self.eval_policy = self.policy
        if cfg.eval.height is not None or cfg.eval.width is not None:
            try:
                self.eval_policy = self.policy.at_resolution(*cfg.eval_size())
            except ValueError as e:
                raise ConfigError(f"eval.height/eval.width: {e}") from e
        self.grad_monitor = GradNormMonitor(t.grad_norm_window, t.skip_grad_norm_factor)
        self.advantages = RewardAdvantages(
            cfg.rewards, cfg.sampling.group_size, drop_constant_groups=t.drop_constant_groups
        )

        self.train_records, self.eval_records = load_prompt_sets(cfg.data)
        self.routing = RewardRouting(cfg.rewards.endpoints, cfg.data.sources)
        self._check_prompt_metadata()
        self.sampler = prompt_sampler(cfg.data, self.train_records, cfg.run.seed)
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
        # The per-prompt tracker normalises over the whole global batch (a prompt may
        # recur in it), so its advantages exist only once every reward is in.
        self.pipelined = t.pipeline_update and cfg.rewards.advantage == "group"
        if t.pipeline_update and not self.pipelined and self.rank == 0:
            logger.info(
                "rewards.advantage=per_prompt needs every reward of the global batch: "
                "the update waits for all rewards (train.pipeline_update has no effect)"
            )
        self.metrics = MetricsLogger(self.run_dir, active=self.rank == 0)
        self.console = RunProgress(
            cfg.run.max_steps,
            active=self.rank == 0,
            bar=cfg.run.progress,
            log_every=cfg.run.log_every,
        )
        self.step = 0
        self._maybe_resume()

    # ------------------------------------------------------------------ helpers

    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        mp = self.cfg.train.mixed_precision
        if mp == "no" or self.device.type != "cuda":
            return contextlib.nullcontext
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)

    def _encode(
        self, prompts: Sequence[str], images: torch.Tensor | None, policy: Policy | None = None
    ) -> Conditioning:
        """Conditioning of ``prompts`` (and their ``uint8 [N,H,W,3]`` conditioning images)
        for ``policy`` (default: the trained one; eval passes ``eval_policy``, whose
        conditioning images are encoded at the eval size).

        With an embedding cache the text part is looked up (the cache is keyed by prompt and
        holds text embeddings only) and the images are encoded now by the policy
        (``encode_condition_images``), then merged into the same rows.
        """
        policy = policy or self.policy
        with torch.no_grad():
            if self._cache is None:
                return policy.encode_prompts(list(prompts), images)
            cond = self._cache.lookup(list(prompts)).to(self.device)
            if images is None:
                return cond
            image_cond = policy.encode_condition_images(images)
        return Conditioning({**cond.tensors, **image_cond.tensors})

    def _progress(self) -> bool:
        return self.rank == 0 and self.console.inner_bars

    def _check_prompt_metadata(self) -> None:
        """Fails at start-up, not at the first reward call, when an endpoint sends metadata
        (``metadata: true``) and a train or eval prompt it scores has none."""
        for i, ep in enumerate(self.cfg.rewards.endpoints):
            if not ep.metadata:
                continue
            where = f"rewards.endpoints[{i}].metadata"
            for records, key in (
                (self.train_records, "train_prompts"),
                (self.eval_records, "eval_prompts"),
            ):
                for source in dict.fromkeys(r.source for r in records):
                    field = (
                        f"data.{key}"
                        if source is None
                        else f"data.sources[{self.routing.sources.index(source)}].{key}"
                    )
                    scored = [
                        r
                        for r in records
                        if r.source == source and ep.label in self.routing.route(r)
                    ]
                    require_metadata(scored, field, where)

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
        plan = rollout_plan(
            self.policy,
            s,
            step=step,
            seed=seed,
            skip_last=cfg.train.skip_last_timestep,
            stochastic=self.spec.stochastic,
            ode_solver=self.spec.ode_solver,
        )
        self.policy.trainable_module().eval()
        submitter = ChunkSubmitter(
            self.scorer,
            s.group_size,
            prompts,
            condition_images=cond_images,
            metadata=metadata,
            routes=self.routing.sample_routes(records, s.group_size),
        )
        chunks = submitter.chunks  # (rows, pending scores), whole groups when group-wise

        t0 = time.perf_counter()
        # The algorithm's sampling weights (DiffusionNFT: its old policy).
        with self.algorithm.rollout_weights():
            rollout = sample_rollout(
                self.policy,
                cond,
                noise,
                plan=plan,
                eta=s.eta,
                row_generators=sde_generators,
                chunk_size=s.rollout_batch_size,
                on_chunk=submitter,
                autocast=self._autocast(),
                progress=self._progress(),
                desc=f"rollout {self.step + 1}",
                keep=self.spec.keep,
                group_size=s.group_size,
            )
        t1 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        # Same on every rank (same chunking of the same number of samples), so all ranks
        # take the same path and issue the same collectives.
        parts = group_parts([rows.stop for rows, _ in chunks], s.group_size)
        common = dict(advantages=self.advantages, best_of_n=cfg.rewards.best_of_n, rank=self.rank)
        if self.pipelined and sum(stop > start for start, stop in parts) > 1:
            out = update_as_scored(
                rollout,
                chunks,
                parts,
                prompts,
                **common,
                accumulator=lambda n: GradientAccumulator(
                    self.policy,
                    self.optimizer,
                    num_samples=n,
                    partial=cfg.train.drop_constant_groups,
                    **self._update_kwargs(),
                ),
                grad_monitor=self.grad_monitor,
            )
        else:  # one part holding every group has nothing to overlap with
            out = update_after_scoring(
                rollout,
                chunks,
                prompts,
                **common,
                update=lambda batch, adv, offset, keep: policy_update(
                    self.policy,
                    self.optimizer,
                    batch,
                    adv,
                    **self._update_kwargs(),
                    sample_offset=offset,
                    keep=keep,
                    grad_monitor=self.grad_monitor,
                ),
            )
        self.scheduler.step()
        if self.ema is not None and not out.result.skipped:
            self.ema.update()
        train_s = time.perf_counter() - t1 - out.wait_s

        self.step += 1
        record: dict[str, Any] = {"step": self.step, "split": "train"}
        sources = None
        if self.routing.routed:  # per-sample source names of the global batch
            local_sources = [r.source for r in records for _ in range(s.group_size)]
            sources = dist_utils.flatten(dist_utils.all_gather_object(local_sources))
        record.update(self.advantages.stats(out.terms, out.outputs, out.weights, sources))
        record.update(self._reduce_update_metrics(out.result))
        record.update(
            learning_rate=lr,
            advantage_abs_mean=float(out.advantages.abs().mean()),
            sample_s=t1 - t0,
            reward_wait_s=out.wait_s,
            train_s=train_s,
            samples=len(out.prompts),
        )
        if cfg.train.drop_constant_groups:
            dropped = self.advantages.constant_groups(out.terms, out.weights)
            record["groups_dropped_frac"] = float(dropped.mean())
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
        """This step's settings of :class:`GradientAccumulator` / :func:`policy_update`."""
        seed, step = self.cfg.run.seed, self.step
        return {
            "cfg": self.cfg.train,
            "algorithm": self.algorithm,
            "timestep_generator": lambda k: torch.Generator().manual_seed(
                derive_seed(seed, step, "timesteps", k)
            ),
            "progress": self._progress(),
        }

    def _reduce_update_metrics(self, result: UpdateResult) -> dict[str, float]:
        """The update metrics over ranks: means, or the algorithm's min/max reductions."""
        metrics = result.metrics
        if self.world == 1:
            return metrics
        gathered = dist_utils.all_gather_object(metrics)
        # A rank may lack a metric (every one of its groups dropped): its weighted share
        # of a mean is then 0, and it takes no part in a min/max.
        keys = list(dict.fromkeys(k for g in gathered for k in g))
        out = {k: float(np.mean([g.get(k, 0.0) for g in gathered])) for k in keys}
        for key, how in result.reductions.items():
            if key in out:
                out[key] = (min if how == "min" else max)(g[key] for g in gathered if key in g)
        return out

    # ------------------------------------------------------------------ eval

    def evaluate(self, save_as: Path | None = None) -> dict[str, Any]:
        """Scores fixed held-out prompts with fixed seeds (:func:`trainer_eval.evaluate`);
        logs the record (``split = eval``) and returns it."""
        return evaluate(self, save_as)

    # ------------------------------------------------------------------ loop

    def train(
        self, until: Callable[[list[dict[str, Any]]], bool] | None = None
    ) -> list[dict[str, Any]]:
        """Runs until ``run.max_steps``, or until ``until(evals)`` is true after an eval
        (``evals``: the eval records of this call so far; the run then ends there, with
        a checkpoint); returns the eval records of this call. Every rank sees the same
        (gathered) eval records, so an ``until`` that depends on them alone stops every
        rank at the same step."""
        cfg = self.cfg
        evals: list[dict[str, Any]] = []
        self.console.begin(self.step)
        if self.eval_records and self.step == 0:
            evals.append(self._log_eval(self.evaluate()))
        while self.step < cfg.run.max_steps:
            self.console.train(self.train_step())
            last = self.step == cfg.run.max_steps
            if self.eval_records and (self.step % cfg.eval.every_steps == 0 or last):
                evals.append(self._log_eval(self.evaluate()))
                last = last or (until is not None and until(evals))
            ce = cfg.run.checkpoint_every
            if (ce and self.step % ce == 0) or last:
                self.save()
            if last:
                break
        self.console.close()
        if self.rank == 0 and self.metrics.path.is_file():
            plot_reward_curve(self.metrics.path, self.run_dir / "reward_curve.png")
        return evals

    def _log_eval(self, record: dict[str, Any]) -> dict[str, Any]:
        self.console.eval(record)
        return record

    def trainer_state(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "grad_monitor": self.grad_monitor.state_dict(),
            "trackers": self.advantages.state_dict(),
            "world_size": self.world,
            "global_prompts_per_step": self.cfg.sampling.prompts_per_step * self.world,
        }

    def _extra_tensors(self) -> dict[str, torch.Tensor] | None:
        """EMA shadow weights and the algorithm's state, saved beside the model."""
        extra = {**(self.ema.state_dict() if self.ema is not None else {})}
        extra.update(self.algorithm.state_dict())
        return extra or None

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
            extra_tensors=self._extra_tensors(),
            keep=self.cfg.run.keep_checkpoints,
        )
        self.console.checkpoint(self.step, path)
        return path

    def _maybe_resume(self) -> None:
        path = resume_checkpoint(self.run_dir, self.cfg.run.resume)
        if path is None:  # a fresh start: drop the rows of an earlier attempt
            self.metrics.truncate_after(-1)
            return
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
        self.advantages.load_state_dict(state["trackers"])
        if self.ema is not None:
            self.ema.load_state_dict(extra)
        self.algorithm.load_state_dict(extra)
        self.metrics.truncate_after(self.step)
        if self.rank == 0:
            logger.info(f"resumed step={self.step} from={path}")

    def close(self) -> None:
        self.console.close()
        self.metrics.close()
        self.scorer.close()


def run_summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """First/last eval ``reward_mean`` and the relative change."""
    first, last = records[0]["reward_mean"], records[-1]["reward_mean"]
    change = (last - first) / abs(first) if first else math.inf
    return {"eval_reward_before": first, "eval_reward_after": last, "relative_change": change}


__all__ = ["Trainer", "run_summary"]
