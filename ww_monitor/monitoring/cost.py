"""How long one snapshot's analysis will take here: a per-process calibrated cost model.

The analysis of an (N x M, N >= M) matrix costs a Gram product ~ N M^2 and a symmetric
eigensolve ~ M^3 (plus small O(M log M) fits). :func:`calibration` times both once per process
on this machine, with the thread count of the calling thread (so the callback's one-thread
worker calibrates for one thread): the eigensolve at M = ``_PROBE_M`` and the Gram product at
``(_PROBE_Q * _PROBE_M) x _PROBE_M``, each the best of ``_PROBE_REPEATS`` (about 20 ms in
all). :func:`estimate_seconds` scales them to the shapes of a snapshot. Large shapes run closer
to peak than the probe, so the estimate errs on the slow side.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["calibration", "estimate_seconds"]

_PROBE_M = 256
_PROBE_Q = 2
_PROBE_REPEATS = 3


@functools.lru_cache(maxsize=None)
def _calibrate(threads: int) -> tuple[float, float]:
    from ..functional.eigenvalues import batched_eigenvalues

    g = torch.Generator().manual_seed(0)
    square = torch.randn(_PROBE_M, _PROBE_M, generator=g)
    tall = torch.randn(_PROBE_Q * _PROBE_M, _PROBE_M, generator=g, dtype=torch.float64)

    def best(fn) -> float:
        times = []
        for _ in range(_PROBE_REPEATS):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    solve = best(lambda: batched_eigenvalues([square], method="gram"))  # Gram M^3 + eigensolve
    gram = best(lambda: tall.T @ tall)
    per_gram = gram / (_PROBE_Q * _PROBE_M ** 3)
    per_eig = max(solve / _PROBE_M ** 3 - per_gram, per_gram)
    return per_eig, per_gram


def calibration() -> tuple[float, float]:
    """(seconds per M^3 of eigensolve, seconds per N M^2 of Gram product) on this machine."""
    return _calibrate(torch.get_num_threads())


def estimate_seconds(shapes) -> float:
    """Estimated analysis time of matrices with these shapes ((rows, cols) or (k, rows, cols))."""
    per_eig, per_gram = calibration()
    total = 0.0
    for shape in shapes:
        k = shape[0] if len(shape) == 3 else 1
        n, m = max(shape[-2:]), min(shape[-2:])
        total += k * (per_eig * m ** 3 + per_gram * n * m * m)
    return total
