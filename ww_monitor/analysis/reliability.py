"""How much a layer's power-law fit and phase rest on, and when they are trusted.

A power-law alpha is a maximum-likelihood fit to the ``num_pl_spikes`` eigenvalues of the tail
(Clauset, Shalizi & Newman 2009): its standard error is (alpha - 1) / sqrt(n_tail), and the
choice of xmin (smallest KS distance) is itself noisy when few eigenvalues are available. A
layer is **reliable** when both counts clear named thresholds:

* ``num_evals >= RELIABLE_MIN_EVALS`` (50): below that the Marchenko-Pastur bulk and its edge
  are not resolvable (Tracy-Widom fluctuations of lambda_max are ~ M^(-2/3) of lambda_+, 6% at
  M = 50) and the xmin search has too few candidates. Measured: the quickstart's 10-eigenvalue
  head swings between alpha 1.55 and 8.75 on adjacent snapshots of a healthy run. The phase
  calibration (``docs/phases.md``) starts at M = 64.
* ``num_pl_spikes >= RELIABLE_MIN_TAIL`` (10): with fewer tail points the standard error
  (alpha - 1) / sqrt(n) exceeds 0.6 at alpha = 3, a third of the [2, 4] band the alpha rules
  read.

What follows from it (documented in docs/reliability.md):

* a layer with fewer than ``RELIABLE_MIN_EVALS`` eigenvalues gets **no phase** (``phase is
  None``: undetermined); the phase reads the MP fit, so the eigenvalue count alone decides;
* unreliable layers are left out of the fit-based model means (alpha, alpha_weighted,
  log_alpha_norm) of :meth:`~ww_monitor.analysis.results.Report.summary` by default and counted in
  ``num_unreliable``; ``summary(include_unreliable=True)`` restores the plain means;
* the alpha alert rules ignore them.
"""

from __future__ import annotations

__all__ = ["RELIABLE_MIN_EVALS", "RELIABLE_MIN_TAIL", "is_reliable", "phase_determined", "unreliable_reason"]

#: Fewest eigenvalues for a trusted fit and for a phase (see the module docstring).
RELIABLE_MIN_EVALS = 50
#: Fewest eigenvalues in the fitted power-law tail for a trusted alpha.
RELIABLE_MIN_TAIL = 10


def phase_determined(num_evals: int) -> bool:
    """Whether an ESD of ``num_evals`` eigenvalues is large enough to be given a phase."""
    return int(num_evals) >= RELIABLE_MIN_EVALS


def is_reliable(num_evals: int, num_pl_spikes: int, fit_ok: bool) -> bool:
    """Whether a layer's power-law fit can be trusted (both counts above the thresholds)."""
    return bool(fit_ok) and phase_determined(num_evals) and int(num_pl_spikes) >= RELIABLE_MIN_TAIL


def unreliable_reason(num_evals: int, num_pl_spikes: int, fit_ok: bool) -> str:
    """Why a layer is not reliable ("" when it is)."""
    if not fit_ok:
        return "power-law fit failed"
    if not phase_determined(num_evals):
        return f"{int(num_evals)} eigenvalues < {RELIABLE_MIN_EVALS}"
    if int(num_pl_spikes) < RELIABLE_MIN_TAIL:
        return f"{int(num_pl_spikes)} tail eigenvalues < {RELIABLE_MIN_TAIL}"
    return ""
