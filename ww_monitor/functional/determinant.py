"""The det X = 1 condition of SETOL (Martin & Hinrichs 2025): ``detX_num``, ``detX_val``, ``ERG_gap``.

Rescale the ESD to unit mean, ``x_i = lambda_i * n / sum(lambda)`` (n eigenvalues, zeros
included, as weightwatcher 0.7.7 ``rescale_eigenvalues`` does), and take the tail of the k
largest rescaled eigenvalues. ``detX_num`` is the largest tail whose determinant (product) is
still at least 1 plus the first eigenvalue that brings it below 1, i.e. with the eigenvalues
sorted ascending and ``P(i) = prod_{j >= i} x_j``, the largest index i >= 1 with ``P(i) < 1``
gives ``detX_num = n - i`` (weightwatcher scans i = n-1 down to 1). When no tail product falls
below 1, ``detX_num = n`` and the index is 1 (weightwatcher's loop ends there).
``detX_val`` is the *unscaled* eigenvalue at that index: the lower edge of the detX tail.
``ERG_gap = detX_num - num_pl_spikes`` compares it with the power-law tail.

The products are evaluated as suffix sums of logs, so hundreds of eigenvalues far from 1 neither
overflow nor underflow (weightwatcher multiplies them, which can reach inf or 0 for large
layers; where both are finite the index is the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .array_types import Eigenvalues

__all__ = ["DetX", "detx_constraint"]


@dataclass(frozen=True)
class DetX:
    """Result of :func:`detx_constraint`; ``num = 0`` when the ESD is degenerate."""

    num: int
    index: int
    value: float


def detx_constraint(eigenvalues: Eigenvalues) -> DetX:
    """Size ``detX_num`` and lower edge ``detX_val`` of the det X = 1 tail of an ESD.

    Args:
        eigenvalues: the layer's eigenvalues (any order; all of them, zeros included).
    """
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    n = ev.size
    if n < 2 or not ev[0] < ev[-1]:
        return DetX(0, 0, math.nan)
    total = ev.sum()
    with np.errstate(divide="ignore"):
        logs = np.log(ev * (n / total))  # zeros give -inf: any tail containing them has det 0 < 1
    # suffix[i] = sum_{j >= i} log x_j = log P(i)
    suffix = np.cumsum(logs[::-1])[::-1]
    below = np.flatnonzero(suffix[1:] < 0.0) + 1
    if below.size:
        idx = int(below[-1])
        num = n - idx
    else:
        idx, num = 1, n
    return DetX(num=num, index=idx, value=float(ev[idx]))
