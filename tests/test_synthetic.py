"""Generators: shapes, seeding, the structure each one promises, and the phase it shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ww_monitor import Phase, classify_phase, fit_power_law
from ww_monitor.analysis import synthetic
from ww_monitor.functional.eigenvalues import eigenvalues
from ww_monitor.functional.marchenko_pastur import bbp_outlier, bbp_threshold, fit_marchenko_pastur
from ww_monitor.functional.spectral_metrics import matrix_rank, rank_tolerance

NAMES = sorted(synthetic.GENERATORS)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_seeding(name):
    make, _ = synthetic.GENERATORS[name]
    a = make(60, 40, seed=3)
    assert a.shape == (60, 40) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, make(60, 40, seed=3))
    assert not np.array_equal(a, make(60, 40, seed=4))
    np.testing.assert_array_equal(make(60, 40, generator=np.random.default_rng(9)),
                                  make(60, 40, generator=np.random.default_rng(9)))
    assert make(40, 60, seed=1).shape == (40, 60)  # wide matrices too
    assert make(30, 20, seed=1, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,m", [(256, 256), (320, 160), (200, 400)])
def test_each_generator_shows_its_phase(name, n, m):
    make, phase = synthetic.GENERATORS[name]
    for seed in range(2):
        w = make(n, m, seed=seed)
        assert classify_phase(w) == Phase(phase), (name, n, m, seed)


def test_generators_cover_every_phase():
    assert {Phase(p) for _, p in synthetic.GENERATORS.values()} == set(Phase)


def test_spiked_outliers_follow_bbp():
    n, m = 800, 400
    q = n / m
    ratios = [4.0, 2.5]
    ev = eigenvalues(synthetic.spiked(n, m, ratios, relative=True, seed=0))
    for top, r in zip(ev[::-1], ratios):
        assert top == pytest.approx(bbp_outlier(r * bbp_threshold(q), q, 1.0, n), rel=0.06)


def test_bleeding_out_sits_just_above_the_edge_and_graded_spikes_far_above():
    n, m = 1024, 512
    fit_b = fit_marchenko_pastur(eigenvalues(synthetic.bleeding_out(n, m, 2, seed=1)), n, m)
    assert fit_b.num_spikes == 2 and 0.75 < fit_b.mp_softrank < 0.95
    fit_s = fit_marchenko_pastur(eigenvalues(synthetic.graded_spikes(n, m, 3, seed=1)), n, m)
    assert fit_s.num_spikes == 3 and fit_s.mp_softrank < 0.1


def test_bulk_decay_is_a_continuum_that_stays_near_the_edge():
    n, m = 512, 512
    fit = fit_marchenko_pastur(eigenvalues(synthetic.bulk_decay(n, m, seed=0)), n, m)
    assert fit.num_spikes > 0.02 * m  # many eigenvalues past the edge...
    assert fit.mp_softrank > 0.5  # ...but lambda_max < 2 lambda_+


def test_power_law_spectrum_is_exact():
    n, m = 600, 500
    w = synthetic.power_law_spectrum(n, m, alpha=2.5, seed=2, dtype=np.float64)
    ev = eigenvalues(w)
    assert ev.min() >= 1.0 - 1e-9  # the Pareto draws start at `scale`
    fit = fit_power_law(ev)
    assert fit.alpha == pytest.approx(2.5, abs=0.3)


def test_heavy_tailed_entries_have_heavy_tails():
    w = synthetic.heavy_tailed(300, 300, mu=1.5, seed=0)
    # Tail index 1.5: the largest of 90k entries is ~ (9e4)^(1/1.5) ~ 2000 x a typical one.
    assert np.abs(w).max() > 200 * np.median(np.abs(w))
    p = synthetic.heavy_tailed(300, 300, mu=2.0, distribution="pareto", seed=0)
    assert (np.abs(p) >= 1.0).all()
    with pytest.raises(ValueError):
        synthetic.heavy_tailed(10, 10, distribution="cauchy")


@pytest.mark.parametrize("n,m", [(300, 200), (200, 300)])
def test_rank_collapse_generators_lose_rank(n, m):
    for w, lost in ((synthetic.low_rank(n, m, 50, seed=0), min(n, m) - 50),
                    (synthetic.zeroed_columns(n, m, 0.25, seed=0), round(0.25 * min(n, m)))):
        ev = eigenvalues(w)
        tol = rank_tolerance(float(ev[-1]), n, m, torch.float32)
        assert min(n, m) - matrix_rank(ev, tol) == lost


def test_invalid_arguments():
    with pytest.raises(ValueError):
        synthetic.spiked(0, 5, 1.0)
    with pytest.raises(ValueError):
        synthetic.spiked(10, 3, [1.0] * 4)
    with pytest.raises(ValueError):
        synthetic.power_law_spectrum(10, 5, alpha=1.0)
    with pytest.raises(ValueError):
        synthetic.low_rank(10, 5, rank=0)


@pytest.mark.parametrize("m", [256, 512, 1024])
@pytest.mark.parametrize("q", [1, 2, 4])
def test_decaying_ladder_is_bulk_decay_over_sizes_and_aspect_ratios(m, q):
    """Issue 10: a ladder of outliers decaying from well above the BBP threshold into the edge
    is Martin & Mahoney's bulk-decay, not bulk+spikes (a few isolated spikes with a clean gap)."""
    # Three ladders (outliers, strongest, decay rate), one per cell in rotation: 3 of each over the grid.
    settings = ((8, 4.0, 0.6), (6, 3.0, 0.5), (10, 5.0, 0.7))
    num, top, decay = settings[([256, 512, 1024].index(m) + q) % 3]
    w = synthetic.decaying_ladder(m * q, m, num, top=top, decay=decay, seed=m + q)
    assert classify_phase(w) is Phase.BULK_DECAY, (m, q, num, top, decay)
    if m == 256:  # strong spikes without the rungs near the edge stay isolated: bulk+spikes
        assert classify_phase(synthetic.graded_spikes(m * q, m, 3, seed=0)) is Phase.BULK_PLUS_SPIKES
