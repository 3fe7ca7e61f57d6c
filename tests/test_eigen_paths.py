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


def test_mixed_precision_counts_rank_loss_in_float64():
    # A quarter of the spectrum is zero: the rank certificate fails and the eigenvalues at or
    # below the tolerance are counted in float64 (LDL^T inertia), not read off the float32 ones.
    w = synthetic.low_rank(600, 512, rank=384, seed=2)
    errors = []
    eig.batched_eigenvalues([torch.from_numpy(w)], method="mixed", errors=errors)
    fast = wwm.analyze(_linear(w)).layers[0]
    full = wwm.analyze(_linear(w), method="gram").layers[0]
    assert fast.rank_loss == full.rank_loss == 512 - 384
    assert np.abs(fast.eigenvalues - full.eigenvalues).max() <= errors[0]
    for key in ("alpha", "xmin", "log_norm", "stable_rank", "entropy"):
        assert getattr(fast, key) == pytest.approx(getattr(full, key), rel=1e-4), key


def test_ldl_inertia_counts_the_eigenvalues_at_or_below_a_shift():
    gram = importlib.import_module("ww_monitor.functional.gram")
    rng = np.random.default_rng(7)
    for m in (5, 40, 200):
        a = rng.standard_normal((m, m))
        sym = a + a.T  # indefinite: Bunch-Kaufman takes 2 x 2 pivots
        ev = np.linalg.eigvalsh(sym)
        for shift in (ev[0] - 1.0, *(0.5 * (ev[1:] + ev[:-1]))[:: max(1, m // 7)], ev[-1] + 1.0):
            assert gram._count_at_or_below(np.tril(sym).copy(order="F"), float(shift)) == np.count_nonzero(ev <= shift)


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


def test_mixed_rank_of_pooled_slices_uses_the_pooled_tolerance():
    # Two pooled slices whose lambda_max differ 1e4-fold: the rank tolerance comes from the pooled
    # lambda_max, so slice 0's eigenvalues, packed around that tolerance, must be resolved exactly
    # even though they are far above slice 0's own tolerance (where its float32 solve looked safe).
    from ww_monitor.functional.spectral_metrics import rank_tolerance

    rng = np.random.default_rng(3)
    n, m = 600, 512
    tol = rank_tolerance(1e4, n, m, torch.float32)
    lam_a = np.concatenate([tol * np.linspace(1 - 1e-5, 1 + 1e-5, m - 1), [1.0]])
    lam_b = np.linspace(1.0, 1e4, m)
    stack = []
    for lam in (lam_a, lam_b):
        u, _ = np.linalg.qr(rng.standard_normal((n, m)))
        v, _ = np.linalg.qr(rng.standard_normal((m, m)))
        stack.append((u * np.sqrt(lam)) @ v.T)
    stack = torch.from_numpy(np.stack(stack).astype(np.float32))
    mixed = eig.batched_eigenvalues([stack], method="mixed")[0]
    exact = eig.batched_eigenvalues([stack], method="gram")[0]
    # The rank at the tolerance the mixed route's own lambda_max sets (as analyze counts it) is the
    # exact one. (lambda_max itself is known to ~1e-6 there, so the tolerance moves that much.)
    tol = rank_tolerance(float(mixed[-1]), n, m, torch.float32)
    assert 0 < np.count_nonzero(exact <= tol) < m - 1  # the tolerance cuts through the cluster
    assert np.count_nonzero(mixed > tol) == np.count_nonzero(exact > tol)


def test_mixed_route_solves_a_shape_in_float64_once_its_rank_certificates_fail(monkeypatch):
    gram = importlib.import_module("ww_monitor.functional.gram")
    float32_solves = []
    solve = gram._float32_eigenvalues
    monkeypatch.setattr(gram, "_float32_eigenvalues", lambda g: float32_solves.append(g.shape) or solve(g))
    plan = gram.RoutePlan()
    # Square Gaussian: the smallest eigenvalues need the certificate, which passes: float32 stays.
    square = torch.from_numpy(synthetic.gaussian(520, 520, seed=4))
    ev, bound = gram.cpu_gram_eigenvalues(square, mixed=True, plan=plan)
    exact = eig.batched_eigenvalues([square], method="gram")[0]
    assert 0 < np.abs(ev - exact).max() <= bound and plan.wants_float32((520, 520))
    # Rank-deficient: the certificate fails (the rank is counted in float64), and once that is the
    # rule the next matrices of that shape go to float64 directly.
    low = [torch.from_numpy(synthetic.low_rank(600, 512, rank=384, seed=s)) for s in range(2, 9)]
    for i, w in enumerate(low):
        ev, bound = gram.cpu_gram_eigenvalues(w, mixed=True, plan=plan)
        exact = eig.batched_eigenvalues([w], method="gram")[0]
        assert (bound > 0) == (i < 6) and np.abs(ev - exact).max() <= max(bound, 1e-12 * exact[-1])
    # After 6 failed certificates (> 20% of 6 + the prior of 20) the seventh goes to float64 only.
    assert float32_solves == [(520, 520)] + [(512, 512)] * 6
    assert not plan.wants_float32((600, 512)) and plan.wants_float32((520, 520))
