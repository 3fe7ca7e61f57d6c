"""weightwatcher 0.7.7's optional per-layer analyses, applied to one layer's ESD.

``fix_fingers`` (:mod:`.functional.fingers`), ``fit="TPL"|"E_TPL"``
(:mod:`.functional.truncated_power_law`), ``detX``/``ERG`` (:mod:`.functional.determinant`) and
``randomize`` (:mod:`.functional.randomize`). :mod:`.analyze` calls these; the columns they fill
stay ``None`` on :class:`~ww_monitor.analysis.results.LayerResult` when an option is off.

As in weightwatcher, the fit options replace the power-law columns: with ``fix_fingers`` alpha,
xmin, D, ... are those of the fingers-fixed fit; with ``fit="TPL"`` ``alpha`` is the truncated
power law's exponent (and ``Lambda`` its cut-off) while xmin, D, sigma stay those of the
power-law fit that chose the tail. The phase is always decided from the power-law fit.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np

from ..errors import WWMonitorError
from ..functional.determinant import detx_constraint
from ..functional.fingers import FIX_FINGERS, fit_clip_xmax, fit_xmin_peak
from ..functional.power_law import PowerLawFit
from ..functional.randomize import randomized_esd
from ..functional.truncated_power_law import FITS, fit_truncated_power_law

__all__ = ["validate_options", "fingers_fit", "apply_tpl", "apply_detx", "apply_randomize"]

log = logging.getLogger(__name__)


def validate_options(config) -> None:
    """Precise errors for the weightwatcher-style options of an ``AnalysisConfig``."""
    if config.fix_fingers not in (None, False, *FIX_FINGERS):
        raise WWMonitorError(
            f"fix_fingers must be None, {FIX_FINGERS[0]!r} or {FIX_FINGERS[1]!r}, got {config.fix_fingers!r}"
        )
    if config.fit not in FITS:
        raise WWMonitorError(f"fit must be one of {FITS}, got {config.fit!r}")
    if config.fit == "E_TPL" and config.fix_fingers == "clip_xmax":
        raise WWMonitorError(
            "fit='E_TPL' already fixes fingers with 'xmin_peak'; it cannot be combined with fix_fingers='clip_xmax'"
        )
    mf = config.max_fingers
    if isinstance(mf, bool) or not isinstance(mf, int) or mf < 1:
        raise WWMonitorError(f"max_fingers must be an int >= 1, got {mf!r}")
    ft = config.finger_thresh
    if isinstance(ft, bool) or not isinstance(ft, numbers.Real) or not float(ft) >= 0:
        raise WWMonitorError(f"finger_thresh must be a number >= 0, got {ft!r}")
    xm = config.xmin_max
    if xm is not None and (isinstance(xm, bool) or not isinstance(xm, numbers.Real) or not float(xm) > 0):
        raise WWMonitorError(f"xmin_max must be None or a positive number, got {xm!r}")
    for key in ("detX", "randomize"):
        if not isinstance(getattr(config, key), bool):
            raise WWMonitorError(f"{key} must be True or False, got {getattr(config, key)!r}")


def fingers_fit(res, evals: np.ndarray, fit: PowerLawFit, floor: float, config) -> PowerLawFit:
    """The power-law fit after ``fix_fingers`` (``E_TPL`` implies ``xmin_peak``); sets num_fingers/raw_alpha."""
    method = "xmin_peak" if config.fit == "E_TPL" else config.fix_fingers
    if method == "clip_xmax":
        out = fit_clip_xmax(
            evals, max_fingers=config.max_fingers, finger_thresh=float(config.finger_thresh), min_eigenvalue=floor
        )
        res.num_fingers, res.raw_alpha = out.num_fingers, out.raw_alpha
        return out.fit
    if method == "xmin_peak":
        return fit_xmin_peak(evals, xmin_max=config.xmin_max, min_eigenvalue=floor).fit
    return fit


def apply_tpl(res, evals: np.ndarray, fit: PowerLawFit, config) -> None:
    """``fit="TPL"|"E_TPL"``: alpha becomes the truncated power law's, Lambda its cut-off."""
    if config.fit == "PL" or not fit.ok:
        return
    tpl = fit_truncated_power_law(evals, fit.xmin)
    if tpl.ok:
        res.alpha, res.Lambda = tpl.alpha, tpl.Lambda
    else:
        res.alpha, res.Lambda = math.nan, math.nan
        res.fit_ok, res.fit_reason = False, f"truncated power law: {tpl.reason}"


def apply_detx(res, evals: np.ndarray) -> None:
    d = detx_constraint(evals)
    res.detX_num, res.detX_val = d.num, d.value
    res.ERG_gap = d.num - res.num_pl_spikes if res.fit_ok else None


def apply_randomize(res, m, evals: np.ndarray, config) -> None:
    """Randomized ESD columns; a failure leaves them None (logged at debug level)."""
    from ..functional.marchenko_pastur import fit_marchenko_pastur

    try:
        r = randomized_esd(m.weight, evals, eig_scale=m.eig_scale, seed=config.seed, method=config.method)
        res.max_rand_eval, res.rand_distance = r.max_rand_eval, r.rand_distance
        res.ww_softrank, res.ww_maxdist = r.ww_softrank, r.ww_maxdist
        mp = fit_marchenko_pastur(r.rand_eigenvalues, m.N, m.M, num_slices=m.num_slices * r.replicas)
        res.rand_num_spikes = int(mp.num_spikes)
    except Exception as err:
        log.debug("randomized ESD failed for %s: %s", res.name, err, exc_info=True)
