"""Alpha of every balanced unit: computed here (cheap) or taken from a WeightWatcherCallback.

Two estimators:

* ``"hill_median"`` (the papers'): :func:`ww_monitor.functional.hill.hill_alpha` with xmin at
  the median eigenvalue (``xmin_pos=2``).
* ``"ww"``: ww_monitor's weightwatcher-compatible fit (:func:`ww_monitor.fit_power_law`, xmin by
  the smallest KS distance, near-zero eigenvalues below the precision-aware rank tolerance left
  out, as in :func:`ww_monitor.analyze`).

Computed here, the eigenvalues are those of the Gram matrix W^T W in float64
(:func:`ww_monitor.functional.eigenvalues.batched_eigenvalues`, ``eigvalsh``; conv kernels pooled
over kernel positions with each slice scaled by sqrt(1/2), as weightwatcher and TempBalance do).
The weights are read through a *weight source* (:class:`LocalWeights` by default: each matrix
as this process holds it, all in one batch; rank 0 alone decomposes). A sharded model's source
(:class:`~ww_monitor.balancing.sharded.ShardedWeights`) materialises one layer's full weights
at a time and marks itself ``collective``: every rank then iterates it in step, decomposes what
it yields to that rank (its share), and the alphas are gathered (:func:`gathered_alphas`).

A unit whose ESD has fewer than ``min_evals`` eigenvalues, or whose fit failed, is *unreliable*
and keeps factor 1. A unit with several ESDs (attention q/k/v, RNN gates) gets the mean alpha of
its reliable ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..analysis.layers import LayerMatrix
from ..functional.eigenvalues import batched_eigenvalues
from ..functional.hill import hill_alpha
from ..functional.power_law import DEFAULT_MIN_EIGENVALUE, fit_power_law
from ..functional.spectral_metrics import rank_tolerance
from .groups import Unit

__all__ = [
    "ESTIMATORS",
    "MIN_BALANCE_EVALS",
    "EsdAlpha",
    "WeightSource",
    "LocalWeights",
    "own_alphas",
    "gathered_alphas",
    "monitor_alphas",
    "unit_alphas",
]

ESTIMATORS = ("hill_median", "ww")

#: Fewer eigenvalues than this and a layer keeps factor 1: TempBalance, Model Balancing and
#: AlphaDecay all skip such layers (``eigs_thresh=50``); with so few eigenvalues the tail above
#: the median holds < 25 points and alpha is mostly noise.
MIN_BALANCE_EVALS = 50


@dataclass(frozen=True)
class EsdAlpha:
    """Alpha of one ESD and whether it may steer its layer."""

    name: str
    alpha: float
    num_evals: int
    reliable: bool


WeightBatch = list[tuple[LayerMatrix, torch.Tensor]]


class WeightSource(Protocol):
    """Yields the full weight of the given matrices, in batches that are decomposed together."""

    #: True when reading is a collective (gathering shards): every rank iterates the source
    #: together, in the same order, and gets the matrices it decomposes (each matrix on one rank,
    #: or on several: the first rank's alpha counts). False: every matrix, on rank 0 alone.
    collective: bool

    def __call__(self, matrices: Sequence[LayerMatrix]) -> Iterator[WeightBatch]: ...


class LocalWeights:
    """Each matrix's weight as this process holds it (one process, or replicated under DDP), in one
    batch (same-shape matrices are then decomposed in one batched call)."""

    collective = False

    def __call__(self, matrices: Sequence[LayerMatrix]) -> Iterator[WeightBatch]:
        yield [(m, m.weight.detach()) for m in matrices]


def _esd_alpha(
    name: str, evals: np.ndarray, estimator: str, xmin_pos: float, min_evals: int, n: int, m: int, dtype
) -> EsdAlpha:
    if estimator == "hill_median":
        alpha, ok = hill_alpha(evals, xmin_pos), True
    else:
        lam_max = float(evals[-1]) if evals.size else 0.0
        fit = fit_power_law(evals, min_eigenvalue=max(DEFAULT_MIN_EIGENVALUE, rank_tolerance(lam_max, n, m, dtype)))
        alpha, ok = fit.alpha, fit.ok
    reliable = ok and math.isfinite(alpha) and alpha > 1.0 and evals.size >= min_evals
    return EsdAlpha(name, float(alpha), int(evals.size), bool(reliable))


def _matrices(units: Sequence[Unit]) -> list[LayerMatrix]:
    return [m for u in units for m in u.matrices]


def own_alphas(
    units: Sequence[Unit],
    estimator: str,
    xmin_pos: float,
    min_evals: int,
    method: str = "auto",
    weights: WeightSource | None = None,
) -> list[EsdAlpha]:
    """Eigenvalues of every unit's ESDs (batched, float64, read-only) and their alphas; the
    weights come from ``weights`` (default :class:`LocalWeights`), one batch at a time."""
    source = weights if weights is not None else LocalWeights()
    out = []
    batches = source(_matrices(units))
    with torch.no_grad():
        try:
            for batch in batches:
                evals = batched_eigenvalues([w for _, w in batch], method=method)
                for (m, w), ev in zip(batch, evals):
                    n, k = max(w.shape[-2:]), min(w.shape[-2:])
                    out.append(_esd_alpha(m.name, ev * m.eig_scale, estimator, xmin_pos, min_evals, n, k, m.precision))
                batch = w = None  # type: ignore[assignment]  # a gathered full weight must not outlive its layer
        except Exception:
            if getattr(source, "collective", False):  # keep reading along with the other ranks, then fail
                for _ in batches:
                    pass
            raise
    return out


def gathered_alphas(
    units: Sequence[Unit],
    estimator: str,
    xmin_pos: float,
    min_evals: int,
    weights: WeightSource,
    collectives,
    rank: int,
    world: int,
) -> list[EsdAlpha]:
    """Every rank (a collective ``weights``): :func:`own_alphas` of what the source yields this rank,
    gathered from every rank over ``collectives`` (``all_gather_object``). A failure on any rank
    raises on every rank, after the gather, so no rank is left waiting."""
    esds, error = [], None
    try:
        esds = own_alphas(units, estimator, xmin_pos, min_evals, weights=weights)
    except Exception as err:  # reported after the gather, which every rank must reach
        error = f"rank {rank}: {type(err).__name__}: {err}"
    parts = collectives.all_gather_object((esds, error), world)
    errors = [e for _, e in parts if e is not None]
    if errors:
        raise RuntimeError("; ".join(errors))
    merged: dict[str, EsdAlpha] = {}
    for part, _ in parts:
        for e in part:
            merged.setdefault(e.name, e)
    return list(merged.values())


def monitor_alphas(results, estimator: str, xmin_pos: float, min_evals: int) -> list[EsdAlpha]:
    """Alphas from a WeightWatcherCallback's latest results (``LayerResult`` list).

    ``"ww"`` takes the monitor's own fit; a ``reliable`` flag on the result, where the monitor
    provides one, decides, else ``fit_ok`` and ``min_evals``. ``"hill_median"`` recomputes the
    Hill estimate from the result's eigenvalues (kept by the monitor), no eigensolve. A tied
    weight, analysed once under its first name, is given under each of its names (``aliases``:
    GPT-2's ``lm_head`` of ``wte``).
    """
    out: list[EsdAlpha] = []
    for r in results:
        if estimator == "ww":
            flag = getattr(r, "reliable", None)
            ok = bool(r.fit_ok) and math.isfinite(r.alpha) and r.num_evals >= min_evals
            alpha, reliable = float(r.alpha), ok if flag is None else (bool(flag) and math.isfinite(r.alpha))
        elif r.eigenvalues is not None:
            alpha = float(hill_alpha(r.eigenvalues, xmin_pos))
            reliable = math.isfinite(alpha) and alpha > 1.0 and r.num_evals >= min_evals
        else:
            continue
        out.extend(EsdAlpha(name, alpha, int(r.num_evals), reliable) for name in (r.name, *r.aliases))
    return out


#: Name segment of a LoRA layer's base weight; the monitor's layer finder names that matrix after
#: the LoRA layer itself (``<layer>.base_layer`` -> ``<layer>``, see ``analysis/adapters.py``).
_LORA_BASE = ".base_layer"


def unit_alphas(units: Sequence[Unit], esds: Sequence[EsdAlpha]) -> tuple[list[float], list[bool]]:
    """Per unit: the mean alpha of its reliable ESDs and whether it has one (for a unit without,
    the mean of its finite alphas, shown but not used; NaN if none)."""
    by_name = {e.name: e for e in esds}
    alphas, reliable = [], []
    for u in units:
        found = [
            e
            for e in (by_name.get(m.name) or by_name.get(m.name.replace(_LORA_BASE, "", 1)) for m in u.matrices)
            if e is not None
        ]
        good = [e.alpha for e in found if e.reliable]
        shown = good or [e.alpha for e in found if math.isfinite(e.alpha)]
        alphas.append(float(np.mean(shown)) if shown else math.nan)
        reliable.append(bool(good))
    return alphas, reliable
