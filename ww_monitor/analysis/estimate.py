"""Opt-in estimate for matrices too large to decompose whole (``analyze(..., estimate_above=M)``).

A 2-D matrix whose smaller side M exceeds ``estimate_above`` is not decomposed: its alpha comes
from the pooled ESD of random fixed-aspect-ratio submatrices
(:func:`~ww_monitor.functional.sampled.submatrix_eigenvalues`, FARMS-style), its lambda_max
from Lanczos on the whole matrix and its Frobenius norm exactly, so ``lambda_max``,
``log_norm``, ``log_spectral_norm``, ``stable_rank`` and ``alpha_weighted`` are the whole
matrix's; ``alpha``, ``D``, ``xmin``, ``num_pl_spikes`` describe the pooled sample ESD. What
needs every eigenvalue (rank, entropy, ``log_alpha_norm``, the Marchenko-Pastur fit, the phase)
is not computed (NaN / None). The result says ``method="sampled"``. Its error against the full
fit: ``benchmarks/bench_estimate.py`` and docs/large_models.md.
"""

from __future__ import annotations

import math

import torch

from ..functional.power_law import DEFAULT_MIN_EIGENVALUE, fit_power_law
from ..functional.sampled import submatrix_eigenvalues, top_eigenvalue
from ..functional.spectral_metrics import norms_from, rank_tolerance
from .layers import LayerMatrix
from .results import LayerResult

__all__ = ["wants_estimate", "estimated_layer_result"]


def wants_estimate(m: LayerMatrix, estimate_above: int | None) -> bool:
    """True for a 2-D matrix whose smaller side exceeds ``estimate_above`` (None: never)."""
    return estimate_above is not None and m.weight.ndim == 2 and m.M > estimate_above


def estimated_layer_result(m: LayerMatrix, config) -> LayerResult | None:
    """Metrics of one large matrix from sampled submatrices; ``None`` if its weights are non-finite."""
    w = m.weight
    frob2 = float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2)
    if not math.isfinite(frob2):
        return None
    ev, _, _ = submatrix_eigenvalues(w, size=config.estimate_size, samples=config.estimate_samples, seed=config.seed)
    ev = ev * m.eig_scale
    lam_max = top_eigenvalue(w) * m.eig_scale
    res = LayerResult(
        name=m.name,
        kind=m.kind,
        N=m.N,
        M=m.M,
        Q=m.N / m.M,
        num_evals=int(ev.size),
        num_slices=1,
        dtype=str(w.dtype).replace("torch.", ""),
        method="sampled",
    )
    # Norms of the whole matrix: trace = squared Frobenius norm, lambda_max from Lanczos.
    for key, value in norms_from(frob2 * m.eig_scale, lam_max).items():
        setattr(res, key, value)
    res.rank_loss = 0
    tol = rank_tolerance(float(ev[-1]) if ev.size else 0.0, m.N, m.M, w.dtype)
    fit = fit_power_law(ev, min_eigenvalue=max(DEFAULT_MIN_EIGENVALUE, tol))
    res.fit_ok, res.fit_reason = fit.ok, fit.reason
    res.alpha, res.xmin, res.xmax, res.D, res.sigma = fit.alpha, fit.xmin, lam_max, fit.D, fit.sigma
    res.num_pl_spikes = fit.num_pl_spikes
    if fit.ok and lam_max > 0:
        res.alpha_weighted = fit.alpha * math.log10(lam_max)
    if config.keep_eigenvalues:
        res.eigenvalues = ev
    return res
