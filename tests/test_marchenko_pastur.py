"""Marchenko-Pastur fit, Tracy-Widom scale and BBP prediction against random-matrix theory."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from ww_monitor.analysis import synthetic
from ww_monitor.functional.eigenvalues import batched_eigenvalues, eigenvalues
from ww_monitor.functional.marchenko_pastur import (
    SPIKE_TW_MARGIN,
    MPFit,
    bbp_outlier,
    bbp_ratio,
    bbp_threshold,
    fit_marchenko_pastur,
    mp_cdf,
    mp_density,
    mp_edges,
    spike_margin,
    tracy_widom_scale,
)


@pytest.mark.parametrize("q", [1.0, 1.3, 2.0, 4.0, 10.0])
def test_cdf_matches_numerical_integral_of_density(q):
    lo, hi = mp_edges(q)
    xs = np.linspace(lo, hi, 11)
    numeric = [integrate.quad(lambda x: float(mp_density(x, q)), lo, x, limit=200)[0] for x in xs]
    np.testing.assert_allclose(mp_cdf(xs, q), numeric, atol=1e-9)
    assert mp_cdf(lo - 1.0, q) == 0.0 and mp_cdf(hi + 1.0, q) == 1.0


@settings(max_examples=50, deadline=None)
@given(q=st.floats(1.0, 50.0), xs=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=20))
def test_cdf_is_a_cdf(q, xs):
    x = np.sort(np.array(xs))
    f = mp_cdf(x, q)
    assert np.all((f >= 0) & (f <= 1))
    assert np.all(np.diff(f) >= -1e-12)


def test_unnormalised_density_integrates_to_one():
    n, q, sigma = 300, 3.0, 0.2
    lo, hi = mp_edges(q, sigma, n)
    total = integrate.quad(lambda x: float(mp_density(x, q, sigma, n)), lo, hi, limit=200)[0]
    assert total == pytest.approx(1.0, abs=1e-8)


def test_tracy_widom_scale_equals_johnstone():
    for n, m in [(100, 100), (400, 100), (1000, 250)]:
        johnstone = (math.sqrt(n) + math.sqrt(m)) * (1 / math.sqrt(n) + 1 / math.sqrt(m)) ** (1 / 3)
        assert tracy_widom_scale(n, m) == pytest.approx(johnstone, rel=1e-12)
        assert tracy_widom_scale(n, m, sigma=0.5) == pytest.approx(0.25 * johnstone, rel=1e-12)


# Shapes x seeds of pure noise: the RMT null. 4 shapes per M, 4 seeds each.
_NULL = [(m, q, seed) for m in (32, 64, 128, 256) for q in (1.0, 1.5, 2.0, 4.0) for seed in range(4)]


def test_gaussian_lambda_max_within_tracy_widom_of_edge_and_no_spikes():
    for m, q, seed in _NULL:
        n = int(m * q)
        sigma = 0.05 + seed  # the scale must not matter
        w = synthetic.gaussian(n, m, sigma=sigma, seed=1000 + seed + m)
        ev = eigenvalues(w)
        fit = fit_marchenko_pastur(ev, n, m)
        z = (ev[-1] - fit.lambda_plus) / fit.tw_scale
        assert -6.0 < z < SPIKE_TW_MARGIN, (m, q, seed, z)
        assert fit.num_spikes == 0
        # sigma from the bulk is accurate to ~1/M (rigidity), far better than 1/sqrt(M).
        assert fit.sigma == pytest.approx(sigma, rel=3.0 / m)
        assert fit.mp_softrank == pytest.approx(1.0, abs=0.15)
        # KS of a pure MP bulk is a few eigenvalues' worth (rigidity).
        assert fit.ks * m < 4.0


def test_robust_sigma_is_not_inflated_by_spikes():
    n, m = 1024, 512
    w = synthetic.graded_spikes(n, m, 5, ratios=(5.0, 20.0), seed=3)
    ev = eigenvalues(w)
    fit = fit_marchenko_pastur(ev, n, m)
    naive = math.sqrt(ev.sum() / (n * m))  # Frobenius estimate: swallowed by the spikes
    assert naive > 1.3
    assert fit.sigma == pytest.approx(1.0, rel=0.01)
    assert fit.num_spikes == 5
    assert fit.ks * m < 5 + 4.0


def test_fit_is_scale_invariant_and_order_free():
    n, m = 600, 300
    ev = eigenvalues(synthetic.bleeding_out(n, m, 2, seed=1))
    base = fit_marchenko_pastur(ev, n, m)
    for c in (1e-6, 3.0, 1e5):
        f = fit_marchenko_pastur(np.random.default_rng(0).permutation(ev * c), n, m)
        assert f.sigma == pytest.approx(base.sigma * math.sqrt(c), rel=1e-9)
        assert f.lambda_plus == pytest.approx(base.lambda_plus * c, rel=1e-9)
        assert f.num_spikes == base.num_spikes and f.ks == pytest.approx(base.ks, abs=1e-12)
        assert f.mp_softrank == pytest.approx(base.mp_softrank, rel=1e-9)
    assert fit_marchenko_pastur(ev, m, n) == base  # shape given either way round


@pytest.mark.parametrize("rel", [1.5, 2.0, 4.0])
def test_bbp_spike_lands_on_prediction(rel):
    n, m = 1024, 512
    q = n / m
    t = rel * bbp_threshold(q)
    predicted = bbp_outlier(t, q, 1.0, n)
    tops = []
    for seed in range(4):
        ev = eigenvalues(synthetic.spiked(n, m, t, seed=seed))
        fit = fit_marchenko_pastur(ev, n, m)
        assert fit.num_spikes == 1
        assert ev[-1] > fit.spike_threshold
        tops.append(ev[-1])
        assert ev[-1] == pytest.approx(predicted, rel=0.06)  # one draw: O(1/sqrt(N)) fluctuations
    assert np.mean(tops) == pytest.approx(predicted, rel=0.03)


@pytest.mark.parametrize("q", [1.0, 2.0, 4.0])
def test_bbp_spike_disappears_below_threshold(q):
    m = 256
    n = int(m * q)
    t = 0.6 * bbp_threshold(q)
    for seed in range(3):
        ev = eigenvalues(synthetic.spiked(n, m, t, seed=seed))
        fit = fit_marchenko_pastur(ev, n, m)
        assert fit.num_spikes == 0
        assert ev[-1] < fit.lambda_plus + SPIKE_TW_MARGIN * fit.tw_scale
    # ...and the prediction helper agrees: a subcritical signal sticks to the edge.
    assert bbp_outlier(t, q) == pytest.approx(mp_edges(q)[1])


def test_bbp_formula_and_inverse():
    q = 2.0
    assert bbp_threshold(q) == pytest.approx(q ** -0.25)
    # At the threshold the outlier is exactly at the edge: the formula is continuous.
    t_c = bbp_threshold(q)
    assert bbp_outlier(t_c * (1 + 1e-9), q) == pytest.approx(mp_edges(q)[1], rel=1e-6)
    for t in (0.9, 1.7, 3.0):
        lam = bbp_outlier(t, q, sigma=0.3, n=50)
        assert lam == pytest.approx(50 * 0.09 * (1 + t * t) * (1 / q + t * t) / (t * t))
        assert bbp_ratio(lam, q, sigma=0.3, n=50) == pytest.approx(t)
    assert bbp_ratio(0.5 * mp_edges(q)[1], q) == pytest.approx(t_c)


def test_pooled_slices_margin_and_no_false_spikes():
    assert spike_margin(1) == pytest.approx(SPIKE_TW_MARGIN)
    assert spike_margin(1) < spike_margin(9) < spike_margin(49)
    k, n, m = 9, 128, 64
    for seed in range(6):
        stack = torch.from_numpy(np.random.default_rng(seed).standard_normal((k, n, m)))
        ev = batched_eigenvalues([stack])[0]
        fit = fit_marchenko_pastur(ev, n, m, num_slices=k)
        assert fit.num_spikes == 0
        assert fit.sigma == pytest.approx(1.0, rel=0.02)


def test_degenerate_input_and_frozen_result():
    bad = fit_marchenko_pastur(np.zeros(10), 20, 10)
    assert math.isnan(bad.sigma) and bad.num_spikes == 0
    assert math.isnan(fit_marchenko_pastur([1.0], 2, 1).lambda_plus)
    fit = fit_marchenko_pastur(eigenvalues(synthetic.gaussian(80, 40, seed=0)), 80, 40)
    assert isinstance(fit, MPFit)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.sigma = 2.0  # type: ignore[misc]
    assert set(fit.as_dict()) == {"sigma", "lambda_plus", "lambda_minus", "tw_scale", "num_spikes", "ks",
                                  "mp_softrank"}
