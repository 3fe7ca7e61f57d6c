"""Which layers are worst: one ranking for every figure title, report sentence and ESD choice.

A layer's alpha is a fit to its ESD's tail; with a short tail it swings by units between
snapshots (an alpha of 7 on 11 tail eigenvalues is weaker evidence than 1.7 on 70). So layers
are ranked by **how many standard errors of their fit they lie outside the band**
:data:`ALPHA_GOOD_BAND`::

    score = distance(alpha, [2, 4]) / sigma,    sigma = (alpha - 1) / sqrt(tail)

``sigma`` is the standard error of the power-law maximum-likelihood alpha on ``tail`` points
(Clauset, Shalizi & Newman 2009, eq. 3.2; weightwatcher's ``sigma``). Layers inside the band
score 0 and are never listed; layers whose fit is not reliable
(:mod:`ww_monitor.analysis.reliability`) are left out. Without tail sizes the score is the plain
distance to the band.

:func:`worst_layers` is what the alpha heatmap's title (TensorBoard image and report) and the
report's sentence list, :data:`WORST_LISTED` of them; :func:`choose_figure_layers` gives the ESD
figures to the worst layers first. Pure Python/numpy: no matplotlib here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeGuard

import numpy as np

__all__ = ["ALPHA_GOOD_BAND", "WORST_LISTED", "Outlier", "band_score", "worst_layers", "choose_figure_layers"]

#: The band of alpha that 80-90% of well-trained layers fall into (Martin & Mahoney 2021).
ALPHA_GOOD_BAND = (2.0, 4.0)
#: Layers named as "worst" in the heatmap title and the report (the same list in both).
WORST_LISTED = 3


class Outlier(NamedTuple):
    """A layer outside the band: its alpha, tail size (``None`` if unknown) and score."""

    name: str
    alpha: float
    tail: int | None
    score: float


def _finite(v: Any) -> TypeGuard[float]:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def band_score(alpha: float, tail: float | None = None) -> float:
    """Distance of ``alpha`` outside :data:`ALPHA_GOOD_BAND`, in standard errors of the fit when
    the ``tail`` size is known (see the module docstring); 0 inside the band, NaN if unknown."""
    if not _finite(alpha):
        return math.nan
    lo, hi = ALPHA_GOOD_BAND
    dist = lo - alpha if alpha < lo else alpha - hi if alpha > hi else 0.0
    if dist == 0.0 or not _finite(tail) or tail <= 0:
        return dist
    sigma = max(alpha - 1.0, 1e-12) / math.sqrt(tail)  # alpha > 1 for any power-law MLE
    return dist / sigma


def worst_layers(
    layer_names: Sequence[str],
    alphas: Sequence[float],
    tails: Sequence[float] | None = None,
    reliable: Sequence[bool] | None = None,
    count: int = WORST_LISTED,
) -> list[Outlier]:
    """The ``count`` layers with the highest :func:`band_score` (reliable fits only, when
    ``reliable`` is given), highest first; layers inside the band are not listed."""
    scored = []
    for i, (name, a) in enumerate(zip(layer_names, alphas)):
        if reliable is not None and not bool(reliable[i]):
            continue
        tail = tails[i] if tails is not None else None
        score = band_score(a, tail)
        if _finite(score) and score > 0:
            scored.append(Outlier(name, float(a), int(tail) if _finite(tail) else None, float(score)))
    scored.sort(key=lambda o: -o.score)
    return scored[:count]


def choose_figure_layers(
    names: Sequence[str],
    patterns: Sequence[str] | None,
    max_layers: int,
    alphas: Sequence[float] | None = None,
    tails: Sequence[float] | None = None,
    reliable: Sequence[bool] | None = None,
) -> list[str]:
    """Layers that get an ESD figure: those matching ``patterns``; else the worst layers by
    :func:`worst_layers` (given ``alphas``), then, for the slots left, layers spread evenly from
    first to last; at most ``max_layers``."""
    if patterns:
        chosen = [n for n in names if any(re.search(p, n) for p in patterns)]
        return chosen[:max_layers] if max_layers else chosen
    if max_layers <= 0 or not names:
        return []
    if len(names) <= max_layers:
        return list(names)
    chosen = (
        [o.name for o in worst_layers(names, alphas, tails, reliable, count=max_layers)] if alphas is not None else []
    )
    taken = set(chosen)
    rest = [n for n in names if n not in taken]
    need = max_layers - len(chosen)
    if need > 0 and rest:
        idx = np.linspace(0, len(rest) - 1, need).round().astype(int)
        chosen += [rest[i] for i in dict.fromkeys(idx.tolist())]
    return chosen
