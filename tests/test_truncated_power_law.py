"""``fit="TPL"`` is the constrained maximum of the likelihood (alpha >= 0, Lambda >= 0).

The log-likelihoods here are computed independently of the module (closed form for the power
law, ``scipy.integrate.quad`` in eigenvalue units for the truncated power law), so a fit that is
not the maximum, or a likelihood the module gets wrong, fails.
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize
from torch import nn

import ww_monitor as wwm
from ww_monitor.functional.truncated_power_law import fit_truncated_power_law


def power_law_loglik(tail, xmin, alpha):
    """sum ln p(x), p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha on x >= xmin."""
    return float(np.sum(np.log((alpha - 1) / xmin) - alpha * np.log(tail / xmin)))


def tpl_loglik(tail, xmin, alpha, lam):
    """sum ln p(x), p(x) = x^-alpha e^(-lam x) / Z, Z = int_xmin^inf t^-alpha e^(-lam t) dt
    = lam^(alpha - 1) Gamma(1 - alpha, lam xmin) (the upper incomplete gamma function, in mpmath)."""
    if lam == 0:
        return power_law_loglik(tail, xmin, alpha)
    with mpmath.workdps(30):
        log_z = float(mpmath.log(mpmath.power(lam, alpha - 1) * mpmath.gammainc(1 - alpha, lam * xmin)))
    return float(np.sum(-alpha * np.log(tail) - lam * tail) - tail.size * log_z)


def pl_mle(tail, xmin):
    return 1 + tail.size / np.sum(np.log(tail / xmin))


def issue_layer() -> nn.Linear:
    """The case of the bug report: a 200 x 300 Student-t layer (2.5 degrees of freedom, scale 0.05),
    drawn with torch's global generator right after the layer's own initialisation."""
    torch.manual_seed(0)
    layer = nn.Linear(300, 200)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.StudentT(2.5).sample((200, 300)) * 0.05)
    return layer


def test_issue_case_is_the_power_law_mle():
    model = nn.Sequential(issue_layer())
    pl = wwm.analyze(model).layers[0]
    tpl = wwm.analyze(model, fit="TPL").layers[0]
    assert (pl.num_pl_spikes, round(pl.xmin, 3)) == (32, 6.218)  # the tail the report describes
    # Before: alpha 3.724 with Lambda 1.6e-13 (a cut-off pinned at a numerical floor, NLL 73.860).
    assert tpl.fit_ok and tpl.alpha == pytest.approx(3.512, abs=1e-3)
    assert tpl.Lambda == 0.0 and tpl.alpha == pytest.approx(pl.alpha, rel=1e-12)
    tail = tpl.eigenvalues[tpl.eigenvalues >= tpl.xmin]
    assert -tpl_loglik(tail, tpl.xmin, tpl.alpha, tpl.Lambda) == pytest.approx(73.752, abs=1e-3)
    # No cut-off does better: the derivative of the NLL in Lambda at 0 is >= 0 (KKT), and a
    # direct check at small cut-offs around the fitted alpha.
    best = -tpl_loglik(tail, tpl.xmin, tpl.alpha, 0.0)
    for lam in (1e-6, 1e-4, 1e-2):
        for da in (-0.05, 0.0, 0.05):
            assert -tpl_loglik(tail, tpl.xmin, tpl.alpha + da, lam) > best


def _draw(kind, rng, n, a, lam):
    """n draws above xmin = 1 of a synthetic tail."""
    if kind == "power law":
        return (1 - rng.random(n)) ** (-1 / (a - 1))
    if kind == "truncated":  # exponential proposal, power-law acceptance
        out = []
        while len(out) < n:
            x = 1 + rng.exponential(1 / lam, 4 * n)
            out.extend(x[rng.random(x.size) < x ** -a].tolist())
        return np.array(out[:n])
    if kind == "exponential":
        return 1 + rng.exponential(1 / lam, n)
    return np.exp(np.abs(rng.normal(0, a / 3, n)))  # lognormal-like: curved on log-log axes


@settings(max_examples=40, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["power law", "truncated", "exponential", "lognormal"]),
       n=st.integers(8, 400), a=st.floats(1.2, 6.0), lam=st.floats(0.01, 3.0), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31))
def test_tpl_likelihood_is_never_below_the_power_law(kind, n, a, lam, scale, seed):
    tail = _draw(kind, np.random.default_rng(seed), n, a, lam) * scale
    xmin = float(tail.min())
    fit = fit_truncated_power_law(tail, xmin)
    assert fit.ok and fit.n == n and fit.alpha >= 0 and fit.Lambda >= 0
    ll = tpl_loglik(tail, xmin, fit.alpha, fit.Lambda)
    assert fit.loglikelihood == pytest.approx(ll, rel=1e-8, abs=1e-8)
    ll_pl = power_law_loglik(tail, xmin, pl_mle(tail, xmin))
    assert ll >= ll_pl - 1e-9 * abs(ll_pl)
    if fit.Lambda == 0:  # the Lambda -> 0 end is exactly the power-law MLE
        assert fit.alpha == pytest.approx(pl_mle(tail, xmin), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_tpl_is_the_constrained_maximum(seed):
    """Against a direct bounded minimisation of the NLL from several starts (slow, so a few seeds)."""
    rng = np.random.default_rng(seed)
    kind = ["power law", "truncated", "exponential"][seed % 3]
    tail = _draw(kind, rng, int(rng.integers(20, 200)), 2.2 + seed * 0.4, 0.3)
    fit = fit_truncated_power_law(tail, 1.0)

    def nll(p):
        alpha, lam = p
        if alpha < 0 or lam < 0 or (lam == 0 and alpha <= 1):
            return math.inf
        return -tpl_loglik(tail, 1.0, alpha, lam)

    starts = [(0.5, 0.5), (2.0, 0.05), (pl_mle(tail, 1.0), 1e-4), (4.0, 1.0)]
    ref = min(optimize.minimize(nll, s, method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-12)).fun
              for s in starts)
    ref = min(ref, nll((pl_mle(tail, 1.0), 0.0)), nll((0.0, 1 / (tail.mean() - 1))))  # the two bounds
    assert -fit.loglikelihood <= ref + 1e-9 * abs(ref)


def test_bounds_satisfy_their_optimality_conditions():
    rng = np.random.default_rng(3)
    pure = _draw("power law", rng, 5000, 3.5, 0)  # alpha > 2, no cut-off in the data
    fit = fit_truncated_power_law(pure, 1.0)
    assert fit.Lambda == 0 and fit.alpha == pytest.approx(pl_mle(pure, 1.0), rel=1e-12)
    expo = _draw("exponential", rng, 5000, 0, 2.0)  # a light, exponential tail: alpha at its bound 0
    fit = fit_truncated_power_law(expo, 1.0)
    assert fit.alpha == 0 and fit.Lambda == pytest.approx(1 / (expo.mean() - 1), rel=1e-12)
    # an interior optimum: the fitted moments match the data's
    trunc = _draw("truncated", rng, 5000, 1.5, 0.3)
    fit = fit_truncated_power_law(trunc, 1.0)
    assert fit.alpha == pytest.approx(1.5, abs=0.1) and fit.Lambda == pytest.approx(0.3, rel=0.1)
