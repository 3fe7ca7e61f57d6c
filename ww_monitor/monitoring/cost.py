"""How long one snapshot's analysis will take here: a per-process calibrated cost model.

The analysis of an (N x M, N >= M) matrix follows the route of
:func:`~ww_monitor.functional.eigenvalues.choose_method` for its dtype and M:

* ``"gram"`` (float32/16-bit weights with M < 512, or ``method="gram"``): the float64 Gram product
  (``dsyrk``, ~ N M^2, after the float64 upcast, ~ N M) and a float64 symmetric eigensolve
  (``dsyevd``, ~ M^3);
* ``"mixed"`` (float32/16-bit weights with M >= 512): the same Gram, a float32 eigensolve
  (``ssyevd``, ~0.5-0.65x the float64 one); where float32 cannot decide the rank (square-ish
  matrices) a float64 Cholesky certificate (``dpotrf``); where that fails (a random square float32
  matrix above M ~ 2000, any square 16-bit one) a second Gram and an LDL^T count (``dsytrf``); and
  where the float32 error bound is not small against the fit's xmin, a float64 re-solve (a third
  Gram and ``dsyevd``: random float32 matrices of 4096 x 11008 and 32000 x 4096 take it);
* ``"svd"`` (float64 weights): ``torch.linalg.svdvals``, ~ N M^2 + M^3;

plus a fixed cost per matrix and a few microseconds per eigenvalue for the fits. Which of the
mixed route's steps a matrix takes is judged from a random (Marchenko-Pastur) matrix of its shape,
as at initialisation (:func:`_mixed_route`). A trained layer whose tail starts far below
lambda_max is re-solved in float64 more often, which by these rates adds ~80% to a square 4096
matrix (not measured on trained weights).

:func:`calibration` times each piece once per process and thread count on this machine at
M = ``_PROBE_M`` (60-100 ms of CPU in all, measured as CPU time of the calling thread, so a busy
machine inflates it little), with the measured trends to large M (:data:`GRAM_LARGE_M_SPEEDUP`,
:data:`EIG32_LARGE_M_SPEEDUP`). ``benchmarks/bench_cost_model.py`` prints predicted against
measured times per shape and the error. :func:`sampled_seconds` adds the route of
``estimate_above=`` (sampled submatrices plus Lanczos on the whole matrix, whose memory-bound
passes are timed by a separate, larger probe taken only when that route is asked for).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Calibration",
    "calibration",
    "matrix_seconds",
    "estimate_seconds",
    "sampled_seconds",
    "stream_calibration",
    "LANCZOS_MATVECS",
    "GRAM_LARGE_M_SPEEDUP",
    "EIG32_LARGE_M_SPEEDUP",
]

#: Order of the probes. LAPACK's blocked routines reach their steady per-M^3 rate from about
#: M = 512 (one thread, benchmark machine, CPU seconds per M^3 of the float64 eigensolve:
#: 1.29e-10 at M = 256, 0.80e-10 at 512, 0.75-0.81e-10 at 1024-4096), so a smaller probe would
#: overestimate every large matrix by up to 1.7x.
_PROBE_M = 512
_PROBE_Q = 2
_PROBE_REPEATS = 2
#: Per-N M^2 rate of the Gram product and per-M^3 rate of the float32 eigensolve at large M,
#: relative to the M = 512 probe: BLAS-3 blocks and the tridiagonal reduction's panels get more
#: efficient up to M ~ 4096 (one thread, benchmark machine, CPU seconds per unit at M = 512, 1024,
#: 2048, 4096: ``dsyrk`` 1.56, 1.60, 1.38, 1.31e-11; float32 eigensolve 5.1, 4.3, 4.4, 3.8e-11).
#: Between the probe and large M the rate follows ``1/S + (1 - 1/S) * 512 / M`` (:func:`_large_m`).
#: The float64 eigensolve's rate stays within noise of the probe's (7.7, 7.6, 8.3, 8.4e-11), and
#: so, as far as measured, do Cholesky's and LDL^T's.
GRAM_LARGE_M_SPEEDUP = 1.2
EIG32_LARGE_M_SPEEDUP = 1.35
#: Where the power-law fit of a random (initialised) layer puts xmin: near the top of its bulk
#: (0.91-0.94 lambda_max on Gaussian 2048 x 5504 and 4096 x 11008 matrices). Trained layers, whose
#: tail starts further down, are re-solved in float64 more often (see :func:`_mixed_route`).
_RANDOM_XMIN_FRACTION = 0.9
#: Shape of the float64 SVD probe (float64 weights only).
_SVD_PROBE = (512, 256)
#: Shape of the probe that times the fixed cost per matrix (fits and bookkeeping of a tiny ESD).
_TINY_SHAPE = (16, 8)
#: float64 matrix of the memory-bandwidth probe for the sampled route (128 MiB: larger than the
#: caches, like the matrices that route is for); taken once, only when that route is planned.
_STREAM_SHAPE = (4096, 4096)
#: Matrix-vector pairs ARPACK's Lanczos (k=1, ncv=20, tol=1e-8) needs for lambda_max: 81-131
#: (mean 107) on Gaussian 4096 x 1024 to 11008 x 4096 matrices, whose top eigenvalue is barely
#: separated; a trained layer with a separated top eigenvalue needs fewer.
LANCZOS_MATVECS = 110


@dataclass(frozen=True)
class Calibration:
    """Seconds per unit of work of each piece, on this machine with ``threads`` intra-op threads."""

    gram: float  #: per N M^2: float64 Gram product (``dsyrk``)
    upcast: float  #: per N M: the float64 upcast of lower-precision weights before it
    eig64: float  #: per M^3: float64 symmetric eigensolve, eigenvalues only
    eig32: float  #: per M^3: float32 symmetric eigensolve (mixed route)
    cholesky: float  #: per M^3: float64 Cholesky rank certificate
    ldl: float  #: per M^3: float64 LDL^T rank count after a failed certificate
    per_matrix: float  #: fixed: fits and bookkeeping of one ESD
    per_eigenvalue: float  #: fits, per eigenvalue
    threads: int
    seconds: float  #: what the calibration itself took (CPU)


def _best(fn, repeats: int = _PROBE_REPEATS) -> float:
    return _best_of(fn, repeats)[0]


def _best_of(fn, repeats: int = _PROBE_REPEATS):
    """(least CPU seconds of the calling thread over ``repeats`` calls of ``fn``, its last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.thread_time()
        out = fn()
        times.append(time.thread_time() - t0)
    return max(min(times), 1e-9), out


@functools.cache
def _calibrate(threads: int) -> Calibration:
    from scipy.linalg import lapack

    from ..analysis.analyze import AnalysisConfig, analyze_matrices, layer_result
    from ..analysis.layers import LayerMatrix
    from ..functional.gram import _syevd, _sytrf_lwork, blas_threads, gram64

    start = time.thread_time()
    m = _PROBE_M
    g = torch.Generator().manual_seed(0)
    tall = torch.randn(_PROBE_Q * m, m, generator=g)
    tall64 = tall.double()
    with blas_threads(threads):
        per_gram, gram = _best_of(lambda: gram64(tall64), _PROBE_REPEATS + 1)  # cheap: one more
        per_upcast = _best(lambda: torch.empty(tall.shape, dtype=torch.float64).copy_(tall)) / tall.numel()
        per_eig64, (ev, _) = _best_of(lambda: _syevd(gram.copy(order="F")))
        g32 = gram.astype(np.float32)
        per_eig32 = _best(lambda: _syevd(g32.copy(order="F")))
        per_chol = _best(lambda: lapack.dpotrf(gram.copy(order="F"), lower=1, overwrite_a=1, clean=0))
        lwork = _sytrf_lwork(m)
        per_ldl = _best(lambda: lapack.dsytrf(gram.copy(order="F"), lower=1, overwrite_a=1, lwork=lwork))
    config = AnalysisConfig()
    tiny = LayerMatrix("probe", "linear", torch.randn(*_TINY_SHAPE, generator=g))
    tiny_ev = np.sort(np.linalg.svd(tiny.weight.double().numpy(), compute_uv=False) ** 2)
    fixed = _best(lambda: analyze_matrices([tiny], config))  # the whole job for a tiny ESD
    fits = _best(lambda: layer_result(LayerMatrix("probe", "linear", tall), np.sort(ev), config))
    fits_tiny = _best(lambda: layer_result(tiny, tiny_ev, config))
    per_ev = max(fits - fits_tiny, 0.0) / (m - tiny_ev.size)
    cube = m**3
    return Calibration(
        per_gram / (_PROBE_Q * cube),
        per_upcast,
        per_eig64 / cube,
        per_eig32 / cube,
        per_chol / cube,
        per_ldl / cube,
        fixed,
        per_ev,
        threads,
        time.thread_time() - start,
    )


def calibration(threads: int | None = None) -> Calibration:
    """The calibration for ``threads`` intra-op threads (default: the calling thread's count).

    A count other than the calling thread's is measured on a short-lived thread configured like
    the analysis worker (:func:`~ww_monitor.monitoring.worker.configure_current_thread`), so the
    caller's own thread settings are left alone.
    """
    current = torch.get_num_threads()
    if threads is None or threads == current:
        return _calibrate(current)
    from .worker import configure_current_thread

    box: list = []

    def probe() -> None:
        configure_current_thread(threads, None)
        try:
            box.append(_calibrate(threads))
        except BaseException as err:  # re-raised on the caller's thread
            box.append(err)

    t = threading.Thread(target=probe, name="ww-monitor-calibration")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).replace("torch.", ""))


def _mixed_route(n: int, m: int, dtype: torch.dtype) -> tuple[bool, float, bool]:
    """What the mixed route does with a random n x m matrix at initialisation: (needs the float64
    rank certificate, probability that the certificate fails, re-solved in float64).

    The smallest eigenvalue over lambda_max is the Marchenko-Pastur soft edge
    ``((sqrt(Q) - 1) / (sqrt(Q) + 1))^2``; where that is below the rank tolerance (square-ish
    matrices) it is the hard edge: ``N lambda_min / sigma^2`` has the CDF ``1 - exp(-x/2 - sqrt(x))``
    (Edelman, SIAM J. Matrix Anal. Appl. 1988) and ``lambda_max = 4 N sigma^2``, so the
    certificate fails with probability ``1 - exp(-x/2 - sqrt(x))`` at ``x = 4 N M tol``. The
    layer is re-solved in float64 when the float32 error bound exceeds
    ``MIXED_TAIL_RTOL * xmin``, with xmin at :data:`_RANDOM_XMIN_FRACTION` of lambda_max.
    """
    from ..analysis.analyze import MIXED_TAIL_RTOL
    from ..functional.gram import MIXED_ERROR_FACTOR
    from ..functional.spectral_metrics import rank_tolerance

    q, y = n / m, m / n
    soft_edge = ((math.sqrt(q) - 1) / (math.sqrt(q) + 1)) ** 2
    frobenius = math.sqrt(m * (1 + y)) / (1 + math.sqrt(y)) ** 2  # ||W^T W||_F / lambda_max (MP)
    delta = MIXED_ERROR_FACTOR * math.sqrt(m) * float(np.finfo(np.float32).eps) * frobenius
    resolve = delta > MIXED_TAIL_RTOL * _RANDOM_XMIN_FRACTION
    tol = rank_tolerance(1.0, n, m, dtype)
    if soft_edge > tol + delta:
        return False, 0.0, resolve
    if soft_edge > tol:
        return True, 0.0, resolve
    x = 4.0 * n * m * tol
    return True, 1.0 - math.exp(-x / 2 - math.sqrt(x)), resolve


def _large_m(rate: float, m: int, speedup: float) -> float:
    """``rate`` (measured at M = ``_PROBE_M``) at order ``m``: falls from the probe's value towards
    ``rate / speedup`` as ``1/S + (1 - 1/S) * PROBE_M / m``."""
    if m <= _PROBE_M or speedup <= 1.0:
        return rate
    return rate * (1.0 / speedup + (1.0 - 1.0 / speedup) * _PROBE_M / m)


def matrix_seconds(shape, dtype=torch.float32, method: str = "auto", cal: Calibration | None = None) -> float:
    """Estimated CPU seconds to analyse one matrix ((rows, cols) or a (k, rows, cols) stack)."""
    from ..functional.eigenvalues import choose_method

    cal = cal if cal is not None else calibration()
    dtype = _dtype(dtype)
    k = shape[0] if len(shape) == 3 else 1
    n, m = max(shape[-2:]), min(shape[-2:])
    route = choose_method(dtype, method, m)
    gram = _large_m(cal.gram, m, GRAM_LARGE_M_SPEEDUP) * n * m * m
    if dtype != torch.float64:
        gram += cal.upcast * n * m
    eig64 = cal.eig64 * m**3
    if route == "svd":
        solve = _svd_rate(cal.threads) * (n * m * m + m**3)
    elif route == "mixed":
        needs, p_fail, resolve = _mixed_route(n, m, dtype)
        solve = gram + _large_m(cal.eig32, m, EIG32_LARGE_M_SPEEDUP) * m**3
        if needs:  # a failed certificate forms the Gram again for the LDL^T count
            solve += cal.cholesky * m**3 + p_fail * (gram + cal.ldl * m**3)
        if resolve:
            solve += gram + eig64
    else:
        solve = gram + eig64
    return k * (solve + cal.per_eigenvalue * m) + cal.per_matrix


@functools.cache
def _svd_rate(threads: int) -> float:
    """Seconds per (N M^2 + M^3) of ``torch.linalg.svdvals`` in float64 (float64 weights only;
    probed on first use: 0.96-1.25e-10 from 512 x 256 to 2048 x 2048 on the benchmark machine)."""
    n, m = _SVD_PROBE
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return _best(lambda: torch.linalg.svdvals(w)) / (n * m * m + m**3)


def estimate_seconds(shapes, dtypes=None, method: str = "auto", cal: Calibration | None = None) -> float:
    """Estimated CPU seconds to analyse matrices with these shapes ((rows, cols) or (k, rows, cols)),
    each in its dtype (``dtypes``: one per shape, torch dtypes or their names; default float32)."""
    shapes = list(shapes)
    dtypes = [torch.float32] * len(shapes) if dtypes is None else list(dtypes)
    cal = cal if cal is not None else calibration()
    return sum(matrix_seconds(s, d, method, cal) for s, d in zip(shapes, dtypes))


@dataclass(frozen=True)
class StreamCalibration:
    """Memory-bound rates for the sampled route, from one large matrix."""

    matvec: float  #: seconds per byte of a float64 matrix-vector pass (Lanczos)
    fresh: float  #: seconds per byte to allocate and write a new float64 buffer (the upcast copy)
    gather_rows: float  #: seconds per element gathered as whole rows (a tall matrix's sample)
    gather_strided: float  #: seconds per element gathered across rows (a wide matrix's sample)


@functools.cache
def stream_calibration() -> StreamCalibration:
    """Times a fresh float64 matrix of :data:`_STREAM_SHAPE` and row/column gathers from it
    (~0.3 s, once; only for the sampled route)."""
    n, m = _STREAM_SHAPE
    t0 = time.thread_time()
    w = torch.empty(n, m, dtype=torch.float64).fill_(1.0)
    fresh = (time.thread_time() - t0) / w.nbytes
    v = torch.ones(m, dtype=torch.float64)
    matvec = _best(lambda: w.T @ (w @ v)) / (2 * w.nbytes)
    idx = torch.arange(0, n, 4)  # a quarter of the rows, as a sample of a 4x larger matrix takes
    rows = _best(lambda: w.index_select(0, idx)) / (idx.numel() * m)
    strided = _best(lambda: w.T.index_select(0, idx)) / (idx.numel() * m)
    return StreamCalibration(matvec, max(fresh, 1e-15), rows, strided)


def sampled_seconds(
    shape,
    dtype=torch.float32,
    size: int | None = None,
    samples: int | None = None,
    method: str = "auto",
    cal: Calibration | None = None,
) -> float:
    """Estimated CPU seconds of the sampled estimate (``estimate_above=``) of one 2-D matrix
    (:mod:`ww_monitor.functional.sampled`): ``samples`` gathers of (Q m) rows and their exact
    solves as (Q m) x m matrices, Lanczos for lambda_max on a float64 copy of the whole matrix
    (:data:`LANCZOS_MATVECS` pairs of passes), the norm and the fit. ``shape`` is (rows, cols)
    as stored: a wide matrix's samples gather across rows, which costs more."""
    from ..functional.sampled import DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLES

    size = DEFAULT_SAMPLE_SIZE if size is None else size
    samples = DEFAULT_SAMPLES if samples is None else samples
    cal = cal if cal is not None else calibration()
    dtype = _dtype(dtype)
    n, m = max(shape[-2:]), min(shape[-2:])
    sm = min(size, m)
    sn = min(n, max(sm, int(round(n * sm / m))))
    stream = stream_calibration()
    gather = (stream.gather_rows if shape[-2] >= shape[-1] else stream.gather_strided) * sn * m
    whole = n * m * 8
    lanczos = stream.fresh * whole + LANCZOS_MATVECS * 2 * whole * stream.matvec
    solves = samples * (gather + matrix_seconds((sn, sm), dtype, method, cal) - cal.per_matrix)
    norm = stream.matvec * n * m * dtype.itemsize
    return solves + lanczos + norm + cal.per_eigenvalue * samples * sm + cal.per_matrix
