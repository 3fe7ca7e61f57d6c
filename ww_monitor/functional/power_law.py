"""Power-law fit of the tail of an eigenvalue spectrum (Clauset, Shalizi & Newman 2009).

For a candidate ``xmin`` with the ``n`` eigenvalues ``x >= xmin`` the continuous MLE is

    alpha = 1 + n / sum_i ln(x_i / xmin)

and the fit quality is the Kolmogorov-Smirnov distance between the empirical CDF of the tail
(the lower step ``k / n``, k = 0..n-1, as weightwatcher and ``powerlaw`` use it) and the fitted
CDF ``1 - (x / xmin)^(1 - alpha)``. Every eigenvalue but the largest is a candidate; the one
with the smallest distance wins (the first one on ties, so the fit is deterministic).

All candidates are evaluated at once: the MLE from suffix sums of ``ln x`` (O(n)), the KS
distances as blocks of an n x n upper-triangular array (O(n^2) arithmetic in numpy, no Python
loop per candidate; numpy releases the GIL so a background thread does not stall training).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PowerLawFit", "fit_power_law", "MIN_TAIL_EIGENVALUES", "DEFAULT_MIN_EIGENVALUE"]

#: Absolute floor below which eigenvalues are treated as zero by the fit. weightwatcher uses the
#: same 1e-5 (``EVALS_THRESH``); callers pass a relative, precision-aware floor on top of it.
DEFAULT_MIN_EIGENVALUE = 1e-5

#: Fewer positive eigenvalues than this and no fit is attempted: the MLE needs a tail of at
#: least two points and a KS statistic on fewer than ~5 points carries no information.
MIN_TAIL_EIGENVALUES = 5

# Elements of the candidate x eigenvalue block evaluated at once (~32 MiB of float64).
_BLOCK_ELEMENTS = 1 << 22


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
    def failed(reason: str, xmax: float = math.nan) -> "PowerLawFit":
        return PowerLawFit(math.nan, math.nan, xmax, math.nan, math.nan, 0, ok=False, reason=reason)


def fit_power_law(
    eigenvalues,
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


def _ks_distances(logx: np.ndarray, candidates: np.ndarray, alphas: np.ndarray, n_tail: np.ndarray) -> np.ndarray:
    """KS distance of each candidate's tail; 1.0 (the worst) where alpha is not > 1."""
    n_total = logx.size
    Ds = np.ones(candidates.size, dtype=np.float64)
    valid = np.isfinite(alphas) & (alphas > 1.0)
    rows = max(1, _BLOCK_ELEMENTS // n_total)
    for lo in range(0, candidates.size, rows):
        idx = candidates[lo : lo + rows]
        ok = valid[lo : lo + rows]
        if not ok.any():
            continue
        first = int(idx[0])
        cols = np.arange(first, n_total)
        # log(x_j / xmin_i) for j >= first; entries with j < i are masked out below.
        logratio = logx[first:][None, :] - logx[idx][:, None]
        k = (cols[None, :] - idx[:, None]).astype(np.float64)
        expo = (1.0 - alphas[lo : lo + rows])[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            fitted = -np.expm1(expo * logratio)  # 1 - (x/xmin)^(1-alpha), accurate near xmin
            gap = np.abs(fitted - k / n_tail[lo : lo + rows, None])
        gap[k < 0] = 0.0
        block = np.max(gap, axis=1)
        Ds[lo : lo + rows] = np.where(ok, block, 1.0)
    return Ds
