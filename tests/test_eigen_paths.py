"""The CPU eigensolver routes agree: SciPy vs torch LAPACK, mixed precision vs float64."""

from __future__ import annotations

import importlib
import numpy as np
import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis import synthetic

# The module (``ww_monitor.functional.eigenvalues`` is also the name of a function it exports).
eig = importlib.import_module("ww_monitor.functional.eigenvalues")


def _linear(w: np.ndarray) -> nn.Module:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
    return nn.Sequential(layer)


def test_scipy_and_torch_backends_agree(monkeypatch):
    conv = torch.from_numpy(synthetic.heavy_tailed(9 * 48, 96, mu=3, seed=0)).reshape(9, 48, 96)
    wide = torch.from_numpy(synthetic.gaussian(130, 300, seed=1))
    a = eig.batched_eigenvalues([conv, wide], method="gram")
    monkeypatch.setattr(eig, "CPU_BACKEND", "torch")
    b = eig.batched_eigenvalues([conv, wide], method="gram")
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12 * y.max())


def test_non_finite_is_none_with_check_finite_and_raises_without():
    good = torch.randn(20, 10)
    bad = good.clone()
    bad[2, 3] = float("inf")
    out = eig.batched_eigenvalues([good, bad], check_finite=True)
    assert out[1] is None and out[0].shape == (10,)
    with pytest.raises(ValueError, match="non-finite"):
        eig.batched_eigenvalues([bad])


def test_auto_uses_mixed_precision_only_at_and_above_the_size_threshold():
    assert eig.choose_method(torch.float32, "auto", eig.MIXED_MIN_M) == "mixed"
    assert eig.choose_method(torch.bfloat16, "auto", eig.MIXED_MIN_M) == "mixed"
    assert eig.choose_method(torch.float32, "auto", eig.MIXED_MIN_M - 1) == "gram"
    assert eig.choose_method(torch.float64, "auto", 4096) == "svd"


def test_mixed_eigenvalues_within_their_error_bound_and_full_rank_certified():
    # Square Gaussian: the smallest eigenvalues (~1e-7 lambda_max) are below float32's
    # resolution, so the rank must come from the float64 Cholesky certificate.
    w = torch.from_numpy(synthetic.gaussian(520, 520, seed=4))
    errors = []
    mixed = eig.batched_eigenvalues([w], method="mixed", errors=errors)[0]
    exact = eig.batched_eigenvalues([w], method="gram")[0]
    assert 0 < errors[0] < 1e-4 * exact[-1]
    assert np.abs(mixed - exact).max() <= errors[0]
    full = wwm.analyze(_linear(w.numpy()), method="gram").layers[0]
    fast = wwm.analyze(_linear(w.numpy())).layers[0]
    assert full.rank_loss == fast.rank_loss == 0
    for key in ("alpha", "xmin", "log_norm", "log_spectral_norm", "stable_rank", "entropy", "lambda_plus"):
        assert getattr(fast, key) == pytest.approx(getattr(full, key), rel=1e-4), key
    assert fast.phase == full.phase and fast.num_pl_spikes == full.num_pl_spikes


def test_mixed_precision_falls_back_to_float64_for_rank_loss():
    w = synthetic.low_rank(600, 512, rank=384, seed=2)
    fast = wwm.analyze(_linear(w)).layers[0]
    full = wwm.analyze(_linear(w), method="gram").layers[0]
    assert fast.rank_loss == full.rank_loss == 512 - 384
    np.testing.assert_array_equal(fast.eigenvalues, full.eigenvalues)  # solved in float64


def test_mixed_precision_refits_in_float64_when_the_tail_reaches_below_its_precision():
    # Power-law singular values spanning many decades: xmin far below lambda_max.
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((600, 512)))
    q2, _ = np.linalg.qr(rng.standard_normal((512, 512)))
    lam = np.logspace(0, 9, 512)
    w = ((q1 * np.sqrt(lam)) @ q2.T).astype(np.float32)
    fast = wwm.analyze(_linear(w)).layers[0]
    full = wwm.analyze(_linear(w), method="gram").layers[0]
    assert fast.alpha == full.alpha and fast.xmin == full.xmin
