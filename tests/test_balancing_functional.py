"""The balancing mappings and the Hill estimator against values worked out by hand from the papers'
formulas (TempBalance ``get_layer_temps``, AlphaDecay's linear map on weight decay, Model
Balancing's ``tb_std_sigmoid``, PL_Alpha_Hill with ``xmin_pos=2``)."""

import math

import numpy as np
import pytest
import torch

from ww_monitor.balancing import (
    balance_factors,
    hill_alpha,
    linear_factors,
    log2_factors,
    sigmoid_factors,
    sqrt_factors,
    step_factors,
)

ALPHAS = [2.0, 3.0, 4.0, 6.0]


def test_linear_tempbalance_and_alphadecay_ranges():
    # (alpha - 2) / (6 - 2) = 0, 1/4, 1/2, 1
    assert linear_factors(ALPHAS) == pytest.approx([0.5, 0.75, 1.0, 1.5])
    # AlphaDecay: 0.666 + 2.334 * (0, 1/4, 1/2, 1) = 0.666, 1.2495, 1.833, 3
    assert linear_factors(ALPHAS, 0.666, 3.0) == pytest.approx([0.666, 1.2495, 1.833, 3.0])
    # unsorted input keeps its order; larger alpha -> larger factor
    assert linear_factors([6.0, 2.0, 4.0]) == pytest.approx([1.5, 0.5, 1.0])


def test_sqrt_and_log2_have_mean_one():
    # sqrt: 4, 9, 16, 36 -> sqrt 2, 3, 4, 6 (mean 15/4) -> 8/15, 12/15, 16/15, 24/15
    assert sqrt_factors([4.0, 9.0, 16.0, 36.0]) == pytest.approx([8 / 15, 12 / 15, 16 / 15, 24 / 15])
    # log2: 2, 4, 8, 16 -> 1, 2, 3, 4 (mean 10/4) -> 0.4, 0.8, 1.2, 1.6
    assert log2_factors([2.0, 4.0, 8.0, 16.0]) == pytest.approx([0.4, 0.8, 1.2, 1.6])
    with pytest.raises(ValueError, match="alpha > 1"):
        log2_factors([0.5, 2.0])


def test_step_is_rank_based():
    # ranks of (4, 2, 6, 3) are (2, 0, 3, 1); 0.5 + 1.0 * rank / 4
    assert step_factors([4.0, 2.0, 6.0, 3.0]) == pytest.approx([1.0, 0.5, 1.25, 0.75])
    # only the order matters
    assert step_factors([4.0, 2.0, 600.0, 3.0]) == pytest.approx([1.0, 0.5, 1.25, 0.75])


def test_sigmoid_model_balancing():
    # mean 3.75; d = -1.75, -0.75, 0.25, 2.25; T = 10, (s_min, s_max) = (2, 1)
    d = np.array([-1.75, -0.75, 0.25, 2.25])
    centred = 1 / (1 + np.exp(-10 * d)) - 0.5
    expected = [10 ** (2 * centred[0]), 10 ** (2 * centred[1]), 10 ** (1 * centred[2]), 10 ** (1 * centred[3])]
    got = sigmoid_factors(ALPHAS)
    assert got == pytest.approx(expected)
    # saturates near 10^(-s_min/2) = 0.1 and 10^(s_max/2) = 3.162 far from the mean
    assert got[0] == pytest.approx(0.1, rel=1e-6) and got[3] == pytest.approx(math.sqrt(10), rel=1e-6)
    # a layer exactly at the mean gets 1; (0.25, 0.25) scales stay within 10^(+-0.125)
    assert sigmoid_factors([2.0, 3.0, 4.0])[1] == pytest.approx(1.0)
    small = sigmoid_factors(ALPHAS, scales=(0.25, 0.25))
    assert np.all(small > 10 ** -0.125) and np.all(small < 10 ** 0.125)


def test_degenerate_inputs_give_one():
    for mapping in ("linear", "sqrt", "log2", "step", "sigmoid"):
        assert balance_factors([3.0, 3.0, 3.0], mapping) == pytest.approx([1.0, 1.0, 1.0])
        assert balance_factors([3.0], mapping) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="finite"):
        linear_factors([2.0, math.nan])
    with pytest.raises(ValueError, match="mapping"):
        balance_factors(ALPHAS, "cubic")
    with pytest.raises(ValueError, match="range"):
        linear_factors(ALPHAS, 1.5, 0.5)


def test_hill_alpha_by_hand():
    # sorted 1, 1, 2, 4, n = 4, i = 4 // 2 = 2, xmin = 2, k = 2: 1 + 2 / (ln 1 + ln 2)
    assert hill_alpha([4.0, 1.0, 2.0, 1.0]) == pytest.approx(1 + 2 / math.log(2))
    # xmin_pos = 4: i = 1, xmin = 1, k = 3: 1 + 3 / (ln 1 + ln 2 + ln 4) = 1 + 3 / (3 ln 2)
    assert hill_alpha([1.0, 1.0, 2.0, 4.0], xmin_pos=4) == pytest.approx(1 + 1 / math.log(2))
    # odd n = 5: i = 2, xmin = 3, tail 3, 9, 27 (k = 3): 1 + 3 / (ln 1 + ln 3 + ln 9) = 1 + 1 / ln 3
    assert hill_alpha([1.0, 2.0, 3.0, 9.0, 27.0]) == pytest.approx(1 + 1 / math.log(3))
    assert math.isnan(hill_alpha([1.0]))
    assert math.isnan(hill_alpha([0.0, 0.0, 0.0, 1.0]))  # xmin = 0: no tail
    assert math.isnan(hill_alpha([2.0, 2.0, 2.0, 2.0]))  # tail all equal to xmin
    with pytest.raises(ValueError, match="xmin_pos"):
        hill_alpha([1.0, 2.0], xmin_pos=0.5)


def test_hill_alpha_recovers_a_pareto_exponent():
    """On Pareto samples (density ~ x^-alpha) the MLE above the median is close to alpha."""
    rng = np.random.default_rng(0)
    for alpha in (2.0, 3.0, 5.0):
        x = (1 - rng.random(20000)) ** (-1 / (alpha - 1))
        assert hill_alpha(x) == pytest.approx(alpha, rel=0.05)


def test_hill_alpha_is_scale_invariant_and_matches_the_svd_route():
    torch.manual_seed(0)
    w = torch.randn(120, 80, dtype=torch.float64)
    evals = torch.linalg.svdvals(w).square().numpy()
    from ww_monitor.functional.eigenvalues import eigenvalues

    assert hill_alpha(eigenvalues(w, method="gram")) == pytest.approx(hill_alpha(evals), rel=1e-9)
    assert hill_alpha(evals * 7.5) == pytest.approx(hill_alpha(evals), rel=1e-12)
