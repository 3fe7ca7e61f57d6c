"""The opt-in sampled estimate for large matrices (``analyze(..., estimate_above=...)``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis import synthetic
from ww_monitor.errors import WWMonitorError
from ww_monitor.functional.sampled import submatrix_eigenvalues, top_eigenvalue

#: Error bound on heavy-tailed spectra (alpha ~ 2-2.6), where the estimate is meant to be used,
#: with submatrices of half the matrix's width: over six generated 2048 x 1024 matrices each the
#: error against the full fit was +1% to +8.8% (power-law ESD, alpha 2) and -4% to +6%
#: (Student-t entries, mu 2); see benchmarks/bench_estimate.py and the README table.
HEAVY_TAIL_RTOL = 0.10


def _model(w: np.ndarray, small: np.ndarray) -> nn.Module:
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False), nn.Linear(small.shape[1], small.shape[0]))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w))
        model[1].weight.copy_(torch.from_numpy(small))
    return model


@pytest.mark.parametrize("kind", ["power-law alpha=2", "student-t mu=2"])
def test_estimate_within_bound_of_full_fit_on_heavy_tailed_spectra(kind):
    if kind.startswith("power"):
        w = synthetic.power_law_spectrum(2048, 1024, alpha=2.0, seed=3)
    else:
        w = synthetic.heavy_tailed(2048, 1024, mu=2.0, seed=3)
    small = synthetic.gaussian(96, 64, seed=1)
    model = _model(w, small)
    full = wwm.analyze(model)
    est = wwm.analyze(model, estimate_above=512, estimate_size=512)
    big_full, big_est = full.layers[0], est.layers[0]
    assert [l.name for l in est.layers] == [l.name for l in full.layers]  # model order kept
    assert big_full.method == "full" and big_est.method == "sampled"
    assert est.layers[1].method == "full" and est.layers[1].alpha == full.layers[1].alpha  # below the budget
    assert abs(big_est.alpha - big_full.alpha) / big_full.alpha <= HEAVY_TAIL_RTOL
    if kind.startswith("power"):  # known alpha of the generated ESD
        assert abs(big_est.alpha - 2.0) / 2.0 <= HEAVY_TAIL_RTOL
    # Whole-matrix norms are exact, not sampled.
    for key in ("lambda_max", "log_norm", "log_spectral_norm", "stable_rank"):
        assert getattr(big_est, key) == pytest.approx(getattr(big_full, key), rel=1e-7), key
    assert big_est.alpha_weighted == pytest.approx(big_est.alpha * math.log10(big_full.lambda_max), rel=1e-9)
    # What needs every eigenvalue is not pretended.
    assert big_est.phase is None and math.isnan(big_est.entropy) and math.isnan(big_est.lambda_plus)
    assert big_est.num_evals == 8 * 512


def test_sampled_estimate_is_reproducible_and_seeded():
    w = torch.from_numpy(synthetic.heavy_tailed(600, 300, mu=2.5, seed=0))
    a, n, m = submatrix_eigenvalues(w, size=100, samples=3, seed=5)
    b, _, _ = submatrix_eigenvalues(w, size=100, samples=3, seed=5)
    c, _, _ = submatrix_eigenvalues(w, size=100, samples=3, seed=6)
    assert (n, m) == (200, 100) and a.size == 300
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The transpose is the same matrix to the estimate (oriented first).
    t, _, _ = submatrix_eigenvalues(w.T, size=100, samples=3, seed=5)
    np.testing.assert_allclose(t, a, rtol=1e-10)


def test_top_eigenvalue_matches_the_full_spectrum():
    w = torch.from_numpy(synthetic.gaussian(300, 200, seed=2))
    exact = wwm.functional.eigenvalues(w)[-1]
    assert top_eigenvalue(w) == pytest.approx(exact, rel=1e-8)


def test_estimate_options_are_validated():
    model = nn.Linear(16, 16)
    for kwargs in ({"estimate_above": 0}, {"estimate_size": 1}, {"estimate_samples": 0}, {"estimate_size": 2.5}):
        with pytest.raises(WWMonitorError, match=next(iter(kwargs))):
            wwm.analyze(model, **kwargs)


def test_non_finite_large_matrix_is_skipped_with_reason():
    w = synthetic.gaussian(64, 48, seed=0)
    w[3, 4] = np.nan
    model = _model(w, synthetic.gaussian(24, 16, seed=1))
    report = wwm.analyze(model, estimate_above=32, estimate_size=16)
    assert [s.reason for s in report.skipped] == ["non-finite weights (NaN or Inf)"]
    assert len(report.layers) == 1
