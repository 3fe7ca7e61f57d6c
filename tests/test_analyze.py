"""Metrics, precision handling and the Report of wwm.analyze."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.functional import eigenvalues, matrix_entropy, rank_tolerance


def _model(w: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return nn.ModuleDict({"fc": lin})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_low_rank_matrix_is_detected_at_the_weights_precision(dtype):
    torch.manual_seed(0)
    n, m = 512, 256
    w = (torch.randn(n, m // 4) @ torch.randn(m // 4, m)).to(dtype)
    layer = wwm.analyze(_model(w)).layers[0]
    assert layer.rank_loss >= 0.7 * m
    assert layer.matrix_rank == m // 4
    # A full-rank matrix of the same precision loses nothing.
    assert wwm.analyze(_model(torch.randn(n, m).to(dtype))).layers[0].rank_loss == 0


def test_metric_definitions():
    torch.manual_seed(1)
    w = torch.randn(300, 100, dtype=torch.float64)
    layer = wwm.analyze(_model(w)).layers[0]
    lam = np.sort(torch.linalg.svdvals(w).numpy() ** 2)
    assert layer.num_evals == 100
    assert layer.lambda_max == pytest.approx(lam[-1], rel=1e-10)
    assert layer.log_norm == pytest.approx(math.log10(lam.sum()), rel=1e-10)
    assert layer.log_spectral_norm == pytest.approx(math.log10(lam[-1]), rel=1e-10)
    assert layer.stable_rank == pytest.approx(lam.sum() / lam[-1], rel=1e-10)
    assert layer.alpha_weighted == pytest.approx(layer.alpha * math.log10(lam[-1]), rel=1e-12)
    assert layer.log_alpha_norm == pytest.approx(math.log10((lam ** layer.alpha).sum()), rel=1e-9)
    p = lam / lam.sum()
    assert layer.entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(100), rel=1e-10)
    assert 0 < layer.entropy <= 1
    assert layer.xmax == pytest.approx(lam[-1]) and layer.xmin >= lam[0]
    assert layer.fit_ok and layer.num_pl_spikes == int((lam >= layer.xmin).sum())


def test_entropy_bounds():
    flat = np.ones(50)
    assert matrix_entropy(flat, 50) == pytest.approx(1.0)
    assert matrix_entropy(np.array([0.0] * 9 + [3.0]), 1) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_weights_are_upcast(dtype):
    torch.manual_seed(2)
    w = torch.randn(200, 80)
    ref = wwm.analyze(_model(w.to(dtype).double())).layers[0]
    layer = wwm.analyze(_model(w.to(dtype))).layers[0]
    assert layer.dtype == str(dtype).replace("torch.", "")
    assert layer.eigenvalues.dtype == np.float64
    assert layer.log_norm == pytest.approx(ref.log_norm, rel=1e-9)
    assert layer.alpha == pytest.approx(ref.alpha, rel=1e-6)


def test_gram_and_svd_methods_agree():
    torch.manual_seed(3)
    w = torch.randn(400, 120)
    a = eigenvalues(w, method="gram")
    b = eigenvalues(w, method="svd")
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * b[-1])


def test_rank_tolerance_depends_on_weight_precision():
    assert rank_tolerance(1.0, 100, 50, torch.float32) > rank_tolerance(1.0, 100, 50, torch.float64)
    assert rank_tolerance(1.0, 100, 50, torch.bfloat16) > rank_tolerance(1.0, 100, 50, torch.float32)


def test_non_finite_weights_are_skipped_with_reason_not_raised():
    model = nn.ModuleDict({"good": nn.Linear(32, 32), "bad": nn.Linear(32, 32), "inf": nn.Linear(32, 32)})
    with torch.no_grad():
        model["bad"].weight[3, 4] = float("nan")
        model["inf"].weight[0, 0] = float("inf")
    r = wwm.analyze(model)
    assert [l.name for l in r.layers] == ["good"]
    assert {s.name: s.reason for s in r.skipped} == {
        "bad": "non-finite weights (NaN or Inf)", "inf": "non-finite weights (NaN or Inf)"}


def test_zero_matrix_gives_failed_fit_excluded_from_summary():
    model = nn.ModuleDict({"zero": nn.Linear(32, 32), "fc": nn.Linear(64, 32)})
    with torch.no_grad():
        model["zero"].weight.zero_()
    r = wwm.analyze(model)
    zero = r["zero"]
    assert not zero.fit_ok and zero.fit_reason and math.isnan(zero.alpha)
    s = r.summary()
    assert s["num_failed_fits"] == 1 and s["num_layers"] == 2
    # 32 eigenvalues each: both unreliable, so left out of the default alpha mean (issue 10) ...
    assert s["num_unreliable"] == 2 and s["num_undetermined"] == 2 and math.isnan(s["alpha"])
    # ... and the plain mean over the successful fits on request.
    assert r.summary(include_unreliable=True)["alpha"] == pytest.approx(r["fc"].alpha)


def test_tiny_layers_are_unreliable_undetermined_and_left_out_of_the_summary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    r = wwm.analyze(model)
    big, head = r["0"], r["2"]
    assert big.num_evals == 128 and big.reliable and big.phase is not None
    assert head.num_evals == 10 and not head.reliable and head.phase is None
    s = r.summary()
    assert s["alpha"] == pytest.approx(big.alpha) and s["num_unreliable"] == 1 and s["num_undetermined"] == 1
    assert r.summary(include_unreliable=True)["alpha"] == pytest.approx(np.mean([big.alpha, head.alpha]))
    assert s["log_norm"] == pytest.approx(np.mean([big.log_norm, head.log_norm]))  # exact at any size: all layers
    row = r.to_pandas().set_index("name")
    assert bool(row.loc["2", "reliable"]) is False and row.loc["2", "num_evals"] == 10


def test_report_outputs():
    torch.manual_seed(4)
    r = wwm.analyze(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 4)))
    assert len(r) == 2 and [s.name for s in r.skipped] == ["2"]
    payload = json.loads(r.to_json())
    assert [l["name"] for l in payload["layers"]] == ["0", "1"]
    assert payload["skipped"][0]["reason"].startswith("4 eigenvalues")
    # 32 and 16 eigenvalues: unreliable, so the default alpha mean is empty (issue 10): NaN,
    # written as null (strict JSON)
    assert math.isnan(r.summary()["alpha"]) and payload["summary"]["alpha"] is None
    assert payload["summary"]["num_unreliable"] == 2
    assert r.summary(include_unreliable=True)["alpha"] == pytest.approx(np.mean([l.alpha for l in r.layers]))
    df = r.to_pandas()
    assert list(df["name"]) == ["0", "1"] and "alpha_weighted" in df.columns and "eigenvalues" not in df.columns
    with pytest.raises(KeyError, match="no analysed layer"):
        r["nope"]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(wwm.WWMonitorError, match="conv_mode"):
        wwm.analyze(nn.Linear(8, 8), conv_mode="fft")
    with pytest.raises(wwm.WWMonitorError, match="method"):
        wwm.analyze(nn.Linear(8, 8), method="lanczos")
    with pytest.raises(wwm.WWMonitorError, match="min_evals"):
        wwm.analyze(nn.Linear(8, 8), min_evals=0)
    with pytest.raises(wwm.WWMonitorError, match=r"expected an nn.Module or a state dict"):
        wwm.analyze(42)


def test_analysis_does_not_touch_weights_or_grad_state():
    model = nn.Linear(40, 30)
    before = model.weight.detach().clone()
    wwm.analyze(model)
    assert torch.equal(model.weight, before) and model.weight.grad is None
    assert torch.is_grad_enabled()


def test_progress_callback_reports_every_layer_and_changes_no_result():
    import torch
    from torch import nn

    import ww_monitor as wwm

    torch.manual_seed(0)
    # 11 same-shape layers (two progress groups) plus odd shapes, interleaved
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(11)], nn.Linear(64, 48), nn.Conv2d(8, 16, 3),
                          nn.Linear(48, 64))
    calls = []
    shown = wwm.analyze(model, progress=lambda done, total: calls.append((done, total)))
    plain = wwm.analyze(model)
    total = len(plain.layers) + sum(1 for s in plain.skipped if s.shape)
    assert calls[0] == (0, calls[-1][1]) and calls[-1][0] == calls[-1][1] >= len(plain.layers)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) >= 4
    assert [l.name for l in shown.layers] == [l.name for l in plain.layers]
    assert [l.alpha for l in shown.layers] == [l.alpha for l in plain.layers]
    del total
