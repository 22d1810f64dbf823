"""Shared helpers of the side-by-side benchmarks: interleaved timing, machine facts, results.

Every figure is a ratio of two sides measured in the same process, in the same run, with
their repeats interleaved (A, B, A, B, ...) so that machine noise (other engineers' jobs
on the shared cores) hits both sides alike. Each side's time is the median of its repeats.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


@dataclasses.dataclass
class Timing:
    """Median seconds per call of two sides, and all the samples."""

    a_s: float
    b_s: float
    a_samples: list[float]
    b_samples: list[float]


def rotated(*sides: Callable[[], object], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Seconds per call of every side, timed in rotating order (``warmup`` untimed calls of
    each first): ABC, BCA, CAB, ... (for two sides AB, BA, AB, ...), so that no side always
    runs first or on a cache warmed by the same other side."""
    for _ in range(warmup):
        for fn in sides:
            fn()
    samples: list[list[float]] = [[] for _ in sides]
    for r in range(repeats):
        for k in range(len(sides)):
            i = (r + k) % len(sides)
            t0 = time.perf_counter()
            sides[i]()
            samples[i].append(time.perf_counter() - t0)
    return samples


def interleaved(
    side_a: Callable[[], object],
    side_b: Callable[[], object],
    *,
    repeats: int,
    warmup: int = 1,
) -> Timing:
    """Times ``side_a`` and ``side_b`` alternately (``warmup`` untimed calls of each first).

    The order inside each pair alternates too (AB, BA, AB, ...), so neither side always
    runs on a cache warmed by the other.
    """
    a_samples, b_samples = rotated(side_a, side_b, repeats=repeats, warmup=warmup)
    return Timing(statistics.median(a_samples), statistics.median(b_samples), a_samples, b_samples)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def record(key: str, value: float, goal: str, met: bool, details: dict[str, Any]) -> dict:
    """Prints a figure and appends it to ``results.json`` (a list of runs' entries)."""
    entry = {
        "key": key,
        "value": round(float(value), 4),
        "goal": goal,
        "met": bool(met),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "details": details,
    }
    print(f"{key} = {value:.3f}  (goal {goal}: {'met' if met else 'NOT met'})", flush=True)
    history = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    history.append(entry)
    RESULTS_JSON.write_text(json.dumps(history, indent=1) + "\n")
    return entry


def latest_entries() -> dict[str, dict[str, Any]]:
    """The newest ``results.json`` entry of every key."""
    history = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    return {entry["key"]: entry for entry in history}


def write_table(entries: list[dict[str, Any]], path: Path = RESULTS_MD) -> None:
    """Replaces the generated block of ``RESULTS.md`` with a table of ``entries``."""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if not entries:
        return
    m = entries[0]["machine"]
    lines = [
        begin,
        f"Measured {entries[0]['date']} on {m['cpu']} ({m['cores']} cores, torch "
        f"{m['torch']}, {m['torch_threads']} torch threads, GPU: {m['gpu'] or 'none'}).",
        "",
        "| key | value | goal | met | how |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for e in entries:
        how = e["details"].get("summary", "")
        lines.append(
            f"| {e['key']} | {e['value']:.3f} | {e['goal']} | {'yes' if e['met'] else '**no**'} "
            f"| {how} |"
        )
    lines.append(end)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmark results\n\n" + begin + "\n" + end
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(head + block + tail)
