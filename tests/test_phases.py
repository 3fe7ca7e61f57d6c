"""Phase rules (one test per branch), classify_phase invariances, and the analyze() wiring."""

from __future__ import annotations

import importlib
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis import phases, synthetic
from ww_monitor.analysis.phases import Phase, classify_phase, phase_evidence, phase_from_spectrum
from ww_monitor.functional.marchenko_pastur import MPFit, mp_edges, tracy_widom_scale
from ww_monitor.functional.power_law import PowerLawFit

# The package re-exports the analyze *function* under the submodule's name.
analyze_module = importlib.import_module("ww_monitor.analysis.analyze")


# --- the decision procedure, branch by branch, on hand-made fits -----------------------------

N, M = 800, 400
Q = N / M
LAM_PLUS = mp_edges(Q, 1.0, N)[1]
TW = tracy_widom_scale(N, M)


def _mp(num_spikes=0, ks=0.005, lam_max=LAM_PLUS * 0.99):
    return MPFit(sigma=1.0, lambda_plus=LAM_PLUS, lambda_minus=mp_edges(Q, 1.0, N)[0], tw_scale=TW,
                 num_spikes=num_spikes, ks=ks, mp_softrank=LAM_PLUS / lam_max)


def _pl(alpha=8.0, ok=True):
    return PowerLawFit(alpha, 1.0, 2.0, 0.05, 0.1, 20, ok=ok)


def _phase(lam_max, mp, pl=None, rank_loss=0):
    ev = np.linspace(0.1, lam_max, M)
    return phase_from_spectrum(ev, N, M, rank_loss=rank_loss, power_law=pl or _pl(), mp=mp)


def test_rule_rank_collapse_first():
    k = math.ceil(phases.RANK_COLLAPSE_FRACTION * M)
    assert _phase(LAM_PLUS, _mp(), rank_loss=k) is Phase.RANK_COLLAPSE
    assert _phase(LAM_PLUS, _mp(), rank_loss=k - 1) is Phase.RANDOM_LIKE


def test_rule_no_bulk_decided_by_alpha():
    bad = phases.NO_BULK_KS + 0.05
    assert _phase(LAM_PLUS, _mp(ks=bad), _pl(alpha=2.5)) is Phase.HEAVY_TAILED
    assert _phase(LAM_PLUS, _mp(ks=bad), _pl(alpha=phases.HEAVY_TAILED_MAX_ALPHA + 1)) is Phase.BULK_DECAY
    assert _phase(LAM_PLUS, _mp(ks=bad), _pl(ok=False)) is Phase.BULK_DECAY


def test_rule_continuum_split_by_reach_and_alpha():
    many = int(phases.FEW_SPIKES_FRACTION * M) + phases.FEW_SPIKES + 1
    far, near = 10 * LAM_PLUS, 1.3 * LAM_PLUS
    assert _phase(far, _mp(many, lam_max=far), _pl(alpha=3.0)) is Phase.HEAVY_TAILED
    assert _phase(near, _mp(many, lam_max=near), _pl(alpha=3.0)) is Phase.BULK_DECAY
    assert _phase(far, _mp(many, lam_max=far), _pl(alpha=9.0)) is Phase.BULK_DECAY
    # A deformed bulk (many misplaced eigenvalues) is a continuum even with few spikes.
    deformed = (max(phases.MISFIT_MIN, math.log(M)) + 3) / M
    assert _phase(near, _mp(1, ks=deformed, lam_max=near)) is Phase.BULK_DECAY


def test_rule_random_like_bleeding_out_and_spikes():
    assert _phase(LAM_PLUS, _mp()) is Phase.RANDOM_LIKE
    just_out = 1.15 * LAM_PLUS  # BBP ratio ~1.4x threshold
    assert _phase(just_out, _mp(2, lam_max=just_out)) is Phase.BLEEDING_OUT
    far = 4 * LAM_PLUS
    assert _phase(far, _mp(3, lam_max=far)) is Phase.BULK_PLUS_SPIKES


def test_rule_ladder_of_spikes_into_the_edge_is_bulk_decay():
    far, near = 4 * LAM_PLUS, 1.1 * LAM_PLUS  # BBP ratio ~3.5x and ~1.3x the threshold
    bulk = np.linspace(0.1, LAM_PLUS, M - 4)
    ladder = np.concatenate([bulk, [near, 1.6 * LAM_PLUS, 2.5 * LAM_PLUS, far]])
    isolated = np.concatenate([bulk, [3 * LAM_PLUS, 3.5 * LAM_PLUS, 3.8 * LAM_PLUS, far]])
    ev = phase_evidence(ladder, N, M, rank_loss=0, power_law=_pl(), mp=_mp(4, lam_max=far))
    assert ev.phase is Phase.BULK_DECAY and ev.rule == "ladder of spikes into the edge"
    assert ev.weakest_spike_bbp_ratio < phases.SEPARATED_BBP_RATIO <= ev.spike_bbp_ratio
    assert phase_from_spectrum(isolated, N, M, rank_loss=0, power_law=_pl(), mp=_mp(4, lam_max=far)) \
        is Phase.BULK_PLUS_SPIKES
    # Two spikes are two signals, not a ladder.
    two = np.concatenate([np.linspace(0.1, LAM_PLUS, M - 2), [near, far]])
    assert phase_from_spectrum(two, N, M, rank_loss=0, power_law=_pl(), mp=_mp(2, lam_max=far)) \
        is Phase.BULK_PLUS_SPIKES


def test_evidence_reports_rule_and_numbers():
    ev = phase_evidence(np.linspace(0.1, 4 * LAM_PLUS, M), N, M, rank_loss=0, power_law=_pl(), mp=_mp(3, lam_max=4 * LAM_PLUS))
    assert ev.phase is Phase.BULK_PLUS_SPIKES and ev.rule == "few separated spikes"
    assert ev.spike_bbp_ratio > phases.SEPARATED_BBP_RATIO
    assert ev.as_dict()["phase"] == "bulk+spikes"


def test_thresholds_are_named_and_sane():
    assert 0 < phases.RANK_COLLAPSE_FRACTION < 0.5
    assert 0 < phases.NO_BULK_KS < 1 and phases.HEAVY_TAILED_MAX_SOFTRANK < 1
    assert phases.SEPARATED_BBP_RATIO > 1 and phases.HEAVY_TAILED_MAX_ALPHA > 2


# --- classify_phase on real matrices: invariances --------------------------------------------

_EXAMPLES = {
    Phase.RANDOM_LIKE: lambda: synthetic.gaussian(300, 200, seed=0),
    Phase.BLEEDING_OUT: lambda: synthetic.bleeding_out(300, 200, 2, seed=0),
    Phase.BULK_PLUS_SPIKES: lambda: synthetic.graded_spikes(300, 200, 3, seed=0),
    Phase.BULK_DECAY: lambda: synthetic.bulk_decay(400, 400, seed=0),
    Phase.HEAVY_TAILED: lambda: synthetic.heavy_tailed(300, 200, mu=1.5, seed=0),
    Phase.RANK_COLLAPSE: lambda: synthetic.zeroed_columns(300, 200, 0.3, seed=0),
}


@pytest.mark.parametrize("phase", list(Phase))
def test_invariant_under_scale_transpose_and_permutations(phase):
    w = _EXAMPLES[phase]()
    assert classify_phase(w) is phase
    rng = np.random.default_rng(1)
    assert classify_phase(w.T) is phase
    assert classify_phase(w[rng.permutation(w.shape[0])]) is phase
    assert classify_phase(w[:, rng.permutation(w.shape[1])]) is phase
    for c in (1e-3, -2.0, 1e3):
        assert classify_phase(c * w) is phase


@settings(max_examples=5, deadline=None)
@given(log_c=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_scale_and_permutation_invariance_property(log_c, seed):
    w = synthetic.graded_spikes(240, 160, 2, seed=seed)
    rng = np.random.default_rng(seed)
    moved = (10.0 ** log_c) * w[rng.permutation(240)][:, rng.permutation(160)]
    assert classify_phase(moved) is classify_phase(w) is Phase.BULK_PLUS_SPIKES


def test_accepts_numpy_and_torch_of_any_float_dtype():
    w = synthetic.graded_spikes(200, 100, 2, seed=0, dtype=np.float64)
    assert classify_phase(w) is Phase.BULK_PLUS_SPIKES
    assert classify_phase(torch.from_numpy(w)) is Phase.BULK_PLUS_SPIKES
    assert classify_phase(torch.from_numpy(w).float()) is Phase.BULK_PLUS_SPIKES
    assert wwm.classify_phase is classify_phase  # public at the top level


def test_degenerate_and_invalid_input():
    assert classify_phase(np.zeros((20, 10))) is Phase.RANK_COLLAPSE
    with pytest.raises(ValueError):
        classify_phase(np.zeros((3, 4, 5)))
    w = synthetic.gaussian(20, 10, seed=0)
    w[0, 0] = np.nan
    with pytest.raises(ValueError):
        classify_phase(w)


# --- analyze() fills the RMT fields ----------------------------------------------------------

def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Linear(300, 300), nn.Conv2d(32, 64, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(synthetic.graded_spikes(300, 200, 3, seed=1)))
        model[1].weight.copy_(torch.from_numpy(synthetic.zeroed_columns(300, 300, 0.3, seed=1)))
        model[1].weight[5, 7] = 500.0  # one huge entry: a correlation trap
    return model


def test_analyze_sets_rmt_fields_and_phases():
    report = wwm.analyze(_model(), traps=True, seed=3)
    by = {l.name: l for l in report.layers}
    spikes, collapsed, conv = by["0"], by["1"], by["2"]
    assert spikes.phase is Phase.BULK_PLUS_SPIKES and spikes.num_spikes == 3
    assert spikes.mp_sigma == pytest.approx(1.0, rel=0.02)
    assert spikes.lambda_plus == pytest.approx(mp_edges(1.5, 1.0, 300)[1], rel=0.03)
    assert 0 < spikes.mp_softrank < 0.1 and spikes.mp_ks < 0.05
    assert spikes.num_traps == 0
    assert collapsed.phase is Phase.RANK_COLLAPSE and collapsed.num_traps >= 1
    # Conv: 9 pooled 64 x 32 slices of PyTorch's uniform init, eigenvalues halved (eig_scale).
    assert conv.num_slices == 9 and conv.phase is Phase.RANDOM_LIKE and conv.num_spikes == 0
    fan_in = 32 * 9
    sigma2 = (1.0 / fan_in) / 3.0 * 0.5  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) / 3, halved
    assert conv.mp_sigma ** 2 == pytest.approx(sigma2, rel=0.05)
    assert conv.lambda_plus == pytest.approx(mp_edges(2.0, math.sqrt(sigma2), 64)[1], rel=0.05)
    assert conv.eigenvalues.max() < conv.lambda_plus * 1.2
    assert conv.num_traps == 0


def test_analyze_without_traps_leaves_none():
    report = wwm.analyze(nn.Linear(128, 64), traps=False)
    assert report.layers[0].num_traps is None and report.layers[0].phase is Phase.RANDOM_LIKE
    # Under RELIABLE_MIN_EVALS (50) eigenvalues there is no phase: undetermined (issue 10).
    assert wwm.analyze(nn.Linear(64, 32)).layers[0].phase is None


def test_rmt_failure_is_contained(monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(analyze_module, "fit_marchenko_pastur", boom)
    monkeypatch.setattr(analyze_module, "count_correlation_traps", boom)
    with caplog.at_level(logging.DEBUG, logger="ww_monitor.analysis.analyze"):
        report = wwm.analyze(nn.Linear(64, 32), traps=True)
    layer = report.layers[0]
    assert math.isnan(layer.lambda_plus) and math.isnan(layer.mp_sigma) and math.isnan(layer.mp_softrank)
    assert layer.phase is None and layer.num_traps is None and layer.num_spikes == 0
    assert math.isfinite(layer.alpha) or not layer.fit_ok  # the rest of the analysis survived
    assert "synthetic failure" in caplog.text
