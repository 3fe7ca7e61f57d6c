"""``--threads N`` for the benchmarks, applied before numpy/torch are imported.

Thread pools (OpenMP, MKL, OpenBLAS) read their environment variables when the library loads,
so a benchmark must pin them before its first ``import torch``: call :func:`pin_threads` at the
top of the script, then import the rest.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: One thread for every tool: multi-threaded LAPACK is several times slower on shared 2-core VMs,
#: and comparisons are only fair at equal thread counts.
DEFAULT_THREADS = 1


def threads_from_argv(argv) -> int:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return DEFAULT_THREADS


def pin_threads(argv) -> None:
    """Set the thread-count variables from ``--threads`` in ``argv`` (0: leave them alone)."""
    threads = threads_from_argv(argv)
    if threads > 0:
        for var in THREAD_VARS:
            os.environ[var] = str(threads)
