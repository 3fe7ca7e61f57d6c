"""Truncated power law ``p(lambda) ~ lambda^-alpha exp(-Lambda lambda)`` on the tail ``lambda >= xmin``
(weightwatcher 0.7.7 ``fit="TPL"``; the ``powerlaw`` package's ``Truncated_Power_Law``).

Maximum likelihood at a given xmin. With ``y = lambda / xmin`` and ``c = Lambda * xmin`` the
density on ``y >= 1`` is ``y^-alpha e^(-c y) / Z``, ``Z(alpha, c) = int_1^inf t^-alpha e^(-c t) dt``
(the generalised exponential integral ``E_alpha(c)``), and the mean negative log-likelihood is

    nll(alpha, c) = alpha * mean(ln y) + c * mean(y) + ln Z(alpha, c).

It is an exponential family in (-alpha, -c), so nll is convex, and the fit is its constrained
minimum over ``alpha >= 0, c >= 0`` (``Lambda >= 0``; ``c = 0`` needs ``alpha > 1``). Convexity
makes the Karush-Kuhn-Tucker conditions sufficient, so the three places the minimum can be are
checked in closed form before any iteration:

* ``c = 0`` (no cut-off): the minimum over alpha is the power-law MLE
  ``alpha_PL = 1 + 1 / mean(ln y)`` (Clauset et al. 2009, eq. 3.1: the power-law fit's alpha on the
  same tail). It is the constrained minimum iff ``d nll / dc = mean(y) - E[y] >= 0`` there, with
  ``E[y] = (alpha_PL - 1) / (alpha_PL - 2)`` for ``alpha_PL > 2`` (infinite otherwise): then
  ``Lambda = 0`` and alpha is exactly the power law's.
* ``alpha = 0`` (a shifted exponential ``y = 1 + Exp(c)``): ``c = 1 / (mean(y) - 1)``; the minimum
  iff ``d nll / d alpha = mean(ln y) - E[ln y] >= 0``, ``E[ln y] = e^c E_1(c)``.
* otherwise inside the domain, where the minimum matches the moments ``E[ln y] = mean(ln y)``,
  ``E[y] = mean(y)``: Newton's method (the Hessian is the covariance of (ln y, y) under the
  fit) with step halving that keeps every iterate inside (never projected onto a bound: a
  projected Newton step is not a descent step for the other parameter).

``Z`` and the moments are integrals over ``u = ln y`` of ``exp((1 - alpha) u - c e^u)``, evaluated by
adaptive quadrature (``scipy.integrate.quad``, relative accuracy ~1e-12) with the exponent shifted
by its maximum, so nothing overflows; the data enter only through ``mean(ln y)`` and ``mean(y)``
(numpy reductions).

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

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .array_types import Eigenvalues

__all__ = ["TruncatedPowerLawFit", "fit_truncated_power_law", "FITS"]

#: ``fit=`` values (weightwatcher's names): power law, truncated power law, TPL at the xmin_peak xmin.
FITS = ("PL", "TPL", "E_TPL")
#: Newton stops when the step in (alpha, c) is below this (relative): far below any reported digit.
_TOL = 1e-10
_MAX_ITER = 100
#: Quadrature accuracy for Z and the moments (relative), well below _TOL's effect on nll.
_QUAD_EPSREL = 1e-12
#: A cut-off this small (``c * max(y)``, i.e. ``Lambda * lambda_max``) changes no tail point's
#: density by more than a relative 1e-12 (``e^(-c y) >= 1 - 1e-12``): the fit is the power law.
_C_NEGLIGIBLE = 1e-12
#: Relative slack when comparing mean negative log-likelihoods that agree to float64 rounding.
_NLL_RTOL = 1e-12
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


def _moments(alpha: float, c: float, full: bool = True) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """``ln Z`` and, with ``full``, the mean of (u, y) and their covariance under
    ``y^-alpha e^(-c y)`` on ``y >= 1`` (u = ln y)."""
    from scipy import integrate  # lazy: keeps `import ww_monitor` light

    s = 1.0 - alpha
    # Peak of the log-integrand g(u) = s u - c e^u over u >= 0, used as a shift so exp stays finite.
    u_star = max(math.log(s / c), 0.0) if (c > 0 and s > 0) else 0.0
    shift = s * u_star - c * math.exp(u_star)

    def w(u: float) -> float:
        cut = c * math.exp(u) if (c > 0 and u < _EXP_MAX) else (0.0 if c == 0 else math.inf)
        g = s * u - cut - shift
        return math.exp(g) if g > -_EXP_MAX else 0.0

    def weighted(f: Callable[[float], float]) -> Callable[[float], float]:
        def h(u: float) -> float:
            wu = w(u)
            return f(u) * wu if wu > 0.0 else 0.0

        return h

    # Break the range where the integrand changes character: at its peak, and where the cut-off
    # sets in (u = ln(1/c); far out for a small cut-off, after a long slowly decaying stretch).
    breaks = sorted({0.0, u_star, -math.log(c) if 0.0 < c < 1.0 else 0.0})

    def quad(h: Callable[[float], float]) -> float:
        # full_output: quad's accuracy notes are returned, not warned (no warnings from library
        # internals reach the user); the fit is judged by its Newton steps and likelihoods.
        kw = dict(epsrel=_QUAD_EPSREL, epsabs=0.0, limit=200, full_output=1)
        ends = [*breaks, math.inf]
        return sum(integrate.quad(h, a, b, **kw)[0] for a, b in itertools.pairwise(ends))

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
    """Mean negative log-likelihood of the tail in y units; inf outside the domain."""
    if alpha < 0 or c < 0 or (c == 0 and alpha <= 1):
        return math.inf
    if c == 0:  # the power law: Z = 1 / (alpha - 1)
        return alpha * mean_u - math.log(alpha - 1.0)
    log_z = _moments(alpha, c, full=False)[0]
    return alpha * mean_u + c * mean_y + log_z


def _boundary_power_law(mean_u: float, mean_y: float) -> tuple[float, float] | None:
    """``(alpha_PL, 0)`` when the constrained minimum is at ``c = 0`` (module docstring), else None."""
    alpha = 1.0 + 1.0 / mean_u
    if alpha > 2.0 and mean_y >= (alpha - 1.0) / (alpha - 2.0):
        return alpha, 0.0
    return None


def _boundary_exponential(mean_u: float, mean_y: float) -> tuple[float, float] | None:
    """``(0, c_exp)`` when the constrained minimum is at ``alpha = 0`` (module docstring), else None."""
    from scipy.special import exp1

    c = 1.0 / (mean_y - 1.0)
    # E[ln(1 + X)], X ~ Exp(c), is e^c E_1(c); past e^c's overflow its asymptotic series
    # (1/c)(1 - 1/c + 2/c^2), whose next term is 6/c^4 < 1e-10 relative there.
    expected_u = math.exp(c) * float(exp1(c)) if c < _EXP_MAX else (1.0 - 1.0 / c + 2.0 / c**2) / c
    if mean_u >= expected_u:
        return 0.0, c
    return None


def _newton(mean_u: float, mean_y: float, max_y: float) -> tuple[np.ndarray, float, bool]:
    """The interior minimum (alpha > 0, c > 0) by damped Newton; ``(theta, nll, converged)``.

    When the iterates head for ``c = 0`` until the cut-off no longer changes any tail point's
    likelihood (``c * max(y) < _C_NEGLIGIBLE``), the minimum is the ``c = 0`` limit, i.e. the
    power law: returned as ``(alpha_PL, 0)``. (This happens for ``alpha_PL`` just above 2, where
    the exact minimiser can be a ``c`` of 1e-50 whose likelihood equals the power law's in float64.)
    """
    target = np.array([mean_u, mean_y])
    # Start inside: the power-law MLE with a light cut-off (powerlaw's initial guess, scaled down).
    theta = np.array([1.0 + 1.0 / mean_u, 0.1 / mean_y])
    f = _nll(theta[0], theta[1], mean_u, mean_y)
    for _ in range(_MAX_ITER):
        _, mu, cov = _moments(*theta)
        assert mu is not None and cov is not None  # full=True
        grad = target - mu  # d nll / d(alpha, c)
        try:
            step = np.linalg.solve(cov, grad)
        except np.linalg.LinAlgError:
            step = grad
        t = 1.0
        while True:
            cand = theta - t * step
            inside = cand[0] > 0.0 and cand[1] > 0.0
            f_new = _nll(cand[0], cand[1], mean_u, mean_y) if inside else math.inf
            if f_new <= f + 1e-15 * abs(f) or t < 1e-12:
                break
            t *= 0.5
        if not math.isfinite(f_new):  # no step stays inside and descends: stuck on a bound
            return theta, f, False
        if cand[1] * max_y < _C_NEGLIGIBLE:
            alpha_pl = 1.0 + 1.0 / mean_u
            f_pl = _nll(alpha_pl, 0.0, mean_u, mean_y)
            if f_pl <= min(f, f_new) + _NLL_RTOL * abs(f_pl):
                return np.array([alpha_pl, 0.0]), f_pl, True
        done = np.all(np.abs(cand - theta) <= _TOL * np.maximum(np.abs(theta), 1e-300))
        theta, f = cand, min(f, f_new)
        if done:
            return theta, f, True
    return theta, f, False


def fit_truncated_power_law(eigenvalues: Eigenvalues, xmin: float) -> TruncatedPowerLawFit:
    """Maximum likelihood of the truncated power law on ``eigenvalues >= xmin``, constrained to
    ``alpha >= 0, Lambda >= 0``.

    Returns alpha, Lambda (so that ``Lambda * lambda`` is dimensionless) and the tail size. Where
    the likelihood is largest without a cut-off, ``Lambda = 0`` and alpha is the power-law MLE on
    the same tail, ``1 + n / sum(ln(lambda / xmin))``; the log-likelihood is never below the power
    law's.
    """
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not (math.isfinite(xmin) and xmin > 0):
        return TruncatedPowerLawFit(math.nan, math.nan, xmin, 0, math.nan, False, "no valid xmin")
    tail = x[x >= xmin] / xmin
    n = int(tail.size)
    if n < MIN_TPL_TAIL or tail.max() == tail.min():
        return TruncatedPowerLawFit(
            math.nan,
            math.nan,
            xmin,
            n,
            math.nan,
            False,
            f"{n} tail eigenvalues; a truncated power law needs {MIN_TPL_TAIL} distinct ones",
        )
    mean_u = float(np.log(tail).mean())
    mean_y = float(tail.mean())
    boundary = _boundary_power_law(mean_u, mean_y) or _boundary_exponential(mean_u, mean_y)
    if boundary is not None:
        theta, converged = np.array(boundary), True
        f = _nll(theta[0], theta[1], mean_u, mean_y)
    else:
        theta, f, converged = _newton(mean_u, mean_y, float(tail.max()))
    alpha, c = float(theta[0]), float(theta[1])
    loglik = -n * f - n * math.log(xmin)  # density in lambda = density in y / xmin
    if not converged:
        return TruncatedPowerLawFit(alpha, c / xmin, xmin, n, loglik, False, "Newton did not converge")
    return TruncatedPowerLawFit(alpha, c / xmin, xmin, n, loglik)
