"""Every kind of bad weight gives a documented result (skipped with a reason, or a failed fit),
never an exception."""

import math

import pytest
import torch
from torch import nn

import ww_monitor as wwm


def _single(weight: torch.Tensor, **kw):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    if not weight.is_meta:
        with torch.no_grad():
            layer.weight.copy_(weight)
    return wwm.analyze(nn.ModuleDict({"w": layer}), **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(value):
    w = torch.randn(40, 30)
    w[5, 7] = value
    r = _single(w)
    assert r.layers == [] and r.skipped[0].reason == "non-finite weights (NaN or Inf)"


def test_all_zero():
    r = _single(torch.zeros(40, 30))
    (l,) = r.layers
    assert l.matrix_rank == 0 and l.rank_loss == 30
    assert not l.fit_ok and "eigenvalues above" in l.fit_reason
    assert math.isnan(l.alpha) and math.isnan(l.log_norm)
    assert r.summary()["num_failed_fits"] == 1 and math.isnan(r.summary()["alpha"])


def test_constant_matrix_is_rank_one():
    (l,) = _single(torch.full((40, 30), 0.3)).layers
    assert l.matrix_rank == 1 and l.rank_loss == 29 and not l.fit_ok
    assert l.stable_rank == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (7, 7), (3, 100)])
def test_vectors_and_tiny_layers_are_skipped_with_reason(shape):
    r = _single(torch.randn(*shape))
    assert r.layers == []
    assert "< min_evals=8" in r.skipped[0].reason


def test_few_distinct_eigenvalues_fail_the_fit_cleanly():
    w = torch.zeros(20, 10)
    w[0, 0], w[1, 1], w[2, 2] = 1.0, 2.0, 3.0  # three nonzero eigenvalues
    (l,) = _single(w).layers
    assert not l.fit_ok and l.matrix_rank == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    (l,) = _single(torch.randn(64, 32).to(dtype)).layers
    assert l.fit_ok and l.rank_loss == 0 and math.isfinite(l.alpha)


def test_meta_device_parameters_are_skipped():
    r = _single(torch.empty(40, 30, device="meta"))
    assert r.layers == [] and "meta device" in r.skipped[0].reason


def test_mixed_devices_in_one_model():
    model = nn.ModuleDict({"real": nn.Linear(30, 40), "lazy": nn.Linear(30, 40, device="meta")})
    r = wwm.analyze(model)
    assert [l.name for l in r.layers] == ["real"] and [s.name for s in r.skipped] == ["lazy"]


def test_uninitialized_lazy_module_is_reported_not_raised():
    model = nn.Sequential(nn.LazyLinear(16), nn.Linear(16, 16))
    r = wwm.analyze(model)
    assert [l.name for l in r.layers] == ["1"]
    assert [s.name for s in r.skipped] == ["0"]


def test_memory_budget():
    r = _single(torch.randn(400, 300), max_matrix_bytes=400 * 300 * 8 - 1)
    assert r.layers == [] and "max_matrix_bytes" in r.skipped[0].reason
    assert len(_single(torch.randn(400, 300), max_matrix_bytes=400 * 300 * 8).layers) == 1


def test_huge_and_tiny_scales_give_finite_metrics():
    torch.manual_seed(0)
    base = torch.randn(80, 40, dtype=torch.float64)
    ref = _single(base).layers[0]
    for scale in (1e-3, 1e6):
        l = _single(base * scale).layers[0]
        assert l.fit_ok and l.alpha == pytest.approx(ref.alpha, rel=1e-9)
        assert math.isfinite(l.log_alpha_norm)
