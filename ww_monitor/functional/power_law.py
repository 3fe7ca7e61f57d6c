"""Power-law fit of the tail of an eigenvalue spectrum (Clauset, Shalizi & Newman 2009).

For a candidate ``xmin`` with the ``n`` eigenvalues ``x >= xmin`` the continuous MLE is

    alpha = 1 + n / sum_i ln(x_i / xmin)

and the fit quality is the Kolmogorov-Smirnov distance between the empirical CDF of the tail
(the lower step ``k / n``, k = 0..n-1, as weightwatcher and ``powerlaw`` use it) and the fitted
CDF ``1 - (x / xmin)^(1 - alpha)``. Every eigenvalue but the largest is a candidate; the one
with the smallest distance wins (the first one on ties, so the fit is deterministic).

All candidates are evaluated at once: the MLE from suffix sums of ``ln x`` (O(n)), the KS
distances as blocks of the n x n upper-triangular array of CDF gaps (numpy, no Python loop per
candidate; numpy releases the GIL so a background thread does not stall training). Exhaustively
that is O(n^2); coarse-to-fine bounds (:func:`_ks_distances`) first discard the candidates that
provably cannot have the smallest distance, so typically only a few percent of the array is
evaluated (a 4608-eigenvalue ESD: ~15 ms instead of ~0.5 s) and the result is the exhaustive one
(same xmin, same bits; ``tests/test_power_law.py`` checks both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .array_types import Eigenvalues

__all__ = ["PowerLawFit", "fit_power_law", "MIN_TAIL_EIGENVALUES", "DEFAULT_MIN_EIGENVALUE"]

#: Absolute floor below which eigenvalues are treated as zero by the fit. weightwatcher uses the
#: same 1e-5 (``EVALS_THRESH``); callers pass a relative, precision-aware floor on top of it.
DEFAULT_MIN_EIGENVALUE = 1e-5

#: Fewer positive eigenvalues than this and no fit is attempted: the MLE needs a tail of at
#: least two points and a KS statistic on fewer than ~5 points carries no information.
MIN_TAIL_EIGENVALUES = 5

# Elements of the candidate x eigenvalue block evaluated at once (8 MiB per float64 temporary:
# cache-friendly, and small enough to be recycled from the heap instead of page-faulted in).
_BLOCK_ELEMENTS = 1 << 20

#: Coarse-to-fine grid spacings that bound the candidates' KS distances before the exact pass.
_GRID_STRIDES = (128, 32, 8)

#: Bounds are pruned only with this much slack: far above the rounding of values in [0, 1]
#: (~1e-16), far below any difference between real KS distances.
_PRUNE_MARGIN = 1e-9

#: Candidates evaluated exactly after each bounding pass to tighten the pruning threshold.
_PROBES = 16

#: With fewer valid candidates the exhaustive pass is as cheap as bounding first.
_PRUNE_MIN_CANDIDATES = 256


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`fit_power_law`. A failed fit has ``ok=False``, NaN numbers and a reason."""

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float
    num_pl_spikes: int
    ok: bool = True
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def failed(reason: str, xmax: float = math.nan) -> PowerLawFit:
        return PowerLawFit(math.nan, math.nan, xmax, math.nan, math.nan, 0, ok=False, reason=reason)


def fit_power_law(
    eigenvalues: Eigenvalues,
    *,
    xmin: float | None = None,
    min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> PowerLawFit:
    """Fit ``rho(lambda) ~ lambda^-alpha`` to the tail of ``eigenvalues``.

    Args:
        eigenvalues: 1-D array-like of eigenvalues (any order). Non-finite values are ignored.
        xmin: fix the lower cut-off instead of searching for it (the nearest eigenvalue is used).
        min_eigenvalue: eigenvalues ``<= min_eigenvalue`` are treated as zero and not fitted.

    Returns:
        :class:`PowerLawFit` with alpha, xmin, xmax (= lambda_max), D (KS distance),
        sigma = (alpha - 1) / sqrt(n) and num_pl_spikes = n, the number of tail eigenvalues.
        Degenerate input (too few positive eigenvalues, all equal) gives ``ok=False``.
    """
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    x = np.sort(x[x > min_eigenvalue])
    n_total = x.size
    xmax = float(x[-1]) if n_total else math.nan
    if n_total < MIN_TAIL_EIGENVALUES:
        return PowerLawFit.failed(
            f"{n_total} eigenvalues above {min_eigenvalue:g}; the fit needs {MIN_TAIL_EIGENVALUES}", xmax
        )
    if x[0] == x[-1]:
        return PowerLawFit.failed("all eigenvalues are equal: no tail to fit", xmax)

    logx = np.log(x)
    if xmin is not None:
        start = int(np.argmin(np.abs(x - xmin)))
        start = min(start, n_total - 2)
        candidates = np.array([start])
    else:
        candidates = np.arange(n_total - 1)

    n_tail = (n_total - candidates).astype(np.float64)
    suffix = np.cumsum(logx[::-1])[::-1]  # suffix[i] = sum_{j >= i} ln x_j
    denom = suffix[candidates] - n_tail * logx[candidates]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n_tail / denom
    Ds = _ks_distances(logx, candidates, alphas, n_tail)

    best = int(np.argmin(Ds))
    if not np.isfinite(Ds[best]) or Ds[best] >= 1.0:
        return PowerLawFit.failed("no xmin gives a valid power law (alpha <= 1 or ties everywhere)", xmax)
    i = int(candidates[best])
    alpha = float(alphas[best])
    n = int(n_total - i)
    # Ties at xmin belong to the tail, as in powerlaw / weightwatcher (data >= xmin).
    n_spikes = int(n_total - np.searchsorted(x, x[i], side="left"))
    return PowerLawFit(
        alpha=alpha,
        xmin=float(x[i]),
        xmax=xmax,
        D=float(Ds[best]),
        sigma=(alpha - 1.0) / math.sqrt(n),
        num_pl_spikes=n_spikes,
    )


def _gaps(
    logx: np.ndarray, rows: np.ndarray, cols: np.ndarray, expo: np.ndarray, n_tail: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``F_i(x_j)``, ``E_i(j)`` for candidate rows i x eigenvalue columns j; both 0 where j <= i.

    ``F_i(x) = 1 - (x / x_i)^(1 - alpha_i)`` computed as ``-expm1((1 - alpha_i) ln(x / x_i))``
    (accurate near xmin), ``E_i(j) = (j - i) / n_i`` the lower step of the tail's empirical CDF.
    Every entry is a function of (i, j) alone, so the same (i, j) gives the same bits in any block.
    """
    logratio = logx[cols][None, :] - logx[rows][:, None]
    k = (cols[None, :] - rows[:, None]).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        fitted = -np.expm1(expo[:, None] * logratio)
    empirical = k / n_tail[:, None]
    outside = k <= 0
    fitted[outside] = 0.0
    empirical[outside] = 0.0
    return fitted, empirical


def _row_blocks(rows: np.ndarray, width_of: Callable[[int], int], budget: int) -> Iterator[slice]:
    """Split sorted ``rows`` into consecutive slices whose rows x width stays near ``budget``."""
    lo = 0
    while lo < rows.size:
        take = max(1, budget // max(1, width_of(int(rows[lo]))))
        yield slice(lo, min(lo + take, rows.size))
        lo += take


def _exact_distances(logx: np.ndarray, rows: np.ndarray, expo: np.ndarray, n_tail: np.ndarray) -> np.ndarray:
    """Exact KS distance ``D_i = max_{j >= i} |F_i(x_j) - E_i(j)|`` of each candidate row i."""
    n_total = logx.size
    out = np.empty(rows.size, dtype=np.float64)
    for sl in _row_blocks(rows, lambda first: n_total - first, _BLOCK_ELEMENTS):
        idx = rows[sl]
        cols = np.arange(int(idx[0]), n_total)
        fitted, empirical = _gaps(logx, idx, cols, expo[sl], n_tail[sl])
        out[sl] = np.max(np.abs(fitted - empirical), axis=1)
    return out


def _distance_bounds(
    logx: np.ndarray, rows: np.ndarray, expo: np.ndarray, n_tail: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on every candidate's KS distance from a grid of every ``stride``-th point.

    On the grid the gap is evaluated exactly, so its maximum is a lower bound. Between two
    consecutive evaluated points p < q (the candidate's own index i, where F = E = 0, counts as
    one) both CDFs are non-decreasing, so for p < j < q:
    ``|F(x_j) - E(j)| <= max(F(x_q) - E(p), E(q) - F(x_p))``, whose maximum is an upper bound.
    """
    n_total = logx.size
    grid = np.unique(np.append(np.arange(0, n_total, stride), n_total - 1))
    lower = np.empty(rows.size, dtype=np.float64)
    upper = np.empty(rows.size, dtype=np.float64)
    for sl in _row_blocks(rows, lambda first: grid.size, _BLOCK_ELEMENTS):
        idx = rows[sl]
        cols = grid[grid > idx[0]]
        fitted, empirical = _gaps(logx, idx, cols, expo[sl], n_tail[sl])
        lower[sl] = np.max(np.abs(fitted - empirical), axis=1)
        between = np.maximum(fitted[:, 1:] - empirical[:, :-1], empirical[:, 1:] - fitted[:, :-1])
        # The first grid point after i pairs with i itself (F = E = 0): fitted/empirical there.
        first = np.maximum(fitted[:, 0], empirical[:, 0])
        upper[sl] = np.maximum(np.maximum(lower[sl], first), between.max(axis=1, initial=0.0))
    return lower, upper


def _ks_distances(logx: np.ndarray, candidates: np.ndarray, alphas: np.ndarray, n_tail: np.ndarray) -> np.ndarray:
    """KS distance of each candidate's tail, or a number provably larger than the smallest one.

    Entries are exact for every candidate that can be the minimum (so for the winner) and 1.0
    where alpha is not > 1. With many candidates, coarse-to-fine passes (grid strides
    :data:`_GRID_STRIDES`) first bound every distance (:func:`_distance_bounds`); a candidate
    whose lower bound exceeds a distance already achieved (an exact D, or the best upper bound)
    by more than :data:`_PRUNE_MARGIN` cannot win or tie, keeps its lower bound and is not
    refined. Only the survivors get the exact O(n) evaluation, so the argmin (first one on ties)
    is the exhaustive search's, at a fraction of its O(n^2) cost.
    """
    Ds = np.ones(candidates.size, dtype=np.float64)
    alive = np.flatnonzero(np.isfinite(alphas) & (alphas > 1.0))
    if alive.size >= _PRUNE_MIN_CANDIDATES:
        achieved = np.inf  # smallest D known to be attained (exact, or an upper bound on one)
        for stride in _GRID_STRIDES:
            rows = candidates[alive]
            lower, upper = _distance_bounds(logx, rows, 1.0 - alphas[alive], n_tail[alive], stride)
            Ds[alive] = lower
            # Pin the threshold to real distances: the exact D of the most promising candidates
            # (smallest lower bounds, and the smallest upper bound). O(n) each, so cheap.
            k = min(_PROBES, lower.size)
            probe = np.union1d(np.argpartition(lower, k - 1)[:k], [int(np.argmin(upper))])
            exact = _exact_distances(logx, rows[probe], 1.0 - alphas[alive[probe]], n_tail[alive[probe]])
            achieved = min(achieved, float(upper.min()), float(exact.min()))
            alive = alive[lower <= achieved + _PRUNE_MARGIN]
    if alive.size:
        Ds[alive] = _exact_distances(logx, candidates[alive], 1.0 - alphas[alive], n_tail[alive])
    return Ds
