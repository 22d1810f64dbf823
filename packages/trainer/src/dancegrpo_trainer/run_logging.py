"""Run outputs: metrics.jsonl, TensorBoard events, the console (one progress bar and
occasional log lines), sample grids/GIFs, the reward curve."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("dancegrpo_trainer")


def setup_logging(rank: int) -> None:
    """Structured ``key=value`` log lines on stderr; ranks other than 0 log warnings only."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s rank={rank} %(name)s: %(message)s",
    )
    logger.setLevel(level)


def format_kv(record: Mapping[str, Any]) -> str:
    parts = []
    for k, v in record.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors numbers to
    TensorBoard (``tb/``, tag ``<split>/<key>``). Inactive on ranks other than 0."""

    def __init__(self, run_dir: Path, active: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self._tensorboard = active and tensorboard
        self._tb = None
        self._purge_step: int | None = None

    def _writer(self):  # noqa: ANN202 - a SummaryWriter, opened at the first record
        if self._tb is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events an interrupted attempt wrote past the resume step.
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
        return self._tb

    def log(self, record: Mapping[str, Any]) -> None:
        """Writes ``record`` (must contain ``step`` and ``split``)."""
        if not self.active:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        tb = self._writer()
        if tb is not None:
            step, split = int(record["step"]), record["split"]
            for key, value in clean.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    tb.add_scalar(f"{split}/{key}", value, step)
            tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (a resumed run rewrites the steps it repeats; ``-1``:
        a fresh start drops every record of an earlier attempt), in ``metrics.jsonl`` and,
        when called before the first record, in TensorBoard."""
        if not self.active:
            return
        self._purge_step = step + 1
        if not self.path.is_file():
            return
        keep = [json.dumps(rec) for rec in read_metrics(self.path) if rec["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class RunProgress:
    """What a person watching the run sees; metrics.jsonl and TensorBoard keep everything.

    One bar over the optimisation steps (``step k/N``) whose postfix holds the latest
    train and held-out ``reward_mean`` and the seconds per step (like accelerate/trl),
    a ``key=value`` log line every ``log_every`` steps and at every eval and checkpoint,
    printed above the bar. The bar is drawn only on a terminal (a log file gets the lines
    alone). The rollout/eval/update bars of a step (``inner_bars``) are shown only while
    steps take at least ``inner_bar_min_s`` seconds (and until the first step is timed):
    on a fast run they would only flicker.

    Args:
        total_steps: ``run.max_steps``.
        active: print anything at all (rank 0).
        bar: draw the bar (``run.progress``).
        log_every: a train log line every K steps (0: only at eval and checkpoint).
        inner_bar_min_s: the step time from which per-step bars are worth showing.
        stream: where the bar goes (default ``sys.stderr``).
    """

    TRAIN_KEYS = ("reward_mean", "loss", "clip_fraction", "grad_norm")

    def __init__(
        self,
        total_steps: int,
        *,
        active: bool = True,
        bar: bool = True,
        log_every: int = 10,
        inner_bar_min_s: float = 10.0,
        stream: Any = None,
    ) -> None:
        self.total_steps = total_steps
        self.active = active
        self.log_every = log_every
        self.inner_bar_min_s = inner_bar_min_s
        self._stream = stream if stream is not None else sys.stderr
        self._want_bar = active and bar
        self._bar = None
        self._redirect: contextlib.ExitStack | None = None
        self._step_s: deque[float] = deque(maxlen=10)
        self._clock = time.perf_counter()
        self._postfix: dict[str, str] = {}

    # ------------------------------------------------------------------ state

    @property
    def bar_visible(self) -> bool:
        """Whether the run bar is (or would be) drawn: wanted, and the stream is a terminal."""
        if self._bar is not None:
            return not self._bar.disable
        isatty = getattr(self._stream, "isatty", None)
        return self._want_bar and bool(isatty and isatty())

    @property
    def inner_bars(self) -> bool:
        """Whether a step's rollout/eval/update bars are worth drawing now."""
        if not self.bar_visible:
            return False
        return not self._step_s or self.seconds_per_step >= self.inner_bar_min_s

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of the last (up to 10) train steps, evals and saves excluded."""
        return sum(self._step_s) / len(self._step_s) if self._step_s else math.nan

    # ------------------------------------------------------------------ events

    def begin(self, step: int) -> None:
        """Opens the bar at ``step`` (a resumed run starts part-way)."""
        self._clock = time.perf_counter()
        if not self.bar_visible or self._bar is not None:
            return
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc="train",
            unit="step",
            file=self._stream,
            dynamic_ncols=True,
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]",
        )
        # Log lines go above the bar instead of through it.
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm())

    def train(self, record: Mapping[str, Any]) -> None:
        """After each train step (its metrics record)."""
        now = time.perf_counter()
        self._step_s.append(now - self._clock)
        self._clock = now
        step = int(record["step"])
        self._postfix["train"] = _short(record.get("reward_mean"))
        self._postfix["s/step"] = f"{self.seconds_per_step:.3g}"
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(step - self._bar.n)
        if self.active and self.log_every and step % self.log_every == 0:
            line = {"step": f"{step}/{self.total_steps}"}
            line.update({k: record[k] for k in self.TRAIN_KEYS if k in record})
            if record.get("skipped"):
                line["skipped"] = int(record["skipped"])
            line["lr"] = record.get("learning_rate", math.nan)
            line["s_per_step"] = self.seconds_per_step
            logger.info(format_kv(line))

    def eval(self, record: Mapping[str, Any]) -> None:
        """After each held-out evaluation (its metrics record)."""
        rest = {k: v for k, v in self._postfix.items() if k != "held_out"}
        self._postfix = {"held_out": _short(record.get("reward_mean")), **rest}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)
        if self.active:
            logger.info(
                "eval "
                + format_kv({k: v for k, v in record.items() if "/" not in k and k != "split"})
            )
        self._clock = time.perf_counter()

    def checkpoint(self, step: int, path: Path) -> None:
        if self.active:
            logger.info(f"checkpoint step={step} path={path}")
        self._clock = time.perf_counter()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, skipping blank lines and a line that does not
    parse (the torn last line of a process killed mid-write, e.g. a preempted job)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def make_grid(frames: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """Tiles ``uint8 [N, H, W, 3]`` into one image (``[T, ...]`` videos: per frame)."""
    if frames.ndim == 5:
        return np.stack([make_grid(frames[:, t], ncols, pad) for t in range(frames.shape[1])])
    n, h, w, _ = frames.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = frames[i]
    return grid


def save_samples(frames: np.ndarray, path: Path, ncols: int, scale: int = 1) -> Path:
    """Writes a PNG grid (images) or an animated GIF (videos ``[N,T,H,W,3]``); returns the path."""
    grid = make_grid(frames, ncols)
    path.parent.mkdir(parents=True, exist_ok=True)

    def to_image(a: np.ndarray) -> Image.Image:
        img = Image.fromarray(a)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        return img

    if grid.ndim == 4:
        path = path.with_suffix(".gif")
        images = [to_image(g) for g in grid]
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
    else:
        to_image(grid).save(path)
    return path


def plot_reward_curve(metrics_path: Path, out_path: Path) -> None:
    """Plots train and eval ``reward_mean`` against step from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {"train": ([], []), "eval": ([], [])}
    for rec in read_metrics(metrics_path):
        if rec.get("split") in series and rec.get("reward_mean") is not None:
            series[rec["split"]][0].append(rec["step"])
            series[rec["split"]][1].append(rec["reward_mean"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, (steps, values) in series.items():
        if steps:
            ax.plot(steps, values, marker="o" if split == "eval" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("reward_mean")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
