"""Truncated power law ``p(lambda) ~ lambda^-alpha exp(-Lambda lambda)`` on the tail ``lambda >= xmin``
(weightwatcher 0.7.7 ``fit="TPL"``; the ``powerlaw`` package's ``Truncated_Power_Law``).

Maximum likelihood at a given xmin. With ``y = lambda / xmin`` and ``c = Lambda * xmin`` the
density on ``y >= 1`` is ``y^-alpha e^(-c y) / Z``, ``Z(alpha, c) = int_1^inf t^-alpha e^(-c t) dt``
(the generalised exponential integral ``E_alpha(c)``), and the mean negative log-likelihood is

    nll(alpha, c) = alpha * mean(ln y) + c * mean(y) + ln Z(alpha, c).

It is an exponential family in (-alpha, -c), so nll is convex and its minimum matches the
moments: ``E[ln y] = mean(ln y)``, ``E[y] = mean(y)``. We solve that with Newton's method (the
Hessian is the covariance of (ln y, y) under the fit), with step halving, inside the domain
``alpha >= 0, c >= 0`` (c = 0 needs alpha > 1). ``Z`` and the moments are integrals over
``u = ln y`` of ``exp((1 - alpha) u - c e^u)``, evaluated by adaptive quadrature
(``scipy.integrate.quad``, relative accuracy ~1e-12) with the exponent shifted by its maximum,
so nothing overflows.

Deliberate differences from weightwatcher 0.7.7 + ``powerlaw``:

* xmin is the power-law fit's xmin (or the ``xmin_peak`` one for ``E_TPL``): alpha and Lambda
  describe the same tail as the power-law alpha. weightwatcher lets ``powerlaw`` search xmin with
  one numerical TPL fit per candidate (seconds to minutes per layer), and in 0.7.7 with
  ``powerlaw`` 2.x that call fails (``Fit()`` no longer accepts ``distribution=``): every TPL
  column is -1 there.
* The MLE is solved to ~1e-10 instead of Nelder-Mead with ``tol=1e-4``, and alpha is not capped
  at 3 (``powerlaw`` 2.x bounds alpha to [0, 3] and flags fits near the bound as noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TruncatedPowerLawFit", "fit_truncated_power_law", "FITS"]

#: ``fit=`` values (weightwatcher's names): power law, truncated power law, TPL at the xmin_peak xmin.
FITS = ("PL", "TPL", "E_TPL")
#: Newton stops when the step in (alpha, c) is below this (relative): far below any reported digit.
_TOL = 1e-10
_MAX_ITER = 100
#: Quadrature accuracy for Z and the moments (relative), well below _TOL's effect on nll.
_QUAD_EPSREL = 1e-12
#: Smallest cut-off c = Lambda * xmin: e^(-c y) differs from 1 by < 1e-6 over y < 1e6, so a fit
#: that ends here is a plain power law, while the moments of y stay finite for Newton's method.
_C_FLOOR = 1e-12
#: At least this many tail eigenvalues: two parameters from fewer points is not a fit.
MIN_TPL_TAIL = 5


@dataclass(frozen=True)
class TruncatedPowerLawFit:
    """``alpha``, ``Lambda`` (in eigenvalue units) and the tail it was fitted on; ``ok=False`` with a reason on failure."""

    alpha: float
    Lambda: float
    xmin: float
    n: int
    loglikelihood: float
    ok: bool = True
    reason: str = ""


#: exp() argument beyond which float64 overflows (e^709 ~ 8e307).
_EXP_MAX = 700.0


def _moments(alpha: float, c: float, full: bool = True):
    """``ln Z`` and, with ``full``, the mean of (u, y) and their covariance under
    ``y^-alpha e^(-c y)`` on ``y >= 1`` (u = ln y)."""
    from scipy import integrate  # lazy: keeps `import ww_monitor` light

    s = 1.0 - alpha
    # Peak of the log-integrand g(u) = s u - c e^u over u >= 0, used as a shift so exp stays finite.
    u_star = max(math.log(s / c), 0.0) if (c > 0 and s > 0) else 0.0
    shift = s * u_star - c * math.exp(u_star)

    def w(u):
        cut = c * math.exp(u) if (c > 0 and u < _EXP_MAX) else (0.0 if c == 0 else math.inf)
        g = s * u - cut - shift
        return math.exp(g) if g > -_EXP_MAX else 0.0

    def weighted(f):
        def h(u):
            wu = w(u)
            return f(u) * wu if wu > 0.0 else 0.0
        return h

    def quad(h):
        kw = dict(epsrel=_QUAD_EPSREL, epsabs=0.0, limit=200)
        if u_star > 0:
            return integrate.quad(h, 0.0, u_star, **kw)[0] + integrate.quad(h, u_star, math.inf, **kw)[0]
        return integrate.quad(h, 0.0, math.inf, **kw)[0]

    z = quad(w)
    log_z = math.log(z) + shift
    if not full:
        return log_z, None, None
    mu_u = quad(weighted(lambda u: u)) / z
    mu_y = quad(weighted(math.exp)) / z
    uu = quad(weighted(lambda u: (u - mu_u) ** 2)) / z
    uy = quad(weighted(lambda u: (u - mu_u) * (math.exp(u) - mu_y))) / z
    yy = quad(weighted(lambda u: (math.exp(u) - mu_y) ** 2)) / z
    return log_z, np.array([mu_u, mu_y]), np.array([[uu, uy], [uy, yy]])


def _nll(alpha: float, c: float, mean_u: float, mean_y: float) -> float:
    if alpha < 0 or c < 0 or (c == 0 and alpha <= 1):
        return math.inf
    log_z = _moments(alpha, c, full=False)[0]
    return alpha * mean_u + c * mean_y + log_z


def fit_truncated_power_law(eigenvalues, xmin: float) -> TruncatedPowerLawFit:
    """MLE of the truncated power law on ``eigenvalues >= xmin``.

    Returns alpha, Lambda (so that ``Lambda * lambda`` is dimensionless) and the tail size.
    """
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not (math.isfinite(xmin) and xmin > 0):
        return TruncatedPowerLawFit(math.nan, math.nan, xmin, 0, math.nan, False, "no valid xmin")
    tail = x[x >= xmin] / xmin
    n = int(tail.size)
    if n < MIN_TPL_TAIL or tail.max() == tail.min():
        return TruncatedPowerLawFit(math.nan, math.nan, xmin, n, math.nan, False,
                                    f"{n} tail eigenvalues; a truncated power law needs {MIN_TPL_TAIL} distinct ones")
    mean_u = float(np.log(tail).mean())
    mean_y = float(tail.mean())
    target = np.array([mean_u, mean_y])
    # Start: the power-law MLE (alpha > 1) with a light cut-off, like powerlaw's initial guess scaled down.
    theta = np.array([1.0 + 1.0 / mean_u, 0.1 / mean_y])
    f = _nll(*theta, mean_u, mean_y)
    converged = False
    for _ in range(_MAX_ITER):
        _, mu, cov = _moments(*theta)
        grad = target - mu  # d nll / d(alpha, c)
        try:
            step = np.linalg.solve(cov, grad)
        except np.linalg.LinAlgError:
            step = grad
        t = 1.0
        while True:
            cand = theta - t * step
            # Project onto the domain: alpha >= 0, c >= _C_FLOOR (at c = 0 the moments of y
            # diverge for alpha <= 3; a pure power law ends up at the floor).
            cand = np.maximum(cand, [0.0, _C_FLOOR])
            f_new = _nll(*cand, mean_u, mean_y)
            if f_new <= f + 1e-15 * abs(f) or t < 1e-12:
                break
            t *= 0.5
        moved = np.abs(cand - theta) <= _TOL * np.maximum(np.abs(theta), 1e-12)
        theta, f = cand, min(f, f_new)
        if moved.all():
            converged = True
            break
    alpha, c = float(theta[0]), float(theta[1])
    loglik = -n * f - n * math.log(xmin)  # density in lambda = density in y / xmin
    if not converged:
        return TruncatedPowerLawFit(alpha, c / xmin, xmin, n, loglik, False, "Newton did not converge")
    return TruncatedPowerLawFit(alpha, c / xmin, xmin, n, loglik)
