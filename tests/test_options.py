"""weightwatcher-style options and distances: the functional pieces, validation, outputs and CLI
(parity with weightwatcher itself is in test_parity_weightwatcher_options.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis.adapters import ZERO_UPDATE_REASON, update_core
from ww_monitor.errors import WWMonitorError
from ww_monitor.functional.determinant import detx_constraint
from ww_monitor.functional.distances import cka_similarity, esd_shift, relative_distance
from ww_monitor.functional.fingers import fit_clip_xmax
from ww_monitor.functional.truncated_power_law import _moments, fit_truncated_power_law


def test_detx_is_computed_with_sums_of_logs_where_a_product_overflows():
    # Rescaled to mean 1: 2000 eigenvalues 1.5 and 2000 of 0.5. The top tail's product is
    # 1.5^2000 * 0.5^j, below 1 once j > 2000 ln 1.5 / ln 2 = 1169.9: detX_num = 2000 + 1170.
    ev = np.concatenate([np.full(2000, 0.5), np.full(2000, 1.5)]) * 7.0  # any scale
    with np.errstate(over="ignore"):
        assert np.prod(ev[2000:] / 7.0) == np.inf  # what a product would face
    d = detx_constraint(ev)
    assert d.num == 3170 and d.index == 4000 - 3170 and d.value == pytest.approx(0.5 * 7.0)
    # Nothing below 1: the whole ESD, index 1 (weightwatcher's convention); degenerate: 0.
    assert detx_constraint([1.0, 1.0 + 1e-9]).num == 2
    assert detx_constraint([2.0, 2.0]).num == 0


def test_detx_matches_a_direct_product_scan_on_small_spectra():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ev = np.sort(rng.pareto(2.0, rng.integers(8, 60)) + 1e-3)
        x = ev * ev.size / ev.sum()
        idx = next((i for i in range(ev.size - 1, 0, -1) if np.prod(x[i:]) < 1.0), None)
        d = detx_constraint(ev)
        assert (d.num, d.index) == ((ev.size - idx, idx) if idx is not None else (ev.size, 1))


def test_truncated_power_law_recovers_its_parameters_and_matches_moments():
    rng = np.random.default_rng(1)
    alpha, lam, xmin = 1.5, 0.3, 1.0
    x = []
    while len(x) < 20000:  # exponential proposal, power-law acceptance
        y = xmin + rng.exponential(1 / lam, 40000)
        x.extend(y[rng.random(y.size) < (y / xmin) ** -alpha].tolist())
    x = np.array(x[:20000])
    fit = fit_truncated_power_law(x, xmin)
    assert fit.ok and fit.n == x.size
    # Sampling spread at this size is ~0.05 in alpha (seen over seeds); 0.1 leaves room, not slack.
    assert fit.alpha == pytest.approx(alpha, abs=0.1) and fit.Lambda == pytest.approx(lam, rel=0.1)
    # The MLE of an exponential family matches the moments of (ln x, x).
    _, mu, _ = _moments(fit.alpha, fit.Lambda * xmin)
    assert mu[0] == pytest.approx(np.log(x / xmin).mean(), rel=1e-6)
    assert mu[1] == pytest.approx((x / xmin).mean(), rel=1e-6)
    assert not fit_truncated_power_law(x[:3], xmin).ok


def test_clip_xmax_honours_max_fingers():
    rng = np.random.default_rng(0)
    ev = np.sort(np.linalg.svd(rng.standard_t(3, (300, 150)), compute_uv=False) ** 2)
    assert fit_clip_xmax(ev).num_fingers > 0
    none = fit_clip_xmax(ev, max_fingers=2)  # clips 2..max_fingers-1: nothing to try
    assert none.num_fingers == 0 and none.fit.alpha == none.raw_alpha


def test_analyze_options_fill_their_columns_only_when_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 120), nn.Linear(80, 80))
    plain = wwm.analyze(model)
    for l in plain.layers:
        assert all(getattr(l, k) is None for k in ("detX_num", "ERG_gap", "num_fingers", "Lambda", "rand_distance",
                                                      "distance_from_init", "esd_shift"))
    on = wwm.analyze(model, ERG=True, fix_fingers="clip_xmax", fit="TPL", randomize=True, seed=3)
    for l in on.layers:
        assert l.detX_num > 0 and l.num_fingers is not None and l.Lambda is not None
        assert 0 <= l.rand_distance <= 1 and l.max_rand_eval > 0 and l.rand_num_spikes >= 0
        assert l.ww_softrank == pytest.approx(1 - l.ww_maxdist / l.lambda_max)
    assert wwm.analyze(model, randomize=True, seed=3)[on.layers[0].name].rand_distance == on.layers[0].rand_distance
    e = wwm.analyze(model, fit="E_TPL").layers[0]
    assert e.xmin == wwm.analyze(model, fix_fingers="xmin_peak").layers[0].xmin and e.Lambda is not None
    df = on.to_pandas()
    assert {"detX_num", "detX_val", "ERG_gap", "Lambda", "rand_distance", "ww_softrank"} <= set(df.columns)
    payload = json.loads(plain.to_json())
    assert payload["layers"][0]["detX_num"] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(fix_fingers="xmin"), "fix_fingers"), (dict(fit="tpl"), "fit"), (dict(max_fingers=0), "max_fingers"),
    (dict(finger_thresh=-1), "finger_thresh"), (dict(xmin_max=0), "xmin_max"), (dict(randomize="yes"), "randomize"),
    (dict(peft="lora"), "peft"), (dict(fit="E_TPL", fix_fingers="clip_xmax"), "E_TPL"),
])
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(WWMonitorError, match=match):
        wwm.analyze(nn.Linear(20, 20), **kwargs)


def test_distance_functions():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 20, generator=g)
    assert relative_distance(w, w * 1.1) == pytest.approx(0.1, rel=1e-6)
    assert relative_distance(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0
    assert cka_similarity(w, 3 * w) == pytest.approx(1.0)
    assert cka_similarity(w, torch.randn(40, 20, generator=g)) < 0.9
    ev = np.linspace(1, 10, 50)
    assert esd_shift(ev, ev) == 0.0 and esd_shift(ev, 100 * ev) == pytest.approx(2.0)  # two decades


def test_distances_from_paths_and_unmatched_layers(tmp_path):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    b = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    d = wwm.distances(tmp_path / "a.pt", tmp_path / "b.pt")
    assert [l.name for l in d.layers] == ["0"] and [u.name for u in d.unmatched] == ["1"]
    assert d["0"].delta_b == pytest.approx(float((a[0].bias - b[0].bias).detach().norm()), rel=1e-6)
    assert set(d.mean()) == {"euclidean", "relative", "cka", "delta_b"}
    with pytest.raises(WWMonitorError, match="expects"):
        wwm.distances(a, 3)


def test_lora_update_core_and_state_dict_adapters():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=g), torch.randn(50, 4, generator=g)
    core = update_core(a, b, scaling=2.0)
    assert core.shape == (4, 4)
    expected = torch.linalg.svdvals((2.0 * b @ a).double())[:4]
    assert torch.allclose(torch.linalg.svdvals(core.double()), expected, rtol=1e-5)
    state = {"m.fc.base_layer.weight": torch.randn(50, 30, generator=g),
             "m.fc.lora_A.weight": torch.randn(8, 30, generator=g), "m.fc.lora_B.weight": torch.zeros(50, 8),
             "m.other.weight": torch.randn(40, 20, generator=g)}
    only = wwm.analyze(state, peft=True)
    assert not only.layers and [(s.name, s.reason) for s in only.skipped] == [("m.fc.lora_BA.default", ZERO_UPDATE_REASON)]
    state["m.fc.lora_B.weight"] = torch.randn(50, 8, generator=g)
    assert [l.name for l in wwm.analyze(state, peft=True).layers] == ["m.fc.lora_BA.default"]
    assert [l.name for l in wwm.analyze(state).layers] == ["m.fc", "m.other"]
    assert [l.name for l in wwm.analyze(state, peft="with_base").layers] == [
        "m.fc", "m.other", "m.fc.lora_BA.default", "m.fc.lora_W_plus_AB.default"]


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # the whole table, not fitted to a width
    return subprocess.run([sys.executable, "-m", "ww_monitor", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_flags_add_their_columns(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32)).state_dict(), path)
    table = _cli("analyze", path, "--detX", "--fit", "TPL", "--fix-fingers", "clip_xmax", "--max-fingers", "5")
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert {"detX_num", "ERG_gap", "num_fingers", "Lambda"} <= set(header) and "rand_distance" not in header
    rows = list(csv.DictReader(io.StringIO(_cli("analyze", path, "--ERG", "--randomize", "--format", "csv").stdout)))
    assert rows and all(r["detX_num"] and r["rand_distance"] for r in rows)
    same = json.loads(_cli("analyze", path, "--base-model", path, "--format", "json").stdout)
    assert not same["layers"] and len(same["skipped"]) == 2 and "identical to base_model" in same["skipped"][0]["reason"]
    bad = _cli("analyze", path, "--max-fingers", "0")
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr
