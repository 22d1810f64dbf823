"""``make bench``: every side-by-side ratio benchmark, then the table in RESULTS.md.

Appends each figure to ``benchmarks/results.json`` and rewrites the generated table in
``benchmarks/RESULTS.md``. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_serving  # noqa: E402
import bench_trainer  # noqa: E402
from common import write_table  # noqa: E402


def main() -> int:
    start = time.perf_counter()
    entries = bench_serving.run() + bench_trainer.run()
    write_table(entries)
    missed = [e["key"] for e in entries if not e["met"]]
    print(
        f"\n{len(entries)} benchmarks in {time.perf_counter() - start:.0f} s; "
        f"goals missed: {', '.join(missed) or 'none'} (see benchmarks/RESULTS.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
