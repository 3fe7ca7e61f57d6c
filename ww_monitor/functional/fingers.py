"""Fits that are not thrown off by a few outlying eigenvalues ("fingers"; weightwatcher 0.7.7
``fix_fingers``, its issue #102: spuriously large alphas).

* ``"clip_xmax"``: fit the power law again with the top k eigenvalues removed, k = 2, 3, ...,
  ``max_fingers - 1`` (weightwatcher's sequence); stop at the first k whose alpha is below the
  unclipped alpha by more than ``finger_thresh`` (that fit wins, ``num_fingers = k``), or when
  alpha drops to :data:`CLIP_MIN_ALPHA` or below (the unclipped fit stays). ``num_pl_spikes``
  still counts every eigenvalue >= the winning xmin, the clipped ones included.
* ``"xmin_peak"``: look for xmin only near the peak of the ESD on a log scale: the left edge
  ``p`` of the fullest of :data:`PEAK_BINS` equal bins of log10(lambda), candidates in
  ``[0.95 p, xmin_max)`` with ``xmin_max = 1.5 p`` unless given (the last candidate of the range
  is dropped, as the ``powerlaw`` package does). Among them the smallest KS distance wins.

Deliberate differences from weightwatcher 0.7.7, each for the better:

* ``max_fingers`` is honoured. weightwatcher replaces any value below half the number of
  eigenvalues by its default 10, so the argument has no effect in practice.
* ``num_fingers`` is the number of eigenvalues clipped (k); weightwatcher reports k - 1.
* The ``xmin_peak`` range starts at 0.95 p. weightwatcher passes ``log10(0.95 p)`` as the lower
  bound (a log value mixed with a linear one), so its range starts far below the peak whenever
  p > ~1 and is empty or the whole ESD otherwise. In 0.7.7 with ``powerlaw`` 2.x the call fails
  altogether (``Fit()`` no longer accepts ``distribution=``), so ``xmin_peak`` always returns
  alpha = -1 there; ``tests/test_parity_weightwatcher_options.py`` compares with the
  ``powerlaw`` package on the same range instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .array_types import Eigenvalues
from .power_law import DEFAULT_MIN_EIGENVALUE, MIN_TAIL_EIGENVALUES, PowerLawFit, fit_power_law

__all__ = [
    "FIX_FINGERS",
    "DEFAULT_MAX_FINGERS",
    "DEFAULT_FINGER_THRESH",
    "CLIP_MIN_ALPHA",
    "PEAK_BINS",
    "FingerFit",
    "fit_clip_xmax",
    "fit_xmin_peak",
    "peak_xmin_range",
]

#: The two methods (weightwatcher's names).
FIX_FINGERS = ("xmin_peak", "clip_xmax")
#: weightwatcher's defaults: try up to 10 clips; a clip must lower alpha by more than 1.0.
DEFAULT_MAX_FINGERS = 10
DEFAULT_FINGER_THRESH = 1.0
#: Clipping stops once alpha falls to 2 (weightwatcher's ``min_alpha``): below it further clips
#: only eat into a genuinely heavy tail.
CLIP_MIN_ALPHA = 2.0
#: ``xmin_peak`` finds the ESD's peak with this many equal bins of log10(lambda) (weightwatcher).
PEAK_BINS = 100
#: The xmin range around the peak p: [0.95 p, 1.5 p) (weightwatcher's factors).
PEAK_LOW, PEAK_HIGH = 0.95, 1.5
#: Candidate rows x eigenvalues evaluated at once in the range-restricted KS search.
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class FingerFit:
    """A power-law fit after fixing fingers, with what was done to get it."""

    fit: PowerLawFit
    num_fingers: int = 0
    raw_alpha: float = math.nan  # alpha before clipping (clip_xmax)


def _positive_sorted(eigenvalues: Eigenvalues, min_eigenvalue: float) -> np.ndarray:
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    return np.sort(x[x > min_eigenvalue])


def fit_clip_xmax(
    eigenvalues: Eigenvalues,
    *,
    max_fingers: int = DEFAULT_MAX_FINGERS,
    finger_thresh: float = DEFAULT_FINGER_THRESH,
    min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> FingerFit:
    """Power-law fit with the top ``k`` eigenvalues clipped when that lowers alpha by > ``finger_thresh``."""
    x = _positive_sorted(eigenvalues, min_eigenvalue)
    first = fit_power_law(x, min_eigenvalue=min_eigenvalue)
    if not first.ok:
        return FingerFit(first, 0, first.alpha)
    best, clipped = first, 0
    for k in range(2, max_fingers):
        if x.size - k < MIN_TAIL_EIGENVALUES:
            break
        fit = fit_power_law(x[:-k], min_eigenvalue=min_eigenvalue)
        if not fit.ok:
            break
        if fit.alpha + finger_thresh < first.alpha:
            best, clipped = fit, k
            break
        if fit.alpha <= CLIP_MIN_ALPHA:
            break
    if clipped:
        best = replace(best, num_pl_spikes=int(x.size - np.searchsorted(x, best.xmin, side="left")))
    return FingerFit(best, clipped, first.alpha)


def peak_xmin_range(
    eigenvalues: Eigenvalues, *, xmin_max: float | None = None, min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE
) -> tuple[float, float]:
    """``(0.95 p, xmin_max or 1.5 p)``: the xmin range of ``xmin_peak`` around the ESD's peak p."""
    x = _positive_sorted(eigenvalues, min_eigenvalue)
    if x.size == 0:
        return math.nan, math.nan
    counts, edges = np.histogram(np.log10(x), bins=PEAK_BINS)
    peak = 10.0 ** edges[int(np.argmax(counts))]
    return PEAK_LOW * peak, (PEAK_HIGH * peak if xmin_max is None else float(xmin_max))


def fit_xmin_peak(
    eigenvalues: Eigenvalues,
    *,
    xmin_max: float | None = None,
    min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> FingerFit:
    """Power-law fit whose xmin is searched only in :func:`peak_xmin_range`."""
    x = _positive_sorted(eigenvalues, min_eigenvalue)
    xmax = float(x[-1]) if x.size else math.nan
    if x.size < MIN_TAIL_EIGENVALUES or x[0] == x[-1]:
        return FingerFit(fit_power_law(x, min_eigenvalue=min_eigenvalue))
    lo, hi = peak_xmin_range(x, xmin_max=xmin_max, min_eigenvalue=min_eigenvalue)
    # Unique values in [lo, hi), the largest dropped (powerlaw's candidate set); first index of each.
    values, first = np.unique(x, return_index=True)
    keep = (values >= lo) & (values < hi)
    cand = first[keep][:-1]
    cand = cand[cand < x.size - 1]
    if cand.size == 0:
        return FingerFit(PowerLawFit.failed(f"no xmin candidate in the peak range [{lo:.4g}, {hi:.4g})", xmax))
    logx = np.log(x)
    n_tail = (x.size - cand).astype(np.float64)
    suffix = np.cumsum(logx[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n_tail / (suffix[cand] - n_tail * logx[cand])
    Ds = _ks(logx, cand, alphas, n_tail)
    best = int(np.argmin(Ds))
    if not np.isfinite(Ds[best]) or Ds[best] >= 1.0:
        return FingerFit(PowerLawFit.failed("no xmin in the peak range gives a valid power law", xmax))
    i, alpha = int(cand[best]), float(alphas[best])
    n = int(x.size - i)
    fit = PowerLawFit(
        alpha=alpha, xmin=float(x[i]), xmax=xmax, D=float(Ds[best]), sigma=(alpha - 1.0) / math.sqrt(n), num_pl_spikes=n
    )
    return FingerFit(fit)


def _ks(logx: np.ndarray, cand: np.ndarray, alphas: np.ndarray, n_tail: np.ndarray) -> np.ndarray:
    """KS distance of each candidate's tail fit, in row blocks of at most ``_BLOCK_ELEMENTS``."""
    n = logx.size
    out = np.ones(cand.size, dtype=np.float64)
    rows = max(1, _BLOCK_ELEMENTS // n)
    cols = np.arange(n)
    for lo in range(0, cand.size, rows):
        c = cand[lo : lo + rows]
        a = alphas[lo : lo + rows]
        k = (cols[None, :] - c[:, None]).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            fitted = -np.expm1((1.0 - a)[:, None] * (logx[None, :] - logx[c][:, None]))
        gap = np.abs(fitted - k / n_tail[lo : lo + rows, None])
        gap[k < 0] = 0.0
        d = gap.max(axis=1)
        out[lo : lo + rows] = np.where(np.isfinite(a) & (a > 1.0), d, 1.0)
    return out
