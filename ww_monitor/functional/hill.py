"""Hill estimator of the power-law exponent with a fixed xmin (PL_Alpha_Hill).

TempBalance (Zhou et al., NeurIPS 2023), Model Balancing (Liu et al., EMNLP 2024) and
AlphaDecay (He et al., NeurIPS 2025) estimate each layer's alpha without searching for xmin:
with the n eigenvalues sorted ascending (x_0 <= ... <= x_{n-1}) and i = floor(n / xmin_pos),

    alpha = 1 + k / sum_{j=i}^{n-1} ln(x_j / x_i),    k = n - i,

the continuous maximum-likelihood (Hill) estimate for the tail above xmin = x_i. The default
``xmin_pos=2`` puts xmin at the median eigenvalue (the papers' ``xmin_pos=2`` /
``fix_fingers='xmin_mid'``). One pass, no KS search: it is cheap enough to run every epoch, and
its value moves smoothly with the weights (no jumps when the KS-optimal xmin switches), which is
what a per-layer learning-rate rule needs. It is *not* the weightwatcher alpha
(:func:`ww_monitor.fit_power_law`), whose xmin minimises the KS distance; the two differ.
"""

from __future__ import annotations

import math

import numpy as np

from .array_types import Eigenvalues

__all__ = ["hill_alpha", "DEFAULT_XMIN_POS"]

#: xmin = the eigenvalue at index floor(n / 2): the median (TempBalance's ``xmin_pos=2``).
DEFAULT_XMIN_POS = 2.0

#: Fewer eigenvalues leave no tail above the cut: the estimate needs x_i and at least one above it.
_MIN_EIGENVALUES = 2


def hill_alpha(eigenvalues: Eigenvalues, xmin_pos: float = DEFAULT_XMIN_POS) -> float:
    """PL_Alpha_Hill of ``eigenvalues`` with xmin at sorted index ``floor(n / xmin_pos)``.

    Eigenvalues are used as given (the papers do not drop near-zero ones: with the median as
    xmin only the upper half enters the sum). Returns NaN when there is no usable tail: fewer
    than two finite eigenvalues, xmin <= 0, or all tail eigenvalues equal to xmin.

    Example::

        >>> round(hill_alpha([1.0, 1.0, 2.0, 4.0]), 6)   # i = 2, xmin = 2: 1 + 2 / ln(4/2)
        3.885390
    """
    if not (isinstance(xmin_pos, (int, float)) and xmin_pos >= 1.0):
        raise ValueError(f"xmin_pos must be a number >= 1, got {xmin_pos!r}")
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = np.sort(x[np.isfinite(x)])
    n = x.size
    if n < _MIN_EIGENVALUES:
        return math.nan
    i = min(int(n / xmin_pos), n - 1)
    xmin = x[i]
    if not xmin > 0:
        return math.nan
    k = n - i
    denom = float(np.sum(np.log(x[i:] / xmin)))
    if not denom > 0:
        return math.nan
    return 1.0 + k / denom
