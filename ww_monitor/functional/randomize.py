"""The randomized ESD (weightwatcher 0.7.7 ``randomize=True``): shuffle the entries of W, take
the ESD again, and compare. Structure learned by training lives in the *arrangement* of the
weights; shuffling keeps their distribution and Frobenius norm but destroys it, so the shuffled
ESD is Marchenko-Pastur-like unless a few huge entries (correlation traps) remain.

* ``max_rand_eval``: largest eigenvalue of the randomized ESD. Layers with fewer than
  :data:`FEW_EVALS` eigenvalues pool :data:`FEW_EVALS_REPLICAS` independent shuffles (as
  weightwatcher does) so that maximum is less noisy.
* ``rand_distance``: Jensen-Shannon distance (natural log) between the sorted eigenvalues and
  those of one further shuffle, each vector normalised to sum 1 (weightwatcher's
  ``jensen_shannon_distance(evals, rand_evals)``; the two sums are equal, ``||W||_F^2``).
* ``ww_softrank = max(rand) / lambda_max`` and ``ww_maxdist = lambda_max - max(rand)``, from that
  same single shuffle.
* ``rand_num_spikes``: eigenvalues of the (pooled) randomized ESD above the Marchenko-Pastur
  bulk fitted to it (weightwatcher's MP fit of the randomized ESD).

weightwatcher shuffles with numpy's global RNG; here every shuffle comes from a
``torch.Generator`` seeded with ``seed``, so results are reproducible and nothing global changes.
Conv stacks shuffle each kernel slice separately, like weightwatcher's per-matrix shuffle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .eigenvalues import batched_eigenvalues

__all__ = ["RandomizedESD", "randomized_esd", "shuffled"]

#: Fewer eigenvalues than this and the randomized maximum pools several shuffles
#: (weightwatcher: ``n_comp < 100`` -> 5 replicas).
FEW_EVALS = 100
FEW_EVALS_REPLICAS = 5


@dataclass(frozen=True)
class RandomizedESD:
    max_rand_eval: float
    rand_distance: float
    ww_softrank: float
    ww_maxdist: float
    rand_eigenvalues: np.ndarray  # the pooled shuffles (for rand_num_spikes)
    replicas: int


def shuffled(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``weight`` (2-D, or a k x rows x cols stack) with the entries of each matrix permuted."""
    stack = weight.unsqueeze(0) if weight.ndim == 2 else weight
    flat = stack.reshape(stack.shape[0], -1)
    perm = torch.argsort(torch.rand(flat.shape, generator=generator, dtype=torch.float64), dim=1)
    out = torch.gather(flat, 1, perm.to(flat.device)).reshape(stack.shape)
    return out[0] if weight.ndim == 2 else out


def randomized_esd(
    weight: torch.Tensor, eigenvalues: np.ndarray, *, eig_scale: float = 1.0, seed: int = 0, method: str = "auto"
) -> RandomizedESD:
    """Randomized-ESD metrics of one layer; ``eigenvalues`` is its (scaled) ESD."""
    from scipy.spatial.distance import jensenshannon  # lazy: keeps `import ww_monitor` light

    gen = torch.Generator().manual_seed(int(seed))
    w = weight.detach()
    replicas = FEW_EVALS_REPLICAS if eigenvalues.size < FEW_EVALS else 1
    draws = [shuffled(w, gen) for _ in range(replicas + 1)]
    evs = [ev * eig_scale for ev in batched_eigenvalues(draws, method=method)]
    pooled = np.sort(np.concatenate(evs[:replicas]))
    single = evs[replicas]
    lam_max = float(eigenvalues[-1]) if eigenvalues.size else math.nan
    rmax = float(single[-1]) if single.size else math.nan
    dist = float(jensenshannon(np.sort(eigenvalues), single)) if single.size == eigenvalues.size else math.nan
    return RandomizedESD(
        max_rand_eval=float(pooled[-1]) if pooled.size else math.nan,
        rand_distance=dist,
        ww_softrank=rmax / lam_max if lam_max > 0 else math.nan,
        ww_maxdist=lam_max - rmax,
        rand_eigenvalues=pooled,
        replicas=replicas,
    )
