"""``fit_power_law``: the Clauset MLE + KS xmin search (Clauset, Shalizi & Newman 2009).

Oracles: the ``powerlaw`` package (2.0) and closed-form facts about Pareto samples.

Tolerances, and why they are what they are:

* Fixed xmin vs ``powerlaw.Fit(x, xmin=.., xmax=max(x))``: alpha to 1e-10 relative (the same
  closed-form estimator, only the summation order differs, ~n * eps ~ 1e-13). D to within
  ``T / (1 - T)`` with ``T = (xmax / xmin)^(1 - alpha)``: with ``xmax`` set, powerlaw renormalises
  the fitted CDF to [xmin, xmax], F_trunc = F / (1 - T), and ``|F_trunc - F| = F T / (1 - T)``
  is at most that. Only alpha in (1.5, 3] is compared: there powerlaw uses the closed form;
  outside it runs a numerical fit clamped to its default alpha range [0, 3].
* Search vs ``powerlaw.Fit(x, xmax=max(x))``: the smallest D agrees within the same truncation
  bound (at either winner); the truncation can move the argmin to a neighbouring xmin, so alpha
  agrees to 1e-10 when the xmins agree and within one standard error otherwise, and the xmins
  agree on most seeds.
* Search vs ``powerlaw.Fit(x)`` (no xmax): the same estimator and KS convention (the lower
  empirical step k/n), so identical xmin and alpha/D to 1e-10 relative.
* Recovery on pure Pareto samples: z = (alpha_hat - alpha) / sigma_hat is ~N(0, 1), checked over
  many seeds (all |z| < 4, >= 90% within 2, no bias in the mean).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import warnings

import numpy as np
import pytest
import torch

import ww_monitor as wwm
from ww_monitor import PowerLawFit, fit_power_law

powerlaw = pytest.importorskip("powerlaw")
# ww_monitor.functional re-exports names that shadow the submodule attribute; import it by path.
pl_module = importlib.import_module("ww_monitor.functional.power_law")


def pareto(rng, n, alpha, xmin=1.0):
    """n samples with density ~ x^-alpha on [xmin, inf) (inverse-CDF sampling)."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def bulk_plus_tail(rng, alpha, n_tail=800, n_bulk=300):
    """A Pareto tail above 1 on top of a flat bulk below it, so the xmin search matters."""
    return np.concatenate([rng.uniform(0.1, 1.0, n_bulk), pareto(rng, n_tail, alpha)])


def reference_fit(x):
    """Exhaustive loop over every candidate xmin (the definition, as weightwatcher writes it)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    logx = np.log(x)
    best = (np.inf, None, None)
    for i in range(x.size - 1):
        n = x.size - i
        alpha = 1.0 + n / (np.sum(logx[i:]) - n * logx[i])
        if not alpha > 1.0:
            continue
        d = np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - alpha) - np.arange(n) / n))
        if d < best[0]:
            best = (d, alpha, x[i])
    return best  # (D, alpha, xmin)


def truncation_bound(alpha, xmin, xmax):
    t = (xmax / xmin) ** (1.0 - alpha)
    return t / (1.0 - t)


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("seed", range(4))
def test_matches_exhaustive_definition(seed):
    rng = np.random.default_rng(seed)
    x = bulk_plus_tail(rng, 2.0 + seed * 0.5, n_tail=400, n_bulk=150)
    fit = fit_power_law(x)
    d, alpha, xmin = reference_fit(x)
    assert fit.ok
    assert fit.xmin == xmin
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.D == pytest.approx(d, rel=1e-9, abs=1e-14)
    tail = np.sort(x)[np.sort(x) >= xmin]
    assert fit.num_pl_spikes == tail.size
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(tail.size), rel=1e-12)
    assert fit.xmax == x.max()


@functools.lru_cache(maxsize=1)
def _spectra():
    rng = np.random.default_rng(7)
    out = {
        "pareto": pareto(rng, 3000, 2.5),
        "bulk+tail": bulk_plus_tail(rng, 3.0, 2000, 1000),
        "ties": np.round(pareto(rng, 2000, 2.0), 1),
        "exponential": rng.exponential(1.0, 2500),
        "two outliers": np.concatenate([rng.uniform(1, 2, 1500), [1e3, 1e4]]),
    }
    # ESDs of random matrices: pooled Marchenko-Pastur (9 slices) and heavy-tailed entries.
    g = torch.from_numpy(rng.standard_normal((9, 400, 200)))
    out["pooled MP"] = torch.linalg.svdvals(g).square().ravel().numpy()
    t = torch.from_numpy(rng.standard_t(3, (2, 800, 400)))
    out["student-t ESD"] = torch.linalg.svdvals(t).square().ravel().numpy()
    return out


@pytest.mark.parametrize("name", list(_spectra()))
def test_pruned_search_is_exact(name):
    """Candidates skipped by the coarse-to-fine bounds provably cannot win: the argmin and its D
    equal the exhaustive evaluation of every candidate, and every skipped entry is a lower bound."""
    x = np.sort(_spectra()[name])
    x = x[x > pl_module.DEFAULT_MIN_EIGENVALUE]
    logx = np.log(x)
    n = x.size
    candidates = np.arange(n - 1)
    n_tail = (n - candidates).astype(np.float64)
    suffix = np.cumsum(logx[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n_tail / (suffix[candidates] - n_tail * logx[candidates])
    assert candidates.size >= pl_module._PRUNE_MIN_CANDIDATES  # the pruning path is exercised
    got = pl_module._ks_distances(logx, candidates, alphas, n_tail)
    exact = np.ones(candidates.size)
    valid = np.flatnonzero(np.isfinite(alphas) & (alphas > 1.0))
    exact[valid] = pl_module._exact_distances(logx, candidates[valid], 1.0 - alphas[valid], n_tail[valid])
    assert int(np.argmin(got)) == int(np.argmin(exact))
    assert got.min() == exact.min()
    assert np.all(got <= exact + 1e-15)


# ----------------------------------------------------------------------------- powerlaw package
@pytest.mark.parametrize("alpha", [1.8, 2.3, 2.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_xmin_matches_powerlaw_with_xmax(alpha, seed):
    rng = np.random.default_rng(100 + seed)
    x = bulk_plus_tail(rng, alpha)
    ours = fit_power_law(x)
    assert 1.5 < ours.alpha <= 3.0  # inside powerlaw's closed-form branch
    with quiet():
        theirs = powerlaw.Fit(x, xmin=ours.xmin, xmax=float(np.max(x)))
    assert theirs.xmin == ours.xmin
    assert ours.alpha == pytest.approx(theirs.power_law.alpha, rel=1e-10)
    assert ours.num_pl_spikes == theirs.power_law.n
    bound = truncation_bound(ours.alpha, ours.xmin, ours.xmax)
    assert abs(ours.D - theirs.power_law.D) <= bound + 1e-12


def test_search_matches_powerlaw_with_xmax():
    same_xmin = 0
    cases = [(alpha, seed) for alpha in (1.8, 2.3, 2.7) for seed in (0, 1)]
    for alpha, seed in cases:
        rng = np.random.default_rng(200 + seed)
        x = bulk_plus_tail(rng, alpha)
        ours = fit_power_law(x)
        with quiet():
            theirs = powerlaw.Fit(x, xmax=float(np.max(x)))
        p_alpha, p_xmin, p_d = theirs.power_law.alpha, theirs.xmin, theirs.power_law.D
        bound = max(truncation_bound(ours.alpha, ours.xmin, ours.xmax), truncation_bound(p_alpha, p_xmin, ours.xmax))
        assert abs(ours.D - p_d) <= bound + 1e-12, (alpha, seed)
        if p_xmin == ours.xmin:
            same_xmin += 1
            assert ours.alpha == pytest.approx(p_alpha, rel=1e-10)
        else:
            assert abs(ours.alpha - p_alpha) <= ours.sigma, (alpha, seed, ours, p_alpha)
    assert same_xmin >= len(cases) // 2


@pytest.mark.parametrize("alpha", [1.8, 2.2, 2.6])
def test_search_matches_powerlaw_without_xmax_exactly(alpha):
    rng = np.random.default_rng(300)
    x = bulk_plus_tail(rng, alpha, n_tail=600, n_bulk=200)
    ours = fit_power_law(x)
    with quiet():
        theirs = powerlaw.Fit(x)
    assert theirs.xmin == ours.xmin
    assert ours.alpha == pytest.approx(theirs.power_law.alpha, rel=1e-10)
    assert ours.D == pytest.approx(theirs.power_law.D, rel=1e-10)


# ----------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 4.5, 6.0])
def test_recovers_exponent_with_known_xmin(alpha):
    n, seeds = 2000, 40
    z = []
    for seed in range(seeds):
        x = pareto(np.random.default_rng(seed), n, alpha, xmin=2.0)
        fit = fit_power_law(x, xmin=2.0)
        assert fit.ok and fit.num_pl_spikes == n  # the nearest eigenvalue to 2 is the sample minimum
        z.append((fit.alpha - alpha) / fit.sigma)
    z = np.asarray(z)
    assert np.all(np.abs(z) < 4.0)
    assert np.mean(np.abs(z) < 2.0) >= 0.9
    assert abs(z.mean()) < 3.0 / math.sqrt(seeds)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_recovers_exponent_with_xmin_search(alpha):
    hits = 0
    seeds = 10
    for seed in range(seeds):
        x = pareto(np.random.default_rng(1000 + seed), 2000, alpha)
        fit = fit_power_law(x)
        assert fit.ok
        hits += abs(fit.alpha - alpha) <= 3.0 * fit.sigma
    assert hits >= seeds - 1


def test_recovers_exponent_of_tail_above_bulk():
    rng = np.random.default_rng(5)
    x = bulk_plus_tail(rng, 2.5, n_tail=3000, n_bulk=2000)
    fit = fit_power_law(x)
    assert fit.xmin >= 0.9  # the flat bulk below 1 is not part of the tail
    assert abs(fit.alpha - 2.5) <= 3.0 * fit.sigma


# ----------------------------------------------------------------------------- modes and edges
def test_deterministic_and_order_free():
    rng = np.random.default_rng(11)
    x = bulk_plus_tail(rng, 2.2)
    first = fit_power_law(x)
    assert fit_power_law(x) == first
    assert fit_power_law(rng.permutation(x)) == first
    assert fit_power_law(list(x)) == first
    assert fit_power_law(x.reshape(-1, 11)) == first  # any shape: flattened


def test_float32_input_fits_its_own_values():
    x32 = pareto(np.random.default_rng(12), 1500, 2.5).astype(np.float32)
    assert fit_power_law(x32) == fit_power_law(x32.astype(np.float64))


def test_zeros_and_tiny_values_are_ignored():
    x = pareto(np.random.default_rng(13), 1000, 2.5)
    padded = np.concatenate([x, np.zeros(300), np.full(50, 1e-7), [np.nan, np.inf, -1.0]])
    assert fit_power_law(padded) == fit_power_law(x)
    # A larger threshold removes more: same as removing those values by hand.
    assert fit_power_law(x, min_eigenvalue=2.0) == fit_power_law(x[x > 2.0])


def test_fixed_xmin_uses_nearest_eigenvalue():
    x = np.sort(pareto(np.random.default_rng(14), 1000, 2.5))
    target = x[400] * 1.0000001
    fit = fit_power_law(x, xmin=target)
    tail = x[400:]
    assert fit.xmin == x[400]
    assert fit.num_pl_spikes == tail.size
    assert fit.alpha == pytest.approx(1 + tail.size / np.log(tail / x[400]).sum(), rel=1e-12)
    expected_d = np.max(np.abs(1 - (tail / x[400]) ** (1 - fit.alpha) - np.arange(tail.size) / tail.size))
    assert fit.D == pytest.approx(expected_d, rel=1e-9, abs=1e-14)


def test_fixed_xmin_at_the_searched_one_reproduces_the_search():
    x = bulk_plus_tail(np.random.default_rng(15), 2.7)
    searched = fit_power_law(x)
    assert fit_power_law(x, xmin=searched.xmin) == searched


def test_fixed_xmin_above_the_spectrum_keeps_a_two_point_tail():
    x = pareto(np.random.default_rng(16), 200, 2.5)
    fit = fit_power_law(x, xmin=10 * x.max())
    assert fit.ok
    assert fit.num_pl_spikes == 2
    assert fit.xmin == np.sort(x)[-2]


@pytest.mark.parametrize(
    "values",
    [
        [],
        [3.0],
        [1.0, 2.0, 3.0, 4.0],              # fewer than MIN_TAIL_EIGENVALUES
        np.ones(100),                       # all equal: no tail
        np.full(50, 1e-6),                  # all below the zero threshold
        [np.nan, np.inf, -np.inf, np.nan],  # nothing finite
        -pareto(np.random.default_rng(0), 50, 2.5),  # nothing positive
        np.zeros(1000),
    ],
    ids=["empty", "one", "four", "all-equal", "all-tiny", "non-finite", "negative", "zeros"],
)
def test_degenerate_input_fails_softly(values):
    fit = fit_power_law(values)
    assert isinstance(fit, PowerLawFit)
    assert not fit.ok and fit.reason
    assert math.isnan(fit.alpha) and math.isnan(fit.D) and math.isnan(fit.sigma) and math.isnan(fit.xmin)
    assert fit.num_pl_spikes == 0


def test_degenerate_input_with_fixed_xmin_fails_softly():
    for values in ([], [2.0, 2.0], np.ones(30)):
        fit = fit_power_law(values, xmin=1.0)
        assert not fit.ok and math.isnan(fit.alpha)


def test_result_is_exported_and_serialisable():
    fit = wwm.fit_power_law(pareto(np.random.default_rng(17), 500, 3.0))
    d = fit.as_dict()
    assert set(d) >= {"alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes", "ok", "reason"}
    assert d["ok"] is True and d["reason"] == ""
