"""Estimate a large matrix's ESD tail without its full eigendecomposition.

Fixed-aspect-ratio submatrix sampling, after FARMS (Yang et al., "Eigenspectrum analysis of
neural networks without aspect ratio bias", ICML 2025): draw ``samples`` submatrices of W with
``n`` rows and ``m`` columns chosen at random without replacement, ``n / m`` = W's own aspect
ratio Q (so every sample has the Marchenko-Pastur shape of the whole), take each one's
eigenvalues exactly and pool them, as the pooled slices of a convolution. A power-law fit on the
pooled ESD estimates the whole matrix's alpha:

* i.i.d. heavy-tailed entries: the ESD tail exponent is set by the entries' distribution, which
  every submatrix shares;
* correlated (trained) weights W = U S V^T with incoherent singular vectors: the largest
  eigenvalues of a submatrix are ~ lambda_i * (n m) / (N M), the same rank-size law, and the
  top of a power law is again a power law with the same exponent.

The eigenvalues are multiplied by N / n, which puts the samples' MP bulk (n sigma^2 (1 +- Q^-1/2)^2)
where the whole matrix's is, so ``xmin`` is on the familiar scale. Cost: ``samples`` solves of
size (Q m) x m instead of one of N x M: (M / m)^3 / samples times less work. The estimate's
error against the full fit is measured in ``benchmarks/bench_estimate.py`` (table in docs/large_models.md).

:func:`top_eigenvalue` gives lambda_max of the whole W (Lanczos on x -> W^T W x), so the
spectral norm and ``alpha_weighted`` are the whole matrix's, not a sample's.
"""

from __future__ import annotations

import numpy as np
import torch

from .array_types import Matrix
from .eigenvalues import batched_eigenvalues

__all__ = ["submatrix_eigenvalues", "top_eigenvalue", "DEFAULT_SAMPLE_SIZE", "DEFAULT_SAMPLES"]

#: Columns (smaller side) of each sampled submatrix. 1024 keeps one sample's solve at ~0.1 s on
#: one CPU core while leaving ~100-300 tail eigenvalues per sample for the fit.
DEFAULT_SAMPLE_SIZE = 1024
#: Submatrices per matrix: the pooled ESD has samples * m eigenvalues. 8 samples bring the
#: alpha spread between seeds below ~2% on the benchmark's spectra.
DEFAULT_SAMPLES = 8
#: Lanczos tolerance for lambda_max: relative, far below the float32 weights' own precision
#: matters only through log10, so 1e-8 is ample.
_LANCZOS_TOL = 1e-8


def _oriented(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1) if t.shape[0] < t.shape[1] else t


def submatrix_eigenvalues(
    w: Matrix, *, size: int = DEFAULT_SAMPLE_SIZE, samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> tuple[np.ndarray, int, int]:
    """Pooled eigenvalues of ``samples`` random (Q m) x m submatrices of a 2-D ``w``.

    Returns ``(eigenvalues, n, m)``: the pooled ESD (sorted ascending, scaled by N / n) and the
    submatrix shape. Rows and columns are drawn without replacement with a generator seeded by
    ``seed``, so the estimate is reproducible. ``size >= M`` samples the whole matrix.
    """
    t = w.detach() if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(t.shape)}")
    if not (isinstance(size, int) and size >= 2 and isinstance(samples, int) and samples >= 1):
        raise ValueError(f"size must be an int >= 2 and samples an int >= 1, got {size!r}, {samples!r}")
    t = _oriented(t)
    big_n, big_m = t.shape
    m = min(size, big_m)
    n = min(big_n, max(m, int(round(big_n * m / big_m))))
    gen = torch.Generator().manual_seed(int(seed))
    subs = []
    for _ in range(samples):
        rows = torch.randperm(big_n, generator=gen)[:n].sort().values.to(t.device)
        cols = torch.randperm(big_m, generator=gen)[:m].sort().values.to(t.device)
        subs.append(t.index_select(0, rows).index_select(1, cols))
    parts = batched_eigenvalues(subs)
    ev = np.sort(np.concatenate(parts)) * (big_n / n)
    return ev, n, m


def top_eigenvalue(w: Matrix) -> float:
    """lambda_max of W^T W (the squared spectral norm) by Lanczos, without forming W^T W."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    t = w.detach() if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
    t = _oriented(t)
    if t.shape[1] <= 2:  # Lanczos needs a few dimensions; a tiny Gram is cheaper exactly
        return float(batched_eigenvalues([t])[0][-1])
    work = t.to(torch.float64) if t.device.type == "cpu" else t.float()

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=work.dtype, device=work.device)
        return (work.T @ (work @ v)).to(torch.float64).cpu().numpy()

    op = LinearOperator((t.shape[1], t.shape[1]), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(t.shape[1])  # seeded: reproducible
    val = eigsh(op, k=1, which="LA", tol=_LANCZOS_TOL, v0=v0, return_eigenvectors=False)
    return float(val[0])
