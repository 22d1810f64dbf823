"""Command lines: ``dancegrpo-train`` and ``dancegrpo-sample``.

    dancegrpo-train --config FILE [key=value ...]                 train (resumes by default)
    dancegrpo-train preprocess --config FILE [--prompts FILE ...] [--out DIR] [--overwrite]
    dancegrpo-sample --config FILE --prompts FILE --out DIR [--n N] [--endpoint I]
                     [--checkpoint DIR] [key=value ...]

``dancegrpo-sample`` is Best-of-N inference: N samples per prompt (deterministic given
``--seed``) with the config's ``sampling.sampler`` at ``sampling.eta`` (``--eta``), every
step stochastic (a training SDE window says which steps train, not how to sample), scored
by one reward endpoint of the config, the best kept and written as PNGs plus
``results.json`` (prompt, file, best score, all N scores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dancegrpo_trainer.config import ConfigError, expand_env, load_config


def _parse_train(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dancegrpo-train", description="GRPO training.")
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p.parse_args(argv)


def _parse_preprocess(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dancegrpo-train preprocess", description="Precompute prompt embeddings."
    )
    p.add_argument("--config", required=True)
    p.add_argument(
        "--prompts",
        nargs="+",
        help=".txt or .jsonl prompt files (default: the config's data.train_prompts and "
        "data.eval_prompts: training reads both from the cache)",
    )
    p.add_argument("--out", help="embedding cache folder (default: data.embedding_cache)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dancegrpo-train``."""
    from dancegrpo_trainer import distributed as dist_utils
    from dancegrpo_trainer.run_logging import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "preprocess":
            return _preprocess(_parse_preprocess(argv[1:]))
        args = _parse_train(argv)
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"dancegrpo-train: {e}", file=sys.stderr)
        return 2
    # Before the Trainer: it logs while it starts (e.g. the step it resumed at). The process
    # group does not exist yet, so the rank comes from the launcher's environment.
    setup_logging(int(os.environ.get("RANK", dist_utils.rank())))
    from dancegrpo_trainer.checkpoint_integrity import CheckpointError
    from dancegrpo_trainer.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except CheckpointError as e:
        print(f"dancegrpo-train: {e}", file=sys.stderr)
        return 1
    try:
        trainer.train()
    finally:
        trainer.close()
    dist_utils.shutdown()
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from dancegrpo_trainer.data import load_prompt_sets, load_prompts
    from dancegrpo_trainer.embedding_cache import precompute_embeddings
    from dancegrpo_trainer.policy_factory import build_policy

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.data.embedding_cache
    if not out:
        raise ConfigError("preprocess: pass --out DIR or set data.embedding_cache in the config")
    out = expand_env(out, "--out")
    if args.prompts:
        prompts = [r.prompt for path in args.prompts for r in load_prompts(path, "--prompts")]
    else:  # every train and eval prompt (of every data.sources entry)
        train, evals = load_prompt_sets(cfg.data)
        prompts = [r.prompt for r in train + evals]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = build_policy(cfg.model, device, cfg_free=cfg.train.cfg_free)
    precompute_embeddings(policy, prompts, out, args.batch_size, overwrite=args.overwrite)
    print(f"cached embeddings of {len(set(prompts))} prompts in {out}")
    return 0


def sample_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dancegrpo-sample`` (Best-of-N inference)."""
    p = argparse.ArgumentParser(prog="dancegrpo-sample", description="Best-of-N sampling.")
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", required=True, help=".txt or .jsonl prompt file")
    p.add_argument("--out", required=True, help="output folder for PNGs and results.json")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--endpoint", type=int, default=0, help="index into rewards.endpoints")
    p.add_argument("--checkpoint", help="checkpoint folder whose model.safetensors to load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=None, help="default: sampling.eta")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not 0 <= args.endpoint < len(cfg.rewards.endpoints):
            raise ConfigError(f"--endpoint must be in [0, {len(cfg.rewards.endpoints)})")
        if args.n < 1:
            raise ConfigError("--n must be >= 1")
    except (ConfigError, FileNotFoundError) as e:
        print(f"dancegrpo-sample: {e}", file=sys.stderr)
        return 2
    best_of_n(cfg, args)
    return 0


def best_of_n(cfg, args: argparse.Namespace) -> list[dict]:
    """Samples ``args.n`` per prompt, keeps the best by the chosen endpoint; returns rows."""
    from dancegrpo_trainer.data import (
        load_condition_images,
        load_prompts,
        repeat_metadata,
        require_metadata,
    )
    from dancegrpo_trainer.policy_factory import build_policy
    from dancegrpo_trainer.rollout import RolloutPlan, sample_rollout
    from dancegrpo_trainer.scoring import ChunkSubmitter, RewardScorer
    from dancegrpo_trainer.weights import apply_lora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = build_policy(cfg.model, device, cfg_free=cfg.train.cfg_free)
    module = policy.trainable_module()
    if cfg.model.init_checkpoint:
        module.load_state_dict(load_file(cfg.model.init_checkpoint))
    if args.checkpoint:
        state = load_file(str(Path(args.checkpoint) / "model.safetensors"))
        if any("lora_" in k for k in state):
            apply_lora(module, cfg.train.lora, policy.lora_target_modules)
        module.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("ema.")}, strict=False
        )
    module.eval()
    endpoint = cfg.rewards.endpoints[args.endpoint]
    scorer = RewardScorer([endpoint], outage_budget_s=cfg.rewards.outage_budget_s)
    records = load_prompts(args.prompts, "--prompts")
    if endpoint.metadata:
        require_metadata(records, "--prompts", f"rewards.endpoints[{args.endpoint}].metadata")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eta = cfg.sampling.eta if args.eta is None else args.eta
    rows = []
    try:
        for i, rec in enumerate(records):
            images = load_condition_images([rec])
            cond = policy.encode_prompts([rec.prompt], images).select([0] * args.n)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            noise = policy.initial_noise(args.n, generator=gen)
            # The N samples of a prompt are one group: a group-wise reward (e.g. a pairwise
            # win rate) gets all N in one request; others are scored chunk by chunk.
            on_chunk = ChunkSubmitter(
                scorer,
                args.n,
                [rec.prompt] * args.n,
                condition_images=images[[0] * args.n] if images is not None else None,
                metadata=repeat_metadata([rec], args.n),
            )
            rollout = sample_rollout(
                policy,
                cond,
                noise,
                plan=RolloutPlan(
                    policy.schedule(cfg.sampling.num_steps), sampler=cfg.sampling.sampler
                ),
                eta=eta,
                generator=gen,
                chunk_size=cfg.sampling.rollout_batch_size,
                on_chunk=on_chunk,
            )
            scores = np.concatenate([p.result().terms[endpoint.label] for _, p in on_chunk.chunks])
            best = int(np.argmax(scores))
            frames = rollout.frames[best].numpy()
            name = f"{i:05d}.png" if frames.ndim == 3 else f"{i:05d}.gif"
            if frames.ndim == 3:
                Image.fromarray(frames).save(out / name)
            else:
                imgs = [Image.fromarray(f) for f in frames]
                imgs[0].save(out / name, save_all=True, append_images=imgs[1:], loop=0)
            rows.append(
                {
                    "prompt": rec.prompt,
                    "file": name,
                    "best_index": best,
                    "best_score": float(scores[best]),
                    "scores": [float(s) for s in scores],
                }
            )
    finally:
        scorer.close()
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows
