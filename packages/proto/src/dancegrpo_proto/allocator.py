"""glibc malloc settings for processes that send or receive multi-megabyte reward requests.

Each request allocates a few buffers of its own size: the client's wire bytes and gRPC's
copy of them, the server's received message and its pixel views. glibc returns the free
memory at the top of the heap to the OS as soon as it exceeds ``M_TRIM_THRESHOLD``, which
by default follows the largest block freed so far (twice ``M_MMAP_THRESHOLD``, itself
raised to that block's size). Two request-sized buffers freed together exceed it, so
every call gave its pages back and touched them afresh: 700+ page faults for one
8 × 256² request, about 1.5 ms of the client's time on the 2-core development machine,
more than copying the bytes.

``tune_malloc()`` sets both thresholds where glibc's own adjustment ends once any 32 MiB
block has been freed (``M_MMAP_THRESHOLD`` = 32 MiB, its ceiling on 64-bit;
``M_TRIM_THRESHOLD`` = 64 MiB): blocks below 32 MiB are reused rather than mapped and
unmapped per call, and at most 64 MiB of free heap top is kept. ``RewardClient`` and
``dancegrpo-rewards serve`` call it once per process. A no-op outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
_M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_malloc() -> bool:
    """Applies the thresholds above (once per process); ``False`` where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
