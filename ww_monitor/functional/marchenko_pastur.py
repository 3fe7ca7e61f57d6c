"""Marchenko-Pastur fit of one ESD: bulk edge, Tracy-Widom scale, spikes, BBP prediction.

Conventions. ``W`` is N x M after orientation (N >= M), Q = N / M, and
the eigenvalues are those of W^T W *without* the 1/N normalisation. If W's entries are i.i.d.
with variance sigma^2, the M eigenvalues of W^T W / N follow the Marchenko-Pastur law
(Marchenko & Pastur 1967) with ratio y = M / N = 1 / Q <= 1 and no mass at zero:

    rho(x) = sqrt((x_+ - x)(x - x_-)) / (2 pi sigma^2 y x),   x_pm = sigma^2 (1 pm sqrt(y))^2,

so in the unnormalised convention the edges are lambda_pm = N sigma^2 (1 pm 1/sqrt(Q))^2.

The largest eigenvalue fluctuates around lambda_+ on the Tracy-Widom scale (Johnstone 2001,
multiplied by N for the unnormalised convention)

    tw_scale = N sigma^2 (1 + Q^-1/2)^(4/3) / (sqrt(Q) M^(2/3))

and a rank-one signal sqrt(N) theta u v^T with t = theta / sigma produces an outlier iff
t > Q^(-1/4), at N sigma^2 (1 + t^2)(1/Q + t^2) / t^2 (Baik, Ben Arous & Peche 2005).

Robust sigma: the KS distance between the ESD and the MP CDF is minimised over sigma on the
*lower* ``BULK_FIT_QUANTILE`` of the eigenvalues only. The empirical CDF at a bulk eigenvalue
counts only the eigenvalues below it, so spikes above the fitted range cannot move it, and by
eigenvalue interlacing a rank-r perturbation shifts every bulk eigenvalue by at most r places.
Spikes therefore do not inflate sigma, as long as they are fewer than 1 - BULK_FIT_QUANTILE of
the spectrum. The MP CDF is evaluated in closed form (below), vectorised over every candidate
sigma and every eigenvalue at once: no Python loop over eigenvalues.

Pooled convolution ESDs (k slices, each N x M, eigenvalues pooled) follow the same MP law; only
the largest of k independent Tracy-Widom variables is larger, which :func:`spike_margin`
accounts for.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

from .array_types import Eigenvalues

__all__ = [
    "MPFit",
    "fit_marchenko_pastur",
    "mp_edges",
    "mp_cdf",
    "mp_density",
    "tracy_widom_scale",
    "spike_margin",
    "bbp_threshold",
    "bbp_outlier",
    "bbp_ratio",
    "SPIKE_TW_MARGIN",
    "BULK_FIT_QUANTILE",
]

#: Spikes are eigenvalues above lambda_+ + SPIKE_TW_MARGIN * tw_scale. The Tracy-Widom (GOE) law
#: puts ~1e-3 of its mass above 3; on top of that sigma is estimated from the same spectrum and
#: small M adds finite-size corrections. On 5,725 Gaussian matrices (M = 8..1024, Q = 1..8,
#: ``benchmarks/calibrate_phases.py --null``) the 99.9% quantile of (lambda_max - lambda_+) / tw
#: was 3.5-3.7 for M = 16..64 and <= 3.2 above, so a margin of 4 leaves 0.05% false spikes for
#: M >= 16 (0.4% at M = 8), while an outlier 1.5x the BBP threshold (17% above lambda_+) is
#: still ~11 TW widths out at M = 256.
SPIKE_TW_MARGIN = 4.0

#: Fraction of the spectrum (from the bottom) that sigma is fitted on. The top 10% may hold
#: spikes or a tail without biasing sigma; the lower 90% still pins sigma to ~1/M because
#: bulk eigenvalues are rigid (their positions fluctuate by O(log M / M), not O(1/sqrt(M))).
BULK_FIT_QUANTILE = 0.9

#: sigma^2 is searched over [s0 / SEARCH_RANGE, s0 * SEARCH_RANGE] around the median-matching
#: estimate s0. The median moves by at most a factor ~2 for any spectrum whose lower half is
#: MP-like, so 8 is ample; the MP CDF is cheap, so the wide range costs little.
SEARCH_RANGE = 8.0
# Coarse-to-fine search over log sigma^2. The first stage scans _COARSE_POINTS over the whole
# range, scoring each on at most _COARSE_SAMPLE evenly spaced eigenvalues of the fitted range (at
# their true ranks: a lower bound on the KS distance, within ~1/_COARSE_SAMPLE of it, ample to
# bracket the minimum at this stage's step of 2 ln 8 / 48 = 0.087). Each of the _REFINE_STAGES
# then scans _REFINE_POINTS over +-1 step of the best point on every eigenvalue, so the final
# relative resolution of sigma^2 is 0.087 * (2/8)^4 ~ 3e-4, well below the Tracy-Widom width
# (>= 3e-3 relative for M <= 15000). 49 + 9 + 3 * 6 evaluations instead of a fine grid's
# thousands: a refine grid's ends and middle are the previous grid's best point and neighbours,
# whose exact distances are reused (same fit, 25% less MP CDF work on large ESDs).
_COARSE_POINTS = 49
_COARSE_SAMPLE = 512
_REFINE_POINTS = 9
_REFINE_STAGES = 4


@dataclass(frozen=True)
class MPFit:
    """Marchenko-Pastur fit of one ESD (unnormalised convention: eigenvalues of W^T W).

    Attributes:
        sigma: fitted entry standard deviation of W.
        lambda_plus, lambda_minus: MP bulk edges, N sigma^2 (1 +- 1/sqrt(Q))^2.
        tw_scale: Tracy-Widom scale of lambda_max around lambda_plus.
        num_spikes: eigenvalues above lambda_plus + spike_margin(num_slices) * tw_scale.
        ks: KS distance between the bulk (eigenvalues not counted as spikes) and the MP CDF.
        mp_softrank: lambda_plus / lambda_max (1 for a random matrix, -> 0 with a large spike).
    """

    sigma: float
    lambda_plus: float
    lambda_minus: float
    tw_scale: float
    num_spikes: int
    ks: float
    mp_softrank: float

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def spike_threshold(self) -> float:
        """Eigenvalue above which a spike is counted (for a single 2-D matrix)."""
        return self.lambda_plus + SPIKE_TW_MARGIN * self.tw_scale

    @staticmethod
    def failed() -> MPFit:
        nan = math.nan
        return MPFit(nan, nan, nan, nan, 0, nan, nan)


def mp_edges(q: float, sigma: float = 1.0, n: float = 1.0) -> tuple[float, float]:
    """(lambda_minus, lambda_plus) = n sigma^2 (1 -+ 1/sqrt(Q))^2 (n = 1: normalised convention)."""
    r = 1.0 / math.sqrt(q)
    s2 = n * sigma * sigma
    return s2 * (1.0 - r) ** 2, s2 * (1.0 + r) ** 2


def tracy_widom_scale(n: int, m: int, sigma: float = 1.0) -> float:
    """Tracy-Widom scale of lambda_max of W^T W (W: n x m, n >= m), unnormalised convention.

    N sigma^2 (1 + Q^-1/2)^(4/3) / (sqrt(Q) M^(2/3)), equal to Johnstone's (2001)
    (sqrt(N) + sqrt(M)) (1/sqrt(N) + 1/sqrt(M))^(1/3) for sigma = 1.
    """
    q = n / m
    return n * sigma * sigma * (1.0 + q**-0.5) ** (4.0 / 3.0) / (math.sqrt(q) * m ** (2.0 / 3.0))


def spike_margin(num_slices: int = 1, base: float = SPIKE_TW_MARGIN) -> float:
    """Spike margin in TW units for the largest of ``num_slices`` independent ESDs.

    The TW_1 upper tail decays like exp(-(2/3) s^(3/2)); the maximum of k independent copies
    exceeds s with k times the probability, so the margin that keeps the false-spike rate of a
    single matrix at margin ``base`` solves (2/3) s^(3/2) = (2/3) base^(3/2) + ln k.
    """
    k = max(int(num_slices), 1)
    return (base**1.5 + 1.5 * math.log(k)) ** (2.0 / 3.0)


def mp_cdf(x: ArrayLike, q: float) -> np.ndarray:
    """CDF of the standard (sigma = 1, normalised) MP law with Q = N / M >= 1, in closed form.

    With y = 1/Q, a, b = (1 -+ sqrt(y))^2 and x = (1 + y) - 2 sqrt(y) cos(phi), phi in [0, pi],
    integrating the density gives

        F = (2/pi) [ sin(phi) / (2 sqrt(y)) + (1 + y) phi / (4 y)
                     - (1 - y) / (2 y) * atan2(sqrt(b) sin(phi/2), sqrt(a) cos(phi/2)) ],

    which is 0 at x = a, 1 at x = b, and valid for y = 1 (a = 0) as well. Vectorised.
    """
    x = np.asarray(x, dtype=np.float64)
    y = 1.0 / q
    sy = math.sqrt(y)
    a, b = (1.0 - sy) ** 2, (1.0 + sy) ** 2
    c = np.clip(((1.0 + y) - x) / (2.0 * sy), -1.0, 1.0)
    # phi = arccos(c) in [0, pi], so sin(phi) = sqrt(1 - c^2), sin(phi/2) = sqrt((1 - c)/2) and
    # cos(phi/2) = sqrt((1 + c)/2): square roots instead of three more trigonometric calls (this
    # function dominates the MP fit). atan2 ignores the common factor 1/sqrt(2).
    one_minus, one_plus = 1.0 - c, 1.0 + c
    ang = np.arctan2(np.sqrt(b * one_minus), np.sqrt(a * one_plus))
    f = np.sqrt(one_minus * one_plus)
    f *= 1.0 / (2.0 * sy)
    f += ((1.0 + y) / (4.0 * y)) * np.arccos(c)
    f -= ((1.0 - y) / (2.0 * y)) * ang
    f *= 2.0 / math.pi
    # Exactly 1 at and above the upper edge (the terms cancel only up to rounding there).
    f = np.where(c <= -1.0, 1.0, f)
    return np.clip(f, 0.0, 1.0, out=f if isinstance(f, np.ndarray) else None)


def mp_density(lam: ArrayLike, q: float, sigma: float = 1.0, n: float = 1.0) -> np.ndarray:
    """MP density of eigenvalues of W^T W (n = N) or W^T W / N (n = 1); zero outside the bulk."""
    lam = np.asarray(lam, dtype=np.float64)
    s2 = n * sigma * sigma
    x = lam / s2
    y = 1.0 / q
    a, b = (1.0 - math.sqrt(y)) ** 2, (1.0 + math.sqrt(y)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.sqrt(np.clip((b - x) * (x - a), 0.0, None)) / (2.0 * math.pi * y * x)
    rho = np.where((x > a) & (x < b) & (x > 0), rho, 0.0)
    return rho / s2


def bbp_threshold(q: float) -> float:
    """Signal-to-noise ratio t = theta / sigma above which a rank-one signal leaves the bulk: Q^(-1/4)."""
    return q**-0.25


def bbp_outlier(t: float, q: float, sigma: float = 1.0, n: float = 1.0) -> float:
    """Predicted top eigenvalue for W = G + sqrt(N) t sigma u v^T (Baik, Ben Arous & Peche 2005).

    n sigma^2 (1 + t^2)(1/Q + t^2) / t^2 above the threshold; lambda_+ (the bulk edge) at or
    below it. ``n = 1`` gives the normalised convention, ``n = N`` the unnormalised one.
    """
    if t <= bbp_threshold(q):
        return mp_edges(q, sigma, n)[1]
    t2 = t * t
    return n * sigma * sigma * (1.0 + t2) * (1.0 / q + t2) / t2


def bbp_ratio(lam: float, q: float, sigma: float = 1.0, n: float = 1.0) -> float:
    """Inverse of :func:`bbp_outlier`: the signal strength t whose outlier sits at ``lam``.

    Solving n sigma^2 (1 + t^2)(1/Q + t^2) / t^2 = lam for s = t^2 gives
    s^2 - (L - 1 - 1/Q) s + 1/Q = 0 with L = lam / (n sigma^2); the larger root is the
    supercritical solution. At or below the edge lambda_+ no outlier is resolvable and the
    threshold Q^(-1/4) is returned, so ``bbp_ratio(...) / bbp_threshold(q)`` is >= 1 and says
    how many times stronger than the detection threshold a spike is, at any aspect ratio.
    """
    big = lam / (n * sigma * sigma)
    b = big - 1.0 - 1.0 / q
    disc = b * b - 4.0 / q
    if not (b > 0 and disc > 0):
        return bbp_threshold(q)
    s = 0.5 * (b + math.sqrt(disc))
    return max(math.sqrt(s), bbp_threshold(q))


def _ks_censored(
    xs_sorted: np.ndarray, total: int, upto: int, scales: np.ndarray, q: float, stride: int = 1
) -> np.ndarray:
    """KS distance of the lowest ``upto`` eigenvalues against MP(sigma^2 = each scale).

    The empirical CDF is normalised by ``total`` (all eigenvalues), so eigenvalues above the
    fitted range only enter through the count, never through their positions. ``stride > 1``
    scores every stride-th of them only (at their true ranks): a lower bound, for bracketing.
    """
    idx = np.arange(0, upto, stride)
    f = mp_cdf(xs_sorted[idx][None, :] / scales[:, None], q)
    lo = idx / total
    gap = np.maximum(np.abs(f - lo), np.abs(f - (lo + 1.0 / total)))
    return gap.max(axis=1)


@functools.lru_cache(maxsize=256)
def _mp_median(q: float) -> float:
    """Median of the standard MP law (interpolated on a 2049-point grid; one per aspect ratio)."""
    grid = np.linspace(*mp_edges(q), 2049)
    return float(np.interp(0.5, mp_cdf(grid, q), grid))


def _median_scale(xs_sorted: np.ndarray, q: float) -> float:
    """sigma^2 (normalised) that puts the MP median on the empirical median: a robust start."""
    med = _mp_median(float(q))
    emp = float(np.median(xs_sorted))
    if emp > 0 and med > 0:
        return emp / med
    positive = xs_sorted[xs_sorted > 0]  # over half the spectrum is zero: use the mean instead
    return float(positive.mean()) if positive.size else 0.0


def fit_marchenko_pastur(evals: Eigenvalues, n: int, m: int, *, num_slices: int = 1) -> MPFit:
    """Robust Marchenko-Pastur fit of an ESD in the unnormalised convention.

    Args:
        evals: eigenvalues of W^T W (any order), ``num_slices * m`` of them for a pooled ESD.
        n, m: the shape of one (oriented) slice, n >= m (swapped if given the other way).
        num_slices: number of pooled slices (k for a conv layer's kernel positions).

    Returns:
        :class:`MPFit`. Degenerate input (fewer than 2 eigenvalues, all zero) gives NaNs.
    """
    n, m = (n, m) if n >= m else (m, n)
    q = n / m
    ev = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    ev = ev[np.isfinite(ev)]
    total = ev.size
    if total < 2 or not ev[-1] > 0:
        return MPFit.failed()
    xs = ev / n  # normalised convention: the standard MP law applies to xs / sigma^2
    upto = max(2, int(math.ceil(BULK_FIT_QUANTILE * total)))
    s0 = _median_scale(xs, q)
    if not s0 > 0:
        return MPFit.failed()

    lo, hi = math.log(s0 / SEARCH_RANGE), math.log(s0 * SEARCH_RANGE)
    stride = -(-upto // _COARSE_SAMPLE)  # ceil: at most _COARSE_SAMPLE eigenvalues
    known: dict[int, float] = {}  # exact distances at this stage's points, from the last stage
    for points in (_COARSE_POINTS,) + (_REFINE_POINTS,) * _REFINE_STAGES:
        logs = np.linspace(lo, hi, points)
        todo = np.array([i for i in range(points) if i not in known], dtype=np.intp)
        d = np.empty(points)
        d[todo] = _ks_censored(xs, total, upto, np.exp(logs[todo]), q, stride)
        for i, value in known.items():
            d[i] = value
        best = int(np.argmin(d))
        step = logs[1] - logs[0]
        lo, hi = logs[best] - step, logs[best] + step
        # The next grid's first, middle and last points are this one's best - 1, best, best + 1:
        # their exact distances are known already (not after the sampled coarse stage).
        mid = (_REFINE_POINTS - 1) // 2
        known = {} if stride > 1 else {mid + mid * j: float(d[best + j]) for j in (-1, 0, 1) if 0 <= best + j < points}
        stride = 1
    s2 = float(np.exp(logs[best]))

    sigma = math.sqrt(s2)
    lam_minus, lam_plus = mp_edges(q, sigma, n)
    tw = tracy_widom_scale(n, m, sigma)
    threshold = lam_plus + spike_margin(num_slices) * tw
    n_bulk = int(np.searchsorted(ev, threshold, side="right"))
    num_spikes = total - n_bulk
    ks = _bulk_ks(xs[:n_bulk], s2, q)
    lam_max = float(ev[-1])
    return MPFit(
        sigma=sigma,
        lambda_plus=lam_plus,
        lambda_minus=lam_minus,
        tw_scale=tw,
        num_spikes=int(num_spikes),
        ks=ks,
        mp_softrank=lam_plus / lam_max,
    )


def _bulk_ks(bulk_sorted: np.ndarray, s2: float, q: float) -> float:
    """KS distance between the bulk's own empirical CDF and the fitted MP CDF."""
    nb = bulk_sorted.size
    if nb == 0:
        return 1.0
    f = mp_cdf(bulk_sorted / s2, q)
    i = np.arange(nb, dtype=np.float64)
    return float(np.maximum(np.abs(f - i / nb), np.abs(f - (i + 1.0) / nb)).max())
