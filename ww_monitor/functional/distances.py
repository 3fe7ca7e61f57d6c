"""Distances between two versions of a weight matrix (weightwatcher 0.7.7 ``distances``), and
between two ESDs.

* ``euclidean``: ``||W1 - W2||_F``; for a stack of conv slices the mean over slices (weightwatcher
  averages its per-slice distances).
* ``relative``: ``||W1 - W2||_F / ||W1||_F`` over the whole tensor: how far a layer moved,
  independent of its scale (the callback's ``distance_from_init``).
* ``cka``: weightwatcher's uncentred overlap ``||W1^T W2||_F / sqrt(||W1^T W1||_F ||W2 W2^T||_F)``,
  i.e. the square root of uncentred linear CKA with the rows as samples; 1 for W2 = c W1.
  Conv slices are oriented tall (rows >= cols) first, 2-D weights are used as stored, as in
  weightwatcher. The denominator gets weightwatcher's +1e-6 only when it is below 1e-6.
* ``esd_shift``: 1-Wasserstein distance between the distributions of log10(lambda) of two ESDs
  (positive eigenvalues): how far, in decades, the spectrum moved on average. It is 0 for the
  same ESD, ``|log10 c|`` when every eigenvalue is scaled by c, and does not depend on the
  number of eigenvalues.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .array_types import Eigenvalues, Matrix

__all__ = ["euclidean_distance", "relative_distance", "cka_similarity", "esd_shift", "CKA_FLOOR"]

#: weightwatcher adds this to a CKA denominator below it (all-zero matrices).
CKA_FLOOR = 1e-6


def _stack64(w: Matrix) -> torch.Tensor:
    t = w.detach() if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
    t = t.to(torch.float64)
    return t.unsqueeze(0) if t.ndim == 2 else t


def euclidean_distance(w1: Matrix, w2: Matrix) -> float:
    """``||W1 - W2||_F`` (mean over slices for a k x rows x cols stack)."""
    a, b = _stack64(w1), _stack64(w2)
    return float(torch.linalg.matrix_norm(a - b).mean())


def relative_distance(w_ref: Matrix, w: Matrix) -> float:
    """``||W - W_ref||_F / ||W_ref||_F`` over the whole tensor (inf when W_ref is zero and W is not)."""
    a, b = _stack64(w_ref), _stack64(w)
    ref = float(torch.linalg.vector_norm(a))
    diff = float(torch.linalg.vector_norm(b - a))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def cka_similarity(w1: Matrix, w2: Matrix) -> float:
    """weightwatcher's uncentred CKA overlap (mean over slices for a stack; slices oriented tall)."""
    a, b = _stack64(w1), _stack64(w2)
    if getattr(w1, "ndim", 2) == 3 and a.shape[-2] < a.shape[-1]:
        a, b = a.transpose(-1, -2), b.transpose(-1, -2)
    cross = torch.linalg.matrix_norm(a.transpose(-1, -2) @ b)
    n1 = torch.linalg.matrix_norm(a.transpose(-1, -2) @ a)
    n2 = torch.linalg.matrix_norm(b @ b.transpose(-1, -2))
    norm = torch.sqrt(n1 * n2)
    norm = torch.where(norm < CKA_FLOOR, norm + CKA_FLOOR, norm)
    return float((cross / norm).mean())


def esd_shift(eigenvalues_a: Eigenvalues, eigenvalues_b: Eigenvalues) -> float:
    """1-Wasserstein distance between the log10(lambda) distributions of two ESDs (NaN if either is empty)."""
    out = []
    for ev in (eigenvalues_a, eigenvalues_b):
        x = np.asarray(ev, dtype=np.float64).ravel()
        x = x[np.isfinite(x) & (x > 0)]
        if x.size == 0:
            return math.nan
        out.append(np.log10(x))
    from scipy.stats import wasserstein_distance  # lazy: scipy.stats costs ~0.5 s to import

    return float(wasserstein_distance(out[0], out[1]))
