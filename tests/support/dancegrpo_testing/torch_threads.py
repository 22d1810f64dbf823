"""``one_torch_thread``: runs a test module on one intra-op torch thread, restoring the
count afterwards. Tiny models gain nothing from more threads on a shared 2-core machine
(OpenMP spinning made a trainer step ~50x slower there), and one thread fixes the
reduction order that bit-exact expectations need.

A module-scoped autouse fixture: a test module turns it on by importing it::

    from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the importing module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
