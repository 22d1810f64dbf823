"""``eval:`` (held-out evaluation, :class:`EvalConfig`) and ``run:`` (output folder,
steps, seed, checkpoints, logging: :class:`RunConfig`)."""

from __future__ import annotations

import dataclasses

from dancegrpo_trainer.config.errors import _check


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation: fixed prompts and seeds, deterministic sampling (η = 0).

    Attributes:
        every_steps: evaluate every K steps (and before the first and after the last).
        samples_per_prompt: samples per eval prompt.
        seed: seed of the eval noise (fixed, so evals are comparable across steps).
        eta: sampling noise for eval (0 = deterministic ODE sampling).
        height, width: the eval resolution in pixels (``None``: ``model.height`` /
            ``model.width``, the training resolution); checked against the adapter's
            geometry like the model's.
    """

    every_steps: int = 10
    samples_per_prompt: int = 4
    seed: int = 1234
    eta: float = 0.0
    height: int | None = None
    width: int | None = None

    def validate(self) -> None:
        _check(self.every_steps >= 1, "eval.every_steps", "must be >= 1")
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.eta >= 0, "eval.eta", "must be >= 0")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"eval.{name}", "must be >= 1 (or null)")


@dataclasses.dataclass
class RunConfig:
    """Run bookkeeping.

    Attributes:
        output_dir: the run folder (config.yaml, metrics.jsonl, tb/, samples/, checkpoints/).
        max_steps: optimisation steps to run.
        seed: the base seed; every random draw of step ``s`` derives from ``(seed, s, rank)``.
        checkpoint_every: save a checkpoint every K steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        resume: ``auto`` (latest checkpoint in output_dir, if any), ``never``, or a path.
        sample_grid_every: write a sample grid every K steps (0 disables).
        progress: show the run's progress bar on a terminal (rank 0); per-step rollout/eval
            bars appear only while steps are slow enough for them to matter.
        log_every: a train log line every K steps (0: only at evals and checkpoints);
            every step's figures are in metrics.jsonl and TensorBoard regardless.
    """

    output_dir: str = "runs/default"
    max_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "auto"
    sample_grid_every: int = 10
    progress: bool = True
    log_every: int = 10

    def validate(self) -> None:
        _check(bool(self.output_dir), "run.output_dir", "is required")
        _check(self.log_every >= 0, "run.log_every", "must be >= 0 (0: only at evals/checkpoints)")
        _check(self.max_steps >= 1, "run.max_steps", "must be >= 1")
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        _check(self.sample_grid_every >= 0, "run.sample_grid_every", "must be >= 0")
        _check(bool(self.resume), "run.resume", "must be 'auto', 'never' or a checkpoint path")
