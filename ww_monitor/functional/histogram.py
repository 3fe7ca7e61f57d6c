"""ESD histograms: the binning of log10(eigenvalues) that TensorBoard shows as ``ww/esd/<layer>``.

Pure functions (arrays in, a small frozen record out), so the background worker can bin the
eigenvalues and the training thread only writes the result (``SummaryWriter.add_histogram_raw``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .array_types import Eigenvalues

__all__ = ["ESD_MIN_BINS", "ESD_MAX_BINS", "EsdHistogram", "esd_bins", "esd_histogram", "esd_log10"]

#: Bucket count of an ESD histogram, from the number n of eigenvalues by the Rice rule
#: ceil(2 n^(1/3)) (the bin count that keeps the count per bin growing with n, so a histogram of
#: 10 eigenvalues is not a comb of isolated ones and one of 4,096 still resolves the bulk edge),
#: clipped to [ESD_MIN_BINS, ESD_MAX_BINS]: n = 10 -> 5, 64 -> 8, 512 -> 16, 4,096 -> 32.
#: Buckets are uniform in log10(lambda) between the smallest and largest eigenvalue.
ESD_MIN_BINS = 5
ESD_MAX_BINS = 64
#: A spread of log10(lambda) below this is one value (numpy cannot bin a zero-width range) ...
_DEGENERATE_SPREAD = 1e-12
#: ... and gets buckets over this many decades either side of it.
_DEGENERATE_HALF_WIDTH = 0.5


def esd_log10(eigenvalues: Eigenvalues | None) -> np.ndarray | None:
    """log10 of the finite, positive eigenvalues (None when nothing is left)."""
    if eigenvalues is None:
        return None
    ev = np.asarray(eigenvalues, dtype=np.float64)
    ev = ev[np.isfinite(ev) & (ev > 0)]
    if ev.size == 0:
        return None
    return np.log10(ev)


def esd_bins(num_evals: int) -> int:
    """Buckets of the ESD histogram of ``num_evals`` eigenvalues (Rice rule, clipped)."""
    return int(min(ESD_MAX_BINS, max(ESD_MIN_BINS, math.ceil(2.0 * max(int(num_evals), 1) ** (1.0 / 3.0)))))


@dataclass(frozen=True)
class EsdHistogram:
    """A histogram of log10(lambda) in TensorBoard's raw form (``add_histogram_raw``)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: tuple[float, ...]  # right edge of each bucket
    bucket_counts: tuple[int, ...]


def esd_histogram(eigenvalues: Eigenvalues | None, bins: int | None = None) -> EsdHistogram | None:
    """Histogram of log10 of the finite, positive eigenvalues (None when nothing is left);
    ``bins`` defaults to :func:`esd_bins` of their count."""
    values = esd_log10(eigenvalues)
    if values is None:
        return None
    bins = esd_bins(values.size) if bins is None else int(bins)
    vmin, vmax = float(values.min()), float(values.max())
    if vmax - vmin < _DEGENERATE_SPREAD:  # one value: buckets around it
        lo, hi = vmin - _DEGENERATE_HALF_WIDTH, vmax + _DEGENERATE_HALF_WIDTH
    else:
        lo, hi = vmin, vmax
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return EsdHistogram(
        min=vmin,
        max=vmax,
        num=int(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.dot(values, values)),
        bucket_limits=tuple(float(e) for e in edges[1:]),
        bucket_counts=tuple(int(c) for c in counts),
    )
