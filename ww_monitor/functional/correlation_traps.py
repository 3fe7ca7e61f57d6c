"""Correlation traps: outliers caused by a few unusually large *entries* (Martin & Mahoney 2021).

Shuffling W's entries at random keeps the entry distribution but destroys every correlation
between them. A learned (delocalised) signal therefore disappears into the MP bulk of the
shuffled matrix, while a single huge entry ``a`` stays one huge entry wherever it lands and
still produces an eigenvalue ~ a^2. Eigenvalues of the shuffled matrix above its MP edge are
hence traps: localised, not learned structure. A single entry is a trap roughly when
``|a| / sigma > (N M)^(1/4)``, the BBP threshold for the rank-one perturbation ``a e_i e_j^T``
(Baik, Ben Arous & Peche 2005).

The shuffled ESD is fitted with the same robust Marchenko-Pastur fit as the layer itself
(:func:`~ww_monitor.functional.marchenko_pastur.fit_marchenko_pastur`), so the traps do not
inflate the edge they are measured against.
"""

from __future__ import annotations

import numpy as np
import torch

from .array_types import Matrix
from .eigenvalues import batched_eigenvalues, eigenvalues
from .marchenko_pastur import fit_marchenko_pastur, spike_margin

__all__ = ["count_correlation_traps", "shuffle_entries", "TRAP_TW_MARGIN"]

#: Traps are shuffled-matrix eigenvalues above lambda_+ + TRAP_TW_MARGIN * tw_scale (scaled up for
#: pooled slices by :func:`~.marchenko_pastur.spike_margin`). Same calibration as the spike
#: margin: a shuffled Gaussian matrix *is* a Gaussian matrix, whose lambda_max stayed below 4
#: Tracy-Widom widths of the fitted edge in 99.95% of trials for M >= 16 (see SPIKE_TW_MARGIN).
TRAP_TW_MARGIN = 4.0


def _as_tensor(w: Matrix) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w.detach()
    return torch.as_tensor(np.asarray(w))


def shuffle_entries(w: Matrix, seed: int = 0) -> torch.Tensor:
    """Randomly permute the entries of each slice of ``w`` (2-D, or 3-D k x rows x cols).

    Each slice's mean is subtracted first: a nonzero mean becomes an exactly rank-one
    component ``mean * 1 1^T`` after shuffling, a global offset that is not a trap.
    Deterministic for a given ``seed`` (a private ``torch.Generator``; the global RNG is untouched).
    """
    t = _as_tensor(w)
    if t.ndim not in (2, 3):
        raise ValueError(f"expected 2-D or 3-D weights, got shape {tuple(t.shape)}")
    stack = t.unsqueeze(0) if t.ndim == 2 else t
    stack = stack.to(torch.float64)
    k, rows, cols = stack.shape
    flat = stack.reshape(k, rows * cols)
    flat = flat - flat.mean(dim=1, keepdim=True)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # One permutation per slice; k is the number of kernel positions (<= ~50), never per entry.
    perms = torch.stack([torch.randperm(rows * cols, generator=gen) for _ in range(k)]).to(flat.device)
    shuffled = torch.gather(flat, 1, perms).reshape(k, rows, cols)
    return shuffled[0] if t.ndim == 2 else shuffled


def count_correlation_traps(w: Matrix, seed: int = 0, *, margin: float = TRAP_TW_MARGIN) -> int:
    """Number of correlation traps of ``w`` (torch tensor or numpy array, 2-D or a 3-D stack).

    Shuffles each slice's entries (seeded), recomputes the (pooled) ESD with
    :func:`~ww_monitor.functional.eigenvalues.eigenvalues`, fits Marchenko-Pastur robustly and
    counts eigenvalues above ``lambda_+ + margin' * tw_scale``, where ``margin'`` is ``margin``
    raised for the maximum over k pooled slices. Scale invariant: traps of ``c * W`` equal
    those of ``W``.
    """
    shuffled = shuffle_entries(w, seed)
    k = shuffled.shape[0] if shuffled.ndim == 3 else 1
    # Gram + eigvalsh even though the shuffled copy is float64 ("auto" would pick the 3-4x slower
    # SVD): traps live at the top of the spectrum, where the Gram route is exact to ~1e-13.
    if shuffled.ndim == 2:
        ev = eigenvalues(shuffled, method="gram")
    else:
        ev = batched_eigenvalues([shuffled], method="gram")[0]
    n, m = max(shuffled.shape[-2:]), min(shuffled.shape[-2:])
    fit = fit_marchenko_pastur(ev, n, m, num_slices=k)
    if not np.isfinite(fit.lambda_plus):
        return 0
    threshold = fit.lambda_plus + spike_margin(k, margin) * fit.tw_scale
    return int(np.count_nonzero(ev > threshold))
