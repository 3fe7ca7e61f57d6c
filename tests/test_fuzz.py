"""Property-based fuzzing (hypothesis): only documented exceptions, finite results or explicit
failure flags; failed fits never enter the model averages."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import ww_monitor as wwm

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

positive = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False).filter(lambda x: x > 0)


def _check_fit(fit, data):
    if fit.ok:
        assert math.isfinite(fit.alpha) and fit.alpha > 1
        assert 0 <= fit.D < 1 and math.isfinite(fit.sigma) and fit.sigma >= 0
        kept = data[data > 1e-5]
        assert fit.xmin in kept and fit.xmax == kept.max()
        assert fit.num_pl_spikes == int((kept >= fit.xmin).sum()) >= 2
    else:
        assert fit.reason and math.isnan(fit.alpha) and fit.num_pl_spikes == 0


@FUZZ
@given(arrays(np.float64, st.integers(0, 300), elements=positive))
def test_fit_power_law_on_arbitrary_positive_arrays(data):
    _check_fit(wwm.fit_power_law(data), data)


@FUZZ
@given(st.lists(st.sampled_from([1.0, 2.0, 2.0, 5.0, 1e3]), min_size=0, max_size=60),
       st.integers(0, 20))
def test_fit_power_law_with_duplicates_and_ties_at_xmin(values, ties):
    data = np.array(values + [values[0]] * ties if values else [], dtype=np.float64)
    _check_fit(wwm.fit_power_law(data), data)


@FUZZ
@given(arrays(np.float64, st.integers(0, 40), elements=st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_fit_power_law_ignores_non_finite_and_negative_values(data):
    fit = wwm.fit_power_law(data)
    clean = data[np.isfinite(data) & (data > 0)]
    _check_fit(fit, clean)


@pytest.mark.parametrize("seed", range(3))
def test_fit_is_deterministic_and_order_independent(seed):
    rng = np.random.default_rng(seed)
    data = rng.pareto(2.5, 500) + 1
    a, b = wwm.fit_power_law(data), wwm.fit_power_law(rng.permutation(data))
    assert a == b


_dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
_contents = st.sampled_from(["gaussian", "zeros", "constant", "lowrank", "spiky", "nan"])


def _matrix(n: int, m: int, seed: int, content: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, m, generator=g, dtype=torch.float64)
    if content == "zeros":
        w.zero_()
    elif content == "constant":
        w.fill_(0.7)
    elif content == "lowrank":
        w = w[:, :1] @ w[:1, :]
    elif content == "spiky":
        w[0, 0] = 1e4
    elif content == "nan":
        w[n // 2, m // 2] = float("nan")
    return w


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70), st.integers(1, 70), _dtypes, st.integers(0, 2**31 - 1),
       _contents)
def test_analyze_random_shapes_and_dtypes(n, m, dtype, seed, content):
    w = _matrix(n, m, seed, content)
    layer = nn.Linear(m, n, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w.to(dtype))
    report = wwm.analyze(nn.ModuleDict({"fc": layer}))
    assert len(report.layers) + len(report.skipped) == 1
    for l in report.layers:
        assert l.num_evals == min(n, m) and 0 <= l.rank_loss <= l.num_evals
        if l.fit_ok:
            assert all(math.isfinite(v) for v in (l.alpha, l.D, l.xmin, l.alpha_weighted, l.log_alpha_norm))
        else:
            assert math.isnan(l.alpha) and l.fit_reason
    summary = report.summary()
    ok = [l.alpha for l in report.layers if l.fit_ok and l.reliable]
    assert summary["num_failed_fits"] == sum(not l.fit_ok for l in report.layers)
    assert summary["num_unreliable"] == sum(not l.reliable for l in report.layers)
    if ok:
        assert summary["alpha"] == pytest.approx(np.mean(ok))
    else:
        assert math.isnan(summary["alpha"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 80), st.integers(1, 80), _dtypes, st.integers(0, 2**31 - 1),
       _contents)
def test_classify_phase_random_shapes_and_dtypes(n, m, dtype, seed, content):
    """classify_phase returns a Phase or raises a documented WWMonitorError/ValueError."""
    w = _matrix(n, m, seed, content)
    try:
        phase = wwm.classify_phase(w.to(dtype))
    except (wwm.WWMonitorError, ValueError) as err:
        assert str(err)
    else:
        assert isinstance(phase, wwm.Phase)
