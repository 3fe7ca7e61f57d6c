"""Seeded generators of N x M weight matrices in each of the 5+1 phases (Martin & Mahoney 2021).

Every generator returns a **numpy** array of shape ``(n, m)`` (float32 unless ``dtype`` says
otherwise; wrap it with ``torch.from_numpy`` to put it in a model) and takes either ``seed``
(an int, or None for fresh entropy) or ``generator`` (a ``numpy.random.Generator``, which wins
over ``seed``). The same seed always gives the same matrix.

Notation: W is N x M with N >= M after orientation (``n < m`` works too: the ESD is the same
for the transpose), Q = N / M, G has i.i.d. N(0, sigma^2) entries, and a rank-one signal
``sqrt(N) t sigma u v^T`` (unit u, v) has BBP ratio ``t``; it leaves the MP bulk iff
``t > Q^(-1/4)`` (:func:`~ww_monitor.functional.marchenko_pastur.bbp_threshold`). Several
generators take ratios *relative to that threshold* (``t / Q^(-1/4)``), so the same argument
means the same distance from the edge at every aspect ratio.

=======================  ==================================================================
generator                phase it shows
=======================  ==================================================================
:func:`gaussian`         random-like
:func:`uniform`          random-like (PyTorch's default initialisation)
:func:`spiked`           random-like below the threshold, bleeding-out just above it,
                         bulk+spikes well above it
:func:`bleeding_out`     bleeding-out (graded spikes 1.3-1.6 x threshold)
:func:`graded_spikes`    bulk+spikes (graded spikes 3-8 x threshold)
:func:`bulk_decay`       bulk-decay (~20% of the directions form a shoulder above the edge)
:func:`decaying_ladder`  bulk-decay (5-10 outliers whose strengths fall smoothly from well
                         above the BBP threshold down into the edge)
:func:`heavy_tailed`     heavy-tailed (Student-t / Pareto entries with tail index mu < 4)
:func:`power_law_spectrum`  heavy-tailed (singular values with a power-law ESD)
:func:`low_rank`         rank-collapse (product of two thin factors)
:func:`zeroed_columns`   rank-collapse (a fraction of the columns set to zero)
=======================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..functional.marchenko_pastur import bbp_threshold

__all__ = [
    "GENERATORS",
    "bleeding_out",
    "bulk_decay",
    "decaying_ladder",
    "gaussian",
    "graded_spikes",
    "heavy_tailed",
    "low_rank",
    "power_law_spectrum",
    "spiked",
    "uniform",
    "zeroed_columns",
]

#: Default spike strengths of :func:`bleeding_out`, as multiples of the BBP threshold. At 1.3-1.6x
#: the outliers sit 7-25% above lambda_+ (any Q): out of the bulk, but not well separated.
BLEEDING_OUT_RATIOS = (1.3, 1.6)
#: Default strengths of :func:`graded_spikes`: 3-8x the threshold puts the outliers 1.5-60x
#: lambda_+ above zero, far from the edge at every size.
GRADED_SPIKE_RATIOS = (3.0, 8.0)
#: Share of directions that :func:`bulk_decay` lifts out of the bulk, and their strengths
#: relative to the BBP threshold: a dense continuum from the edge to ~1.5x lambda_+.
BULK_DECAY_FRACTION = 0.2
BULK_DECAY_RATIOS = (0.8, 2.0)
#: Defaults of :func:`decaying_ladder`: 8 outliers, the strongest 4x the BBP threshold (far out,
#: like a bulk+spikes spike), each next one's excess over the threshold 0.6x the previous one's,
#: so the weakest (1 + 3 * 0.6^7 = 1.08x) sits just above lambda_+.
LADDER_OUTLIERS = 8
LADDER_TOP_RATIO = 4.0
LADDER_DECAY = 0.6


def _rng(seed, generator) -> np.random.Generator:
    if generator is not None:
        return generator
    return np.random.default_rng(seed)


def _shape(n: int, m: int) -> tuple[int, int, bool]:
    """Oriented (N, M) with N >= M, and whether the result must be transposed back."""
    if n < 1 or m < 1:
        raise ValueError(f"matrix dimensions must be positive, got {n} x {m}")
    return (n, m, False) if n >= m else (m, n, True)


def _finish(w: np.ndarray, flip: bool, dtype) -> np.ndarray:
    w = w.T if flip else w
    return np.ascontiguousarray(w, dtype=dtype)


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """rows x cols matrix with orthonormal columns, Haar distributed (QR with sign fix).

    The QR runs in torch: it honours ``torch.set_num_threads`` and was ~10x faster than
    numpy's on a loaded 2-core machine for 4096 x 1024.
    """
    q, r = torch.linalg.qr(torch.from_numpy(rng.standard_normal((rows, cols))))
    return (q * torch.sign(torch.diagonal(r))[None, :]).numpy()


def gaussian(n: int, m: int, *, sigma: float = 1.0, seed=None, generator=None, dtype=np.float32) -> np.ndarray:
    """I.i.d. N(0, sigma^2) entries. **random-like**: MP ESD, lambda_max within TW of lambda_+."""
    rng = _rng(seed, generator)
    return (sigma * rng.standard_normal((n, m))).astype(dtype, copy=False)


def uniform(n: int, m: int, *, sigma: float = 1.0, seed=None, generator=None, dtype=np.float32) -> np.ndarray:
    """I.i.d. uniform entries with standard deviation ``sigma`` (PyTorch's default Linear/Conv
    init is uniform). **random-like**: MP is universal for i.i.d. entries of finite variance."""
    rng = _rng(seed, generator)
    half = sigma * math.sqrt(3.0)  # U(-a, a) has variance a^2 / 3
    return rng.uniform(-half, half, size=(n, m)).astype(dtype, copy=False)


def spiked(
    n: int,
    m: int,
    ratios,
    *,
    sigma: float = 1.0,
    relative: bool = False,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """Gaussian bulk plus orthogonal rank-one signals: W = G + sqrt(N) sigma sum_i t_i u_i v_i^T.

    Args:
        ratios: one BBP ratio t or a sequence of them (one per spike, u_i and v_i orthonormal,
            Haar distributed, i.e. delocalised).
        relative: read ``ratios`` as multiples of the BBP threshold Q^(-1/4).

    Phase: each t > Q^(-1/4) gives an outlier at
    :func:`~ww_monitor.functional.marchenko_pastur.bbp_outlier`; below it the ESD stays MP
    (**random-like**). Just above: **bleeding-out**; far above: **bulk+spikes**.
    """
    N, M, flip = _shape(n, m)
    rng = _rng(seed, generator)
    t = np.atleast_1d(np.asarray(ratios, dtype=np.float64))
    if relative:
        t = t * bbp_threshold(N / M)
    if t.size > M:
        raise ValueError(f"at most M = {M} orthogonal spikes fit, got {t.size}")
    w = sigma * rng.standard_normal((N, M))
    u = _orthonormal(rng, N, t.size)
    v = _orthonormal(rng, M, t.size)
    w += math.sqrt(N) * sigma * (u * t[None, :]) @ v.T
    return _finish(w, flip, dtype)


def bleeding_out(
    n: int,
    m: int,
    num_spikes: int = 2,
    *,
    ratios: Sequence[float] = BLEEDING_OUT_RATIOS,
    sigma: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**bleeding-out**: a few graded spikes just above the BBP threshold.

    ``num_spikes`` strengths evenly spaced in ``ratios`` (multiples of Q^(-1/4)): the outliers
    leave the bulk but stay within ~25% of lambda_+. They are resolvable from Tracy-Widom
    fluctuations (~ lambda_+ M^(-2/3)) only for M >~ 256.
    """
    lo, hi = ratios
    t = np.linspace(hi, lo, num_spikes)
    return spiked(n, m, t, sigma=sigma, relative=True, seed=seed, generator=generator, dtype=dtype)


def graded_spikes(
    n: int,
    m: int,
    num_spikes: int = 3,
    *,
    ratios: Sequence[float] = GRADED_SPIKE_RATIOS,
    sigma: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**bulk+spikes**: MP bulk plus ``num_spikes`` well-separated spikes of graded strength.

    Strengths are geometrically spaced in ``ratios`` (multiples of the BBP threshold), the
    classic low-rank-signal (Tikhonov-like) picture of Martin & Mahoney's phase 3.
    """
    lo, hi = ratios
    t = np.geomspace(hi, lo, num_spikes)
    return spiked(n, m, t, sigma=sigma, relative=True, seed=seed, generator=generator, dtype=dtype)


def bulk_decay(
    n: int,
    m: int,
    *,
    fraction: float = BULK_DECAY_FRACTION,
    ratios: Sequence[float] = BULK_DECAY_RATIOS,
    sigma: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**bulk-decay**: the bulk edge dissolves into a continuum of eigenvalues above lambda_+.

    ``round(fraction * M)`` orthogonal signals with strengths evenly spaced in ``ratios``
    (multiples of the BBP threshold, some below it) are added to a Gaussian bulk. Their
    outliers merge into a dense, decaying shoulder from lambda_+ to ~1.5 lambda_+: not MP,
    and too short a tail for a power law (lambda_max stays below 2 lambda_+). Resolvable as a
    continuum (rather than a few spikes) for M >~ 256.
    """
    _N, M, _ = _shape(n, m)
    k = max(1, int(round(fraction * M)))
    lo, hi = ratios
    return spiked(n, m, np.linspace(hi, lo, k), sigma=sigma, relative=True, seed=seed, generator=generator, dtype=dtype)


def decaying_ladder(
    n: int,
    m: int,
    num_outliers: int = LADDER_OUTLIERS,
    *,
    top: float = LADDER_TOP_RATIO,
    decay: float = LADDER_DECAY,
    sigma: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**bulk-decay**: a decaying ladder of outliers, Martin & Mahoney's continuum leaving the bulk.

    ``num_outliers`` orthogonal rank-one signals with strengths (multiples of the BBP threshold)
    t_i = 1 + (top - 1) decay^i, i = 0 .. num_outliers - 1: the strongest well separated, each
    next one closer to the edge, the weakest just above it. Unlike :func:`graded_spikes` (a few
    isolated spikes with a clean gap to lambda_+) there is no gap: the outliers fill the range
    from the edge outwards. Rates ``decay`` in [0.5, 0.7] keep 3-8 of them above Tracy-Widom
    noise for M >= 256.
    """
    if not 0 < decay < 1:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    if not top > 1:
        raise ValueError(f"top must be > 1 (a multiple of the BBP threshold), got {top}")
    t = 1.0 + (top - 1.0) * decay ** np.arange(int(num_outliers))
    return spiked(n, m, t, sigma=sigma, relative=True, seed=seed, generator=generator, dtype=dtype)


def heavy_tailed(
    n: int,
    m: int,
    *,
    mu: float = 2.0,
    distribution: str = "student-t",
    scale: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**heavy-tailed**: i.i.d. entries whose tails fall off as |x|^-(1 + mu).

    ``distribution="student-t"`` uses Student-t with ``mu`` degrees of freedom,
    ``"pareto"`` a symmetric Pareto (random sign times (1 + Pareto(mu))). For mu < 4 the ESD of
    W^T W is itself heavy tailed (Martin & Mahoney 2021, Table 3: mu < 2 very heavy tailed with
    alpha ~ 1 + mu/2, 2 < mu < 4 moderately heavy tailed); for mu > 4 it approaches MP as N grows.
    """
    rng = _rng(seed, generator)
    if distribution == "student-t":
        w = rng.standard_t(mu, size=(n, m))
    elif distribution == "pareto":
        w = (1.0 + rng.pareto(mu, size=(n, m))) * rng.choice((-1.0, 1.0), size=(n, m))
    else:
        raise ValueError(f"distribution must be 'student-t' or 'pareto', got {distribution!r}")
    return (scale * w).astype(dtype, copy=False)


def power_law_spectrum(
    n: int,
    m: int,
    *,
    alpha: float = 2.5,
    scale: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**heavy-tailed**: W = U diag(sqrt(lambda)) V^T with a power-law ESD of exponent ``alpha``.

    The M eigenvalues lambda are drawn from rho(lambda) ~ lambda^-alpha on [scale, inf) (a
    Pareto law with index alpha - 1), U and V Haar-distributed with orthonormal columns, so
    the eigenvalues of W^T W are exactly those draws: no bulk, no edge, pure power law.
    """
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1 for a normalisable power law, got {alpha}")
    N, M, flip = _shape(n, m)
    rng = _rng(seed, generator)
    lam = scale * (1.0 + rng.pareto(alpha - 1.0, size=M))
    u = _orthonormal(rng, N, M)
    v = _orthonormal(rng, M, M)
    w = (u * np.sqrt(lam)[None, :]) @ v.T
    return _finish(w, flip, dtype)


def low_rank(
    n: int,
    m: int,
    rank: int | None = None,
    *,
    sigma: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**rank-collapse**: W = A B / sqrt(rank), A n x rank and B rank x m Gaussian.

    ``rank`` defaults to min(n, m) // 2: half the eigenvalues are exactly zero (up to
    rounding), the signature of too much explicit regularisation.
    """
    rng = _rng(seed, generator)
    r = min(n, m) // 2 if rank is None else int(rank)
    if not 1 <= r <= min(n, m):
        raise ValueError(f"rank must be in [1, {min(n, m)}], got {r}")
    a = rng.standard_normal((n, r))
    b = rng.standard_normal((r, m))
    return (sigma * (a @ b) / math.sqrt(r)).astype(dtype, copy=False)


def zeroed_columns(
    n: int,
    m: int,
    fraction: float = 0.3,
    *,
    sigma: float = 1.0,
    seed=None,
    generator=None,
    dtype=np.float32,
) -> np.ndarray:
    """**rank-collapse**: a Gaussian matrix with ``round(fraction * min(n, m))`` dead units.

    The dead units are zero columns of the oriented (N >= M) matrix, so the rank drops by
    exactly that many; which ones is random.
    """
    N, M, flip = _shape(n, m)
    rng = _rng(seed, generator)
    k = int(round(fraction * M))
    if not 0 <= k <= M:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    w = sigma * rng.standard_normal((N, M))
    w[:, rng.choice(M, size=k, replace=False)] = 0.0
    return _finish(w, flip, dtype)


#: Name -> (generator, phase value it is built to show) for calibration and tests. Values
#: are :class:`~ww_monitor.analysis.phases.Phase` values (strings) to keep this module import-light.
GENERATORS = {
    "gaussian": (gaussian, "random-like"),
    "uniform": (uniform, "random-like"),
    "bleeding_out": (bleeding_out, "bleeding-out"),
    "graded_spikes": (graded_spikes, "bulk+spikes"),
    "bulk_decay": (bulk_decay, "bulk-decay"),
    "decaying_ladder": (decaying_ladder, "bulk-decay"),
    "heavy_tailed": (heavy_tailed, "heavy-tailed"),
    "power_law_spectrum": (power_law_spectrum, "heavy-tailed"),
    "low_rank": (low_rank, "rank-collapse"),
    "zeroed_columns": (zeroed_columns, "rank-collapse"),
}
