"""``make bench``: every side-by-side ratio benchmark, then the table in RESULTS.md.

    python benchmarks/run_all.py [--only serving|p1_cheap|p3|p4|p5|t2t|t2t_binary ...]
                                 [--quick]

Appends each figure to ``benchmarks/results.json`` and rewrites the generated table in
``benchmarks/RESULTS.md`` (with ``--only``, the other rows keep their latest recorded
entry). About 3 minutes on 2 CPU cores without ``t2t``; ``t2t`` (time to a reward target
per training method on the demo task, ``bench_t2t.py``) adds about 6-8 minutes, about 2.5
with ``--quick`` (GRPO, Fast and MixGRPO-Flash only). ``t2t_binary`` (the sparse binary
task, about 15 minutes) runs only when named in ``--only``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_serving  # noqa: E402
import bench_t2t  # noqa: E402
import bench_trainer  # noqa: E402
from common import latest_entries, write_table  # noqa: E402

QUICK = {"t2t": False}  # --quick: t2t with bench_t2t.QUICK_METHODS only

# Benchmarks by name; "serving" measures p1, p1b and p2 against one set of servers, then
# the transport-dominated p1b companion and p1_cheap.
BENCHMARKS = {
    "serving": lambda: (
        bench_serving.run() + bench_serving.run_transport() + bench_serving.run_cheap()
    ),
    "p1_cheap": lambda: bench_serving.run_cheap(),
    "p3": lambda: [bench_trainer.bench_p3(8)],
    "p4": lambda: [bench_trainer.bench_p4()],
    "p5": lambda: [bench_trainer.bench_p5(8)],
    "t2t": lambda: bench_t2t.run(["demo"], bench_t2t.QUICK_METHODS if QUICK["t2t"] else None),
    "t2t_binary": lambda: bench_t2t.run(["binary"]),
}
#: What ``make bench`` runs without ``--only`` (t2t_binary is opt-in: it alone takes ~15 min).
DEFAULT = [name for name in BENCHMARKS if name != "t2t_binary"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="side-by-side ratio benchmarks")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument(
        "--quick", action="store_true", help="t2t: GRPO, Fast and MixGRPO-Flash only"
    )
    args = parser.parse_args(argv)
    QUICK["t2t"] = args.quick
    start = time.perf_counter()
    entries = [e for name in (args.only or DEFAULT) for e in BENCHMARKS[name]()]
    if args.only:
        table = latest_entries()  # includes the entries just recorded
        entries_in_table = [table[k] for k in sorted(table)]
    else:
        entries_in_table = entries
    write_table(entries_in_table)
    missed = [e["key"] for e in entries if not e["met"]]
    print(
        f"\n{len(entries)} benchmarks in {time.perf_counter() - start:.0f} s; "
        f"goals missed: {', '.join(missed) or 'none'} (see benchmarks/RESULTS.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
