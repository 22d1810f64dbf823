"""Repository-wide pytest setup: offline, and one compute thread per process.

The suite starts real reward-server subprocesses beside the test process on small (2-core)
machines; with every process running a multi-threaded OpenMP pool the cores are
oversubscribed and tiny-model steps slow down by an order of magnitude. Subprocesses
inherit these variables.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
