"""Norm- and rank-based metrics of one ESD (weightwatcher-compatible definitions).

Eigenvalues are lambda_i = s_i^2 of the raw weight matrix (no 1/N normalisation), so the log
norms match weightwatcher and the published tables.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["rank_tolerance", "matrix_rank", "norm_metrics", "norms_from", "alpha_metrics", "matrix_entropy"]


def rank_tolerance(lambda_max: float, n: int, m: int, dtype: torch.dtype = torch.float32) -> float:
    """Eigenvalue below which a direction counts as zero, from the precision of the *weights*.

    Singular-value tolerance, squared to apply to eigenvalues:

    * float32/float64 weights: numpy's ``matrix_rank`` rule ``s_max * max(N, M) * eps(dtype)``,
      so a float32 low-rank matrix (noise floor ~1e-7 s_max) is detected.
    * 16-bit weights: that rule with eps(bf16) = 7.8e-3 would call half of a healthy spectrum
      zero. Such weights are computed in float32 and then rounded, which perturbs the singular
      values by about 0.1 eps(dtype) * s_max (measured on rounded low-rank products), so the
      tolerance is ``s_max * max(max(N, M) * eps(float32), eps(dtype))``: 10x above that floor.

    Never below the float64 Gram floor ``M * eps64 * lambda_max`` (see :mod:`.eigenvalues`).
    """
    dims = max(n, m)
    if not dtype.is_floating_point or dtype.itemsize >= 4:
        eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
        rel = dims * eps
    else:
        rel = max(dims * torch.finfo(torch.float32).eps, torch.finfo(dtype).eps)
    sv_tol = math.sqrt(max(lambda_max, 0.0)) * rel
    return max(sv_tol * sv_tol, lambda_max * m * float(np.finfo(np.float64).eps))


def matrix_rank(evals: np.ndarray, tol: float) -> int:
    """Number of eigenvalues above ``tol``."""
    return int(np.count_nonzero(np.asarray(evals) > tol))


def matrix_entropy(evals: np.ndarray, rank: int) -> float:
    """Normalised matrix entropy ``-sum p ln p / ln(rank)``, ``p = lambda / sum lambda``.

    In [0, 1]: 1 for a flat spectrum, 0 for rank one (Martin & Mahoney 2021, eq. 7).
    """
    ev = np.asarray(evals, dtype=np.float64)
    total = ev.sum()
    if rank <= 1 or not total > 0:
        return 0.0 if rank == 1 else math.nan
    p = ev[ev > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(rank))


def norm_metrics(evals: np.ndarray) -> dict:
    """lambda_max, log_norm = log10(sum lambda), log_spectral_norm, stable_rank."""
    ev = np.asarray(evals, dtype=np.float64)
    return norms_from(float(ev.sum()), float(ev[-1]) if ev.size else math.nan)


def norms_from(total: float, lambda_max: float) -> dict:
    """:func:`norm_metrics` from sum(lambda) (= squared Frobenius norm) and lambda_max alone."""
    return {
        "lambda_max": lambda_max,
        "log_norm": math.log10(total) if total > 0 else math.nan,
        "log_spectral_norm": math.log10(lambda_max) if lambda_max > 0 else math.nan,
        "stable_rank": total / lambda_max if lambda_max > 0 else math.nan,
    }


def alpha_metrics(evals: np.ndarray, alpha: float, lambda_max: float) -> dict:
    """alpha_weighted = alpha * log10(lambda_max); log_alpha_norm = log10(sum lambda^alpha).

    The sum is taken in log space (logsumexp) so large alpha does not overflow float64.
    """
    if not math.isfinite(alpha) or not lambda_max > 0:
        return {"alpha_weighted": math.nan, "log_alpha_norm": math.nan}
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > 0]
    scaled = alpha * np.log(ev)
    top = scaled.max()
    log_sum = top + math.log(np.exp(scaled - top).sum())
    return {
        "alpha_weighted": alpha * math.log10(lambda_max),
        "log_alpha_norm": log_sum / math.log(10.0),
    }
