"""The 5+1 phases of training (Martin & Mahoney, JMLR 2021) and the rules that assign them.

Martin & Mahoney describe the phases qualitatively and give no numeric boundaries; the
thresholds below were chosen and calibrated for this project on generated matrices of every
phase (:mod:`ww_monitor.analysis.synthetic`, ``benchmarks/calibrate_phases.py``; numbers and reasoning
in ``docs/phases.md``). Every quantity the rules read is invariant under W -> cW,
transposition and row/column permutations, so the phase is too.

Decision procedure (:func:`phase_from_spectrum`), first match wins. ``n`` is the number of
eigenvalues (k * M for k pooled slices), M the smaller side of one slice, lambda_+ / tw the
robust Marchenko-Pastur edge and Tracy-Widom scale
(:func:`~ww_monitor.functional.marchenko_pastur.fit_marchenko_pastur`), spikes the eigenvalues
above lambda_+ + 4 tw.

1. **rank-collapse** if ``rank_loss / n >= RANK_COLLAPSE_FRACTION``: a large mass of
   (near-)zero eigenvalues. Checked first because zeros distort every other statistic.
2. **no MP bulk at all** if the bulk's KS distance to MP exceeds
   ``max(NO_BULK_KS, NO_BULK_MISPLACED / M)``: then lambda_+ is meaningless and only the
   power law speaks: **heavy-tailed** if the power-law fit succeeded with
   ``alpha <= HEAVY_TAILED_MAX_ALPHA``, else **bulk-decay**.
3. **a continuum above the edge** if there are more spikes than "a few"
   (``> max(FEW_SPIKES, FEW_SPIKES_FRACTION * n)``), or the bulk misplaces more eigenvalues
   than noise plus the spikes can explain
   (``ks * M - spikes / k > max(MISFIT_MIN, MISFIT_PER_LOG_M * ln M)``):
   **heavy-tailed** if lambda_max reaches far beyond the edge
   (``mp_softrank <= HEAVY_TAILED_MAX_SOFTRANK``) and the power law is fat enough
   (``alpha <= HEAVY_TAILED_MAX_ALPHA``), else **bulk-decay**.
4. **random-like** if there is no spike: an MP bulk, lambda_max within Tracy-Widom
   fluctuations of lambda_+.
5. A few spikes over an MP bulk whose largest is well separated, i.e. a rank-one signal would
   need ``t >= SEPARATED_BBP_RATIO * Q^(-1/4)`` to put it there (BBP inversion,
   :func:`~ww_monitor.functional.marchenko_pastur.bbp_ratio`): a **decaying ladder** (at least
   ``LADDER_MIN_SPIKES`` spikes whose weakest is *not* separated, i.e. strengths falling from
   well above the threshold down into the edge, no clean gap) is **bulk-decay**; isolated
   spikes that all clear the edge by the separation margin are **bulk+spikes**.
6. Otherwise (a few spikes, none well separated): **bleeding-out** (eigenvalues just leaving
   the edge).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from ..functional.array_types import Matrix
    from ..functional.marchenko_pastur import MPFit
    from ..functional.power_law import PowerLawFit

__all__ = [
    "Phase",
    "UNDETERMINED",
    "PhaseEvidence",
    "classify_phase",
    "phase_evidence",
    "phase_from_spectrum",
    "RANK_COLLAPSE_FRACTION",
    "NO_BULK_KS",
    "NO_BULK_MISPLACED",
    "FEW_SPIKES",
    "FEW_SPIKES_FRACTION",
    "MISFIT_PER_LOG_M",
    "MISFIT_MIN",
    "HEAVY_TAILED_MAX_SOFTRANK",
    "HEAVY_TAILED_MAX_ALPHA",
    "SEPARATED_BBP_RATIO",
    "LADDER_MIN_SPIKES",
]


class Phase(str, Enum):
    """Phase of a layer's ESD, in the order training moves through them (+1 rank collapse)."""

    RANDOM_LIKE = "random-like"
    BLEEDING_OUT = "bleeding-out"
    BULK_PLUS_SPIKES = "bulk+spikes"
    BULK_DECAY = "bulk-decay"
    HEAVY_TAILED = "heavy-tailed"
    RANK_COLLAPSE = "rank-collapse"

    def __str__(self) -> str:
        return self.value


#: Shown instead of a phase for a layer that was analysed but has too few eigenvalues for one
#: (``LayerResult.phase is None``; :data:`ww_monitor.analysis.reliability.RELIABLE_MIN_EVALS`).
UNDETERMINED = "undetermined"


#: Share of (near-)zero eigenvalues (below the precision-aware rank tolerance) that makes a
#: layer rank-collapsed. Full-rank generated matrices of every other phase lose <= 0.4% (float32
#: rounding of the smallest singular values of square matrices); 10% is a mass no rounding explains, and
#: well below the 20-50% that strong weight decay or dead units produce.
RANK_COLLAPSE_FRACTION = 0.10

#: The MP law fits no part of the spectrum when more than this share of the eigenvalues sits
#: where MP says it should not (KS distance of the bulk). Bulk+spikes and bulk-decay stay below
#: 0.15 (their bulk *is* MP up to the shoulder); pure power-law spectra score 0.18-0.43.
NO_BULK_KS = 0.17
#: ...but for small M the KS distance of even a Gaussian matrix is ~ 2/M (a couple of
#: eigenvalues out of place), so the bar is never below this many misplaced eigenvalues.
NO_BULK_MISPLACED = 4.0

#: "A few" spikes: at most this many, or FEW_SPIKES_FRACTION of the eigenvalues if more. A
#: low-rank signal gives one spike per rank (1-6 in the calibration, so 8 leaves a margin);
#: heavy-tailed and bulk-decay spectra put 2-20% of the eigenvalues above the edge.
FEW_SPIKES = 8
FEW_SPIKES_FRACTION = 0.02

#: Misplaced eigenvalues (KS distance x M) a pure MP bulk produces grow like ln M by eigenvalue
#: rigidity: at most 0.68 ln M for M >= 64 and 2.3 eigenvalues for M = 8-32 on 5,725 Gaussian
#: matrices (``calibrate_phases.py --null``). A rank-r perturbation may shift bulk eigenvalues
#: by r places (Cauchy interlacing), so the spikes' count is subtracted first. More than
#: max(MISFIT_MIN, MISFIT_PER_LOG_M ln M) misplaced means the bulk itself is deformed.
MISFIT_PER_LOG_M = 1.0
MISFIT_MIN = 3.0

#: Heavy-tailed needs lambda_max >= 2 lambda_+ (mp_softrank <= 0.5): the tail reaches far past
#: any edge. A decaying shoulder of BBP outliers of strength <= 2x threshold ends at ~1.5-1.6
#: lambda_+ (softrank >= 0.63 measured); Student-t(mu <= 2) entries give softrank <= 0.22 (M >= 256).
HEAVY_TAILED_MAX_SOFTRANK = 0.5
#: Largest power-law alpha still called heavy-tailed (Martin & Mahoney 2021: alpha <= ~4-6 heavy, > 6 the fit is
#: unreliable and the layer is random-like or bulk-decay). Pure power-law ESDs with alpha = 4
#: are fitted at 3.5-5.6 for M >= 128.
HEAVY_TAILED_MAX_ALPHA = 6.0

#: A spike is well separated (bulk+spikes) when a rank-one signal needs twice the BBP threshold
#: to put an outlier there: then it sits >= 50% above lambda_+ at any Q, >= 30 Tracy-Widom widths
#: at M = 256. Just-leaking outliers (1.3-1.6x threshold) sit 7-25% above the edge.
SEPARATED_BBP_RATIO = 2.0

#: Martin & Mahoney's bulk-decay is a *continuum* leaving the edge; bulk+spikes a few isolated
#: spikes with a clean gap to it. With at least this many spikes, the strongest separated and
#: the weakest not (BBP ratio < SEPARATED_BBP_RATIO: within ~50% of lambda_+), the spikes form a
#: ladder from far out down into the edge: bulk-decay. Generated ladders (5-10 outliers decaying
#: geometrically from 3-5x the threshold to ~1.05x) show 3-8 counted spikes with the weakest at
#: 1.15-1.55x; graded spikes (bulk+spikes) keep the weakest at >= 3x. Two spikes do not make a
#: ladder (a strong and a weak signal are just two signals).
LADDER_MIN_SPIKES = 3


@dataclass(frozen=True)
class PhaseEvidence:
    """The numbers the decision procedure reads, and the phase they give (for reports/tests)."""

    phase: Phase
    rule: str
    rank_loss_fraction: float
    ks: float
    misplaced: float
    num_spikes: int
    few_spikes_limit: float
    mp_softrank: float
    spike_bbp_ratio: float
    alpha: float
    weakest_spike_bbp_ratio: float = math.nan

    def as_dict(self) -> dict:
        d = asdict(self)
        d["phase"] = self.phase.value
        return d


def phase_evidence(
    evals: ArrayLike, n: int, m: int, *, num_slices: int = 1, rank_loss: int, power_law: PowerLawFit, mp: MPFit
) -> PhaseEvidence:
    """Run the decision procedure and return the phase with the evidence behind it.

    Args:
        evals: eigenvalues of the ESD (any order; only the count and the maximum are read).
        n, m: shape of one (oriented) slice. num_slices: k for pooled conv ESDs.
        rank_loss: number of eigenvalues below the rank tolerance.
        power_law: :class:`~ww_monitor.functional.power_law.PowerLawFit` of the ESD.
        mp: :class:`~ww_monitor.functional.marchenko_pastur.MPFit` of the ESD.
    """
    from ..functional.marchenko_pastur import bbp_ratio, bbp_threshold

    n, m = (n, m) if n >= m else (m, n)
    q = n / m
    k = max(int(num_slices), 1)
    ev = np.asarray(evals, dtype=np.float64)
    total = max(int(ev.size), 1)
    lam_max = float(np.max(ev)) if ev.size else math.nan
    alpha = float(power_law.alpha) if power_law.ok else math.nan
    fat = bool(power_law.ok and alpha <= HEAVY_TAILED_MAX_ALPHA)
    zero_frac = rank_loss / total
    few = max(FEW_SPIKES, FEW_SPIKES_FRACTION * total)
    spikes = int(mp.num_spikes)
    misplaced = float(mp.ks) * m - spikes / k
    sep = (bbp_ratio(lam_max, q, mp.sigma, n) / bbp_threshold(q)) if math.isfinite(mp.sigma) else math.nan
    weakest = math.nan
    if spikes > 0 and math.isfinite(mp.sigma) and spikes <= ev.size:
        weakest = bbp_ratio(
            float(np.partition(ev, ev.size - spikes)[ev.size - spikes]), q, mp.sigma, n
        ) / bbp_threshold(q)

    def done(phase: Phase, rule: str) -> PhaseEvidence:
        return PhaseEvidence(
            phase, rule, zero_frac, float(mp.ks), misplaced, spikes, few, float(mp.mp_softrank), sep, alpha, weakest
        )

    if zero_frac >= RANK_COLLAPSE_FRACTION:
        return done(Phase.RANK_COLLAPSE, "rank loss")
    if not (math.isfinite(mp.ks) and math.isfinite(mp.lambda_plus) and lam_max > 0):
        # No MP fit is possible (degenerate spectrum): decide on the power law alone.
        return done(Phase.HEAVY_TAILED if fat else Phase.RANDOM_LIKE, "no MP fit")
    if mp.ks > max(NO_BULK_KS, NO_BULK_MISPLACED / m):
        return done(Phase.HEAVY_TAILED if fat else Phase.BULK_DECAY, "no MP bulk")
    if spikes > few or misplaced > max(MISFIT_MIN, MISFIT_PER_LOG_M * math.log(m)):
        far = mp.mp_softrank <= HEAVY_TAILED_MAX_SOFTRANK
        return done(Phase.HEAVY_TAILED if (far and fat) else Phase.BULK_DECAY, "continuum above the edge")
    if spikes == 0:
        return done(Phase.RANDOM_LIKE, "MP bulk, no spike")
    if sep >= SEPARATED_BBP_RATIO:
        if spikes >= LADDER_MIN_SPIKES and weakest < SEPARATED_BBP_RATIO:
            return done(Phase.BULK_DECAY, "ladder of spikes into the edge")
        return done(Phase.BULK_PLUS_SPIKES, "few separated spikes")
    return done(Phase.BLEEDING_OUT, "few spikes at the edge")


def phase_from_spectrum(
    evals: ArrayLike, n: int, m: int, *, num_slices: int = 1, rank_loss: int, power_law: PowerLawFit, mp: MPFit
) -> Phase:
    """Phase of an ESD from its fits; see the module docstring for the rules and their reasons."""
    return phase_evidence(evals, n, m, num_slices=num_slices, rank_loss=rank_loss, power_law=power_law, mp=mp).phase


def _spectrum_fits(w: Matrix) -> tuple[np.ndarray, int, int, int, PowerLawFit | None, MPFit | None]:
    """Scale-normalised eigenvalues, shape, rank loss and both fits of one 2-D matrix."""
    import torch

    from ..functional.eigenvalues import eigenvalues
    from ..functional.marchenko_pastur import fit_marchenko_pastur
    from ..functional.power_law import DEFAULT_MIN_EIGENVALUE, fit_power_law
    from ..functional.spectral_metrics import matrix_rank, rank_tolerance

    t = w.detach() if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
    if t.ndim != 2:
        raise ValueError(f"classify_phase expects a 2-D matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("classify_phase: the matrix has non-finite entries")
    n, m = max(t.shape), min(t.shape)
    ev = eigenvalues(t)
    lam_max = float(ev[-1]) if ev.size else 0.0
    if not lam_max > 0:
        return ev, n, m, int(ev.size), None, None
    # Dividing by lambda_max makes every downstream number (including the power-law fit's
    # absolute near-zero floor) independent of the scale of W.
    ev = ev / lam_max
    tol = rank_tolerance(1.0, n, m, t.dtype)
    rank_loss = int(ev.size - matrix_rank(ev, tol))
    pl = fit_power_law(ev, min_eigenvalue=max(DEFAULT_MIN_EIGENVALUE, tol))
    mp = fit_marchenko_pastur(ev, n, m)
    return ev, n, m, rank_loss, pl, mp


def classify_phase(w: Matrix) -> Phase:
    """Phase of one weight matrix (torch tensor or numpy array, 2-D, any orientation).

    Computes the ESD (:func:`~ww_monitor.functional.eigenvalues.eigenvalues`), the rank loss
    with the tolerance of W's own dtype, the power-law and Marchenko-Pastur fits, and applies
    :func:`phase_from_spectrum`. Invariant under W -> cW (c != 0), transposition and row/column
    permutations. An all-zero matrix is rank-collapsed.
    """
    ev, n, m, rank_loss, pl, mp = _spectrum_fits(w)
    if mp is None or pl is None:  # both None together: no eigenvalue above the tolerance
        return Phase.RANK_COLLAPSE
    return phase_from_spectrum(ev, n, m, rank_loss=rank_loss, power_law=pl, mp=mp)
