"""CPU Gram route of :mod:`.eigenvalues`: float64 Gram (``dsyrk``), LAPACK eigensolves, mixed precision.

One matrix, or one stack of pooled slices, at a time, through numpy/SciPy's LAPACK (no copy
beyond the float64 upcast). Three pieces:

* :func:`gram64`: the exact float64 Gram ``W^T W`` of the smaller side, accumulated over row
  blocks of the upcast weights.
* ``?syevd`` with LAPACK's queried (blocked) workspace, eigenvalues only.
* Mixed precision (:func:`cpu_gram_eigenvalues` with ``mixed=True``): a float32 eigensolve of the
  exact Gram whose rank, where float32 cannot resolve it, is decided in float64 (a Cholesky
  certificate, else an LDL^T count), or a float64 solve where that is cheaper.

Which of the float32 / float64 solves is cheaper depends on the spectrum's small end
(``benchmarks/bench_eigensolver.py``, table "Mixed-precision route"; one thread, AMD EPYC, CPU
ms per matrix, copies included; LDL^T: the rank count after a failed certificate):

==================  ============  =============  =============  ========  =====
shape               float64 Gram  float32 solve  float64 solve  Cholesky  LDL^T
==================  ============  =============  =============  ========  =====
512 x 512 (conv)    3.5           6.9            10.3           1.7       2.8
768 x 768           9.9           18.9           27.0           4.7       6.1
3072 x 768 (FFN)    38.8          19.9           28.4           4.8       6.4
==================  ============  =============  =============  ========  =====

A tall random matrix (Q >= ~1.1) has its smallest eigenvalue far above the rank tolerance, so
its float32 solve needs no certificate and saves a third of the solve. A square one has its
smallest eigenvalues near lambda_max / (4 M^2), below float32's resolution, so it always needs
the certificate: float32 solve + Cholesky is still cheaper than the float64 solve, but when the
certificate fails (an eigenvalue at or below the tolerance: 0-25% of random 512-768 square
matrices, more with M) the Gram is formed again and its LDL^T factorisation counts the
eigenvalues below the tolerance. Break-even is a ~20% failure rate
(:data:`CERTIFICATE_BREAK_EVEN`), so the route tracks it per shape (:class:`RoutePlan`) and
solves the later matrices of a shape that fails more often in float64 directly: a
rank-deficient model (every certificate fails) pays a few wasted float32 solves, not one per
matrix.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .spectral_metrics import rank_tolerance

__all__ = [
    "gram64",
    "cpu_gram_eigenvalues",
    "gram_noise_floor",
    "blas_threads",
    "RoutePlan",
    "MIXED_ERROR_FACTOR",
    "CERTIFICATE_BREAK_EVEN",
    "CERTIFICATE_PRIOR",
]

#: Bound on the float32 eigensolver's absolute error: MIXED_ERROR_FACTOR * sqrt(M) * eps32 * ||G||_F.
#: Measured max |error| / (eps32 ||G||_F) on Gaussian (Q = 1, 4), power-law, Student-t and
#: low-rank + noise Grams: 0.6-6.3 for M = 512-2048, i.e. <= 0.19 sqrt(M) with the unblocked
#: reduction, <= 0.23 sqrt(M) with the blocked one now used (M = 512-1024); 0.5 leaves 2.1x margin.
MIXED_ERROR_FACTOR = 0.5

#: Float64 upcast buffer per Gram product (but at least M x M). A 3072 x 768 float32 matrix
#: upcast whole is 18.9 MB, above glibc's malloc mmap threshold, so every call page-faults a
#: fresh buffer in; blocks of a few MB are recycled from the heap, and the Gram is accumulated
#: over them with dsyrk's beta = 1. Measured (one thread, upcast + dsyrk, medians of 7): 3072 x 768
#: 45 -> 40 ms, a 9 x 512 x 512 conv stack 34 -> 31 ms, 768 x 3072 unchanged; Grams bitwise equal.
_UPCAST_BLOCK_BYTES = 4 * 1024 * 1024

#: Float64 Grams of one slice stack kept between its float32 solves and their rank certificates
#: (which need the pooled lambda_max, known only after the last slice). Beyond this budget a
#: Gram is formed again when its certificate is due: ~20% of that slice's cost, never memory.
#: 64 MiB holds all 9 slices of a 3x3 conv up to 960 channels.
_KEEP_GRAM_BYTES = 64 * 1024 * 1024

#: Failure rate of the rank certificate above which the float64 solve alone is cheaper: float32 +
#: certificate save 9-12% of Gram + float64 solve, a failure costs a Gram and an LDL^T count on
#: top (module docstring's table: 12.1 + 6.3 p vs 13.8 ms at 512 x 512, 33.5 + 16.0 p vs 36.9 ms
#: at 768 x 768: break-even at p = 0.27 and 0.21).
CERTIFICATE_BREAK_EVEN = 0.2
#: Certificates assumed passed before any is seen, so that a few early failures at a normal rate
#: do not switch a shape (2 of the first 9 slices failed at ResNet-34's first 512 x 512 conv,
#: whose long-run rate is ~6%), while a rank-deficient model (every certificate fails) switches
#: after 6 matrices.
CERTIFICATE_PRIOR = 20


def gram_noise_floor(lambda_max: float, m: int) -> float:
    """Absolute error of Gram eigenvalues: ~ M * eps(float64) * lambda_max (Wilkinson bound)."""
    return float(lambda_max) * m * float(np.finfo(np.float64).eps)


class RoutePlan:
    """Per shape (n, m), whether the next matrix takes the float32 solve, within one solver call.

    Float32 + certificate is cheaper than float64 while fewer than :data:`CERTIFICATE_BREAK_EVEN`
    of the certificates fail (module docstring). Same-shape layers of one model share their
    statistics, so the failures seen so far predict the next: a shape is solved in float64 once
    its failures exceed that fraction of its certificates plus :data:`CERTIFICATE_PRIOR`.
    """

    def __init__(self) -> None:
        self._certified: dict[tuple[int, int], list[int]] = {}  # shape -> [certificates, failures]

    def wants_float32(self, shape: tuple[int, int]) -> bool:
        done, failed = self._certified.get(shape, (0, 0))
        return failed <= CERTIFICATE_BREAK_EVEN * (done + CERTIFICATE_PRIOR)

    def record(self, shape: tuple[int, int], failed: bool) -> None:
        counts = self._certified.setdefault(shape, [0, 0])
        counts[0] += 1
        counts[1] += int(failed)


def cpu_gram_eigenvalues(
    t: torch.Tensor, mixed: bool = False, plan: RoutePlan | None = None
) -> tuple[np.ndarray | None, float]:
    """Pooled eigenvalues of one matrix or slice stack, and their absolute error bound.

    Each slice is upcast and multiplied on its own (:func:`gram64`), so no float64 copy of a whole
    slice stack is ever made. ``None`` when an entry is NaN/Inf: it shows on the Gram's diagonal.
    ``mixed``: float32 eigensolves where ``plan`` allows (see the module docstring); the bound is
    0.0 when every slice was solved in float64.

    Float32 eigenvalues are accurate to ``delta`` (:func:`_float32_eigenvalues`), so the rank,
    which counts eigenvalues above the tolerance of the *pooled* lambda_max, is only decided by
    them when every one is at least ``delta`` away from that tolerance. A slice with a smaller
    eigenvalue is certified in float64 against the pooled tolerance (:func:`_certify`); when the
    certificate fails, the number of eigenvalues at or below it is counted in float64
    (:func:`_count_at_or_below`), so the rank is exact on either route.
    """
    stack = t if t.ndim == 3 else t.unsqueeze(0)
    rows, cols = stack.shape[-2:]
    n, m = max(rows, cols), min(rows, cols)
    plan = plan if plan is not None else RoutePlan()
    parts: list[np.ndarray] = []
    kept = 0  # bytes of Grams kept for certificates
    float32_slices: list[tuple[int, float, np.ndarray | None]] = []  # (slice, delta, its Gram if kept)
    for k in range(stack.shape[0]):
        gram = gram64(stack[k])
        if not np.isfinite(np.diagonal(gram)).all():
            return None, 0.0
        solved = _float32_eigenvalues(gram) if mixed and plan.wants_float32((n, m)) else None
        if solved is None:
            parts.append(_dsyevd(gram))
            continue
        ev, delta = solved
        # Judged against this slice's own tolerance (the pooled one is not known yet, and is
        # larger): a slice that will likely need the certificate keeps its Gram for it, within
        # a memory budget (the others are formed again if the pooled tolerance needs them).
        keep = ev[0] <= rank_tolerance(float(ev[-1]), n, m, t.dtype) + delta
        keep = keep and kept + gram.nbytes <= _KEEP_GRAM_BYTES
        kept += gram.nbytes if keep else 0
        float32_slices.append((k, delta, gram if keep else None))
        parts.append(ev)
    bound = 0.0
    if float32_slices:
        lam_max = max(float(p[-1]) for p in parts)
        tol = rank_tolerance(lam_max, n, m, t.dtype)
        for k, delta, kept_gram in float32_slices:
            ev = parts[k]
            if ev[0] > tol + delta:
                bound = max(bound, delta)
                continue
            shift = tol + gram_noise_floor(ev[-1], m)  # float64 precision of this slice's Gram
            certified = _certify(kept_gram if kept_gram is not None else gram64(stack[k]), shift)
            plan.record((n, m), failed=not certified)
            # The c smallest eigenvalues are at or below tol (none if certified: c = 0, else the
            # Cholesky factorisation overwrote the Gram, so it is formed again for the count).
            # They are reported clipped into [0, tol], the others at least min(2 tol, float32
            # value + delta): each inside its error band, on its side of tol.
            c = 0 if certified else _count_at_or_below(gram64(stack[k]), shift)
            ev[:c] = np.clip(ev[:c], 0.0, tol)
            rest = ev[c:]
            low = rest <= tol
            rest[low] = np.minimum(2.0 * tol, rest[low] + delta)
            bound = max(bound, delta)
    ev = parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts))
    np.maximum(ev, 0.0, out=ev)
    return ev, bound


def _float32_eigenvalues(gram: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Float32 eigensolve of the exact float64 Gram (``gram`` is left intact), or None on failure.

    Returns the eigenvalues (float64, ascending) and their absolute error bound
    ``delta = MIXED_ERROR_FACTOR * sqrt(M) * eps32 * ||G||_F`` (~1e-6..1e-5 lambda_max): harmless
    for the upper spectrum the power law is fitted to (the caller refits in float64 when delta
    is not small against xmin), but too coarse for a rank tolerance ~1e-8 lambda_max.
    """
    ev32, info = _syevd(gram.astype(np.float32))
    if info != 0:
        return None
    ev = ev32.astype(np.float64)
    delta = (
        MIXED_ERROR_FACTOR * math.sqrt(gram.shape[0]) * float(np.finfo(np.float32).eps) * float(np.sqrt(np.dot(ev, ev)))
    )
    return ev, delta


def _certify(gram: np.ndarray, shift: float) -> bool:
    """True iff every eigenvalue of the (lower-triangle) ``gram`` exceeds ``shift``, in float64.

    A Cholesky factorisation of ``G - shift I`` exists iff it is positive definite; it costs a
    third of a float64 eigensolve and overwrites ``gram``.
    """
    from scipy.linalg import lapack

    gram[np.diag_indices(gram.shape[0])] -= shift
    _, info = lapack.dpotrf(gram, lower=1, overwrite_a=1, clean=0)
    return info == 0


def _count_at_or_below(gram: np.ndarray, shift: float) -> int:
    """Number of eigenvalues of the (lower-triangle) ``gram`` at or below ``shift``, in float64.

    Sylvester's law of inertia: ``G - shift I = L D L^T`` (Bunch-Kaufman, ``dsytrf``) has as many
    non-positive eigenvalues as the block-diagonal D, whose 1 x 1 blocks are read by sign and
    2 x 2 blocks [[a, b], [b, c]] by determinant (< 0: one of each sign; > 0: two of the sign of
    a + c). Costs ~1.5x a Cholesky factorisation and a third of a float64 eigensolve
    (``bench_eigensolver.py``). Overwrites ``gram``.
    """
    from scipy.linalg import lapack

    gram[np.diag_indices(gram.shape[0])] -= shift
    factor, ipiv, info = lapack.dsytrf(gram, lower=1, overwrite_a=1, lwork=_sytrf_lwork(gram.shape[0]))
    if info < 0:
        raise np.linalg.LinAlgError(f"dsytrf: illegal argument {-info}")
    d = np.diagonal(factor)
    pairs = np.flatnonzero(ipiv < 0)[::2]  # first index of each 2 x 2 block (LAPACK marks both)
    single = np.ones(d.size, dtype=bool)
    single[pairs] = single[pairs + 1] = False
    count = int(np.count_nonzero(d[single] <= 0.0))  # info > 0 is an exact zero pivot: counted here
    a, c, b = d[pairs], d[pairs + 1], factor[pairs + 1, pairs]
    det = a * c - b * b
    count += int(np.count_nonzero(det < 0)) + 2 * int(np.count_nonzero((det > 0) & (a + c < 0)))
    count += int(np.count_nonzero(det == 0)) + int(np.count_nonzero((det == 0) & (a + c <= 0)))
    return count


def gram64(w: torch.Tensor) -> np.ndarray:
    """Lower triangle of the float64 Gram of the smaller side of ``w`` (F-ordered, ``dsyrk``).

    The float64 upcast goes through a buffer of at most :data:`_UPCAST_BLOCK_BYTES` (but at least
    M x M) holding a block of rows (tall ``w``) or columns (wide ``w``), and the Gram is
    accumulated block by block (``beta = 1``): the same sum of exact products, in another order
    (float64 rounding only). A C-contiguous block's Fortran view is its transpose, so ``dsyrk``
    forms ``W_b^T W_b`` (trans=0) or ``W_b W_b^T`` (trans=1) without moving any data.
    """
    from scipy.linalg import blas

    rows, cols = w.shape
    trans = 0 if rows >= cols else 1
    m, n = min(rows, cols), max(rows, cols)
    if w.dtype == torch.float64 and w.is_contiguous():
        return blas.dsyrk(1.0, w.numpy().T, trans=trans, lower=1)  # dsyrk does not write to its input
    step = max(m, _UPCAST_BLOCK_BYTES // (8 * m))
    if step >= n:
        return blas.dsyrk(1.0, torch.empty((rows, cols), dtype=torch.float64).copy_(w).numpy().T, trans=trans, lower=1)
    buf = torch.empty(step * m, dtype=torch.float64)
    gram = None
    for lo in range(0, n, step):
        piece = w[lo : lo + step] if trans == 0 else w[:, lo : lo + step]
        block = buf[: piece.numel()].view(piece.shape).copy_(piece).numpy()
        if gram is None:
            gram = blas.dsyrk(1.0, block.T, trans=trans, lower=1)
        else:
            gram = blas.dsyrk(1.0, block.T, beta=1.0, c=gram, trans=trans, lower=1, overwrite_c=1)
    assert gram is not None  # step < n: the loop ran at least once
    return gram


@functools.cache
def _syevd_lwork(prefix: str, m: int) -> int:
    """LAPACK's optimal workspace for an eigenvalues-only ``?syevd`` of order ``m``.

    SciPy's wrapper defaults to the *minimal* workspace (2m + 1) when ``compute_v=0``, which
    makes ``?sytrd`` fall back to its unblocked (level-2 only) tridiagonal reduction; the queried
    size (~34 m) lets it use the blocked one: 1.3-1.6x faster at M = 512-768, one thread
    (``bench_eigensolver.py``), same algorithm, eigenvalues equal to ~1e-15 lambda_max.
    """
    from scipy.linalg import lapack

    query = getattr(lapack, f"{prefix}syevd_lwork")
    lwork, _, info = query(m, compute_v=0, lower=1)
    if info != 0:
        return 2 * m + 1  # SciPy's own default; always valid
    return max(int(lwork), 2 * m + 1)


@functools.cache
def _sytrf_lwork(m: int) -> int:
    """LAPACK's optimal workspace for ``dsytrf`` of order ``m``: SciPy's default (m) forces the
    unblocked factorisation, 2-3x slower at M = 512-768 (``bench_eigensolver.py``)."""
    from scipy.linalg import lapack

    lwork, info = lapack.dsytrf_lwork(m, lower=1)
    return max(int(lwork), m) if info == 0 else m


def _syevd(gram: np.ndarray) -> tuple[np.ndarray, int]:
    """Eigenvalues only (``jobz='N'``), lower triangle, in place, blocked workspace."""
    from scipy.linalg import lapack

    prefix = "s" if gram.dtype == np.float32 else "d"
    solver = getattr(lapack, f"{prefix}syevd")
    ev, _, info = solver(gram, compute_v=0, lower=1, overwrite_a=1, lwork=_syevd_lwork(prefix, gram.shape[0]))
    return ev, info


def _dsyevd(gram: np.ndarray) -> np.ndarray:
    ev, info = _syevd(gram)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsyevd failed (info={info})")
    return ev


_THREADPOOLS: list[Any] = []  # one threadpoolctl controller per process, created on first use


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run numpy/SciPy BLAS with ``n`` threads, like the calling thread's torch ops.

    OpenBLAS' thread count is process-wide, so the analysis worker's one-thread budget would
    not reach it otherwise. Without ``threadpoolctl`` the libraries' own setting is kept.
    """
    if not _THREADPOOLS:
        try:
            import threadpoolctl
        except ImportError:  # optional: only the thread count is affected
            _THREADPOOLS.append(None)
        else:
            _THREADPOOLS.append(threadpoolctl.ThreadpoolController())
    ctl = _THREADPOOLS[0]
    if ctl is None:
        yield
        return
    with ctl.limit(limits=max(int(n), 1), user_api="blas"):
        yield
