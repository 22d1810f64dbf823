"""tune_malloc: request-sized buffers are reused instead of re-faulted on every call."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Each iteration allocates and frees two 1.5 MiB buffers, as a client call does (its wire
# bytes and gRPC's copy of them); prints the minor page faults per iteration.
PATTERN = """
import resource, sys
from dancegrpo_proto.allocator import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc() and tune_malloc()  # applied once, idempotent
n = 1536 * 1024
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for warm in range(3):
    a = b"x" * n; b = a + b"y"; del a, b
before = faults()
for _ in range(40):
    a = b"x" * n; b = a + b"y"; del a, b
print((faults() - before) / 40)
"""


def _faults_per_iteration(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_tuned_malloc_stops_refaulting_request_sized_buffers():
    pages = 2 * 1536 * 1024 // 4096  # two buffers of 384 pages
    assert _faults_per_iteration("default") > 0.8 * pages  # glibc returned them to the OS
    assert _faults_per_iteration("tuned") < 0.1 * pages
