"""Alert rules and the alpha-drift state machine, on constructed snapshot results."""

import math

import pytest

from ww_monitor.monitoring.alerts import AlertConfig, AlertTracker
from ww_monitor.monitoring.early_stopping import AlphaDriftRule
from ww_monitor.analysis.phases import Phase
from ww_monitor.analysis.results import LayerResult, SkippedLayer


def layer(name="fc", alpha=3.0, rank_loss=0, num_evals=100, phase=Phase.HEAVY_TAILED, traps=None, ok=True):
    return LayerResult(name=name, kind="linear", N=200, M=num_evals, Q=2.0, num_evals=num_evals, alpha=alpha,
                       rank_loss=rank_loss, phase=phase, num_traps=traps, fit_ok=ok)


def fired(alerts):
    return sorted((a.rule, a.layer, a.resolved) for a in alerts)


def test_alerts_fire_on_entry_once_and_resolve_on_exit():
    t = AlertTracker(AlertConfig(alpha_high_warmup=0))
    assert fired(t.update([layer(rank_loss=50)], [], step=1, epoch=0)) == [("rank_collapse", "fc", False)]
    for step in range(2, 6):  # stays collapsed: deduplicated
        assert t.update([layer(rank_loss=60)], [], step=step, epoch=0) == []
    out = t.update([layer(rank_loss=0)], [], step=6, epoch=1)
    assert fired(out) == [("rank_collapse", "fc", True)]
    assert t.num_fired == 1


def test_alpha_bounds_and_warmup():
    t = AlertTracker(AlertConfig(alpha_high_warmup=2, alpha_confirm_snapshots=1))
    assert t.update([layer(alpha=7.0)], [], 0, 0) == []
    assert t.update([layer(alpha=7.0)], [], 1, 0) == []
    a = t.update([layer(alpha=7.0)], [], 2, 0)
    assert fired(a) == [("alpha_high", "fc", False)] and a[0].threshold == 6.0 and a[0].value == 7.0
    b = t.update([layer(alpha=1.5)], [], 3, 0)
    assert fired(b) == [("alpha_high", "fc", True), ("alpha_low", "fc", False)]
    # A failed fit says nothing about alpha.
    assert fired(t.update([layer(alpha=math.nan, ok=False)], [], 4, 0)) == [("alpha_low", "fc", True)]


def test_non_finite_traps_and_phase_regression():
    t = AlertTracker()
    t.update([layer(phase=Phase.HEAVY_TAILED)], [], 0, 0)
    out = t.update([], [SkippedLayer("fc", "linear", (4, 4), "non-finite weights (NaN or Inf)")], 1, 0)
    assert fired(out) == [("non_finite", "fc", False)]
    out = t.update([layer(phase=Phase.BULK_PLUS_SPIKES, traps=2)], [], 2, 0)
    # The drop to bulk+spikes is seen once: not confirmed yet, so no phase_regression (issue 10).
    assert fired(out) == [("correlation_traps", "fc", False), ("non_finite", "fc", True)]
    out = t.update([layer(phase=Phase.BULK_PLUS_SPIKES, traps=2)], [], 3, 0)
    assert fired(out) == [("phase_regression", "fc", False)]
    assert t.update([layer(phase=Phase.BULK_PLUS_SPIKES, traps=2)], [], 4, 0) == []
    out = t.update([layer(phase=Phase.RANK_COLLAPSE)], [], 5, 0)
    assert ("correlation_traps", "fc", True) in fired(out)
    assert "phase_regression" not in [a.rule for a in out if not a.resolved]  # still active, not repeated


def test_one_step_phase_jitter_is_not_a_regression():
    t = AlertTracker()
    t.update([layer(phase=Phase.HEAVY_TAILED)], [], 0, 0)
    assert t.update([layer(phase=Phase.BULK_DECAY)], [], 1, 0) == []


def test_tracker_state_round_trip():
    t = AlertTracker(AlertConfig(alpha_high_warmup=0))
    t.update([layer(rank_loss=50, phase=Phase.HEAVY_TAILED)], [], 0, 0)
    u = AlertTracker(AlertConfig(alpha_high_warmup=0))
    u.load_state_dict(t.state_dict())
    assert u.update([layer(rank_loss=50)], [], 1, 0) == []  # already active before the resume
    assert u.best_phase == {"fc": "heavy-tailed"} and u.num_fired == 1


def test_config_validation():
    with pytest.raises(ValueError, match="alpha_low"):
        AlertConfig(alpha_low=5, alpha_high=4)
    with pytest.raises(ValueError, match="unknown alert rule"):
        AlertConfig(enabled=("alpha_lo",))
    with pytest.raises(ValueError, match="unknown action"):
        AlertConfig(actions={"alpha_low": ("email",)})
    with pytest.raises(ValueError, match="rank_loss_fraction"):
        AlertConfig(rank_loss_fraction=0)


def test_drift_floor_degradation_and_convergence():
    r = AlphaDriftRule(floor=2.0)
    assert not r.update(3.0).stop and not r.update(math.nan).stop
    d = r.update(1.9)
    assert d.stop and d.criterion == "floor" and "below the floor 2.0" in d.reason

    r = AlphaDriftRule(floor=None, max_rise=0.5)
    for v in (4.0, 3.5, 3.2, 3.6):
        assert not r.update(v).stop
    d = r.update(3.8)
    assert d.stop and d.criterion == "degradation" and "above its best 3.200" in d.reason

    r = AlphaDriftRule(floor=None, min_delta=0.01, patience=3)
    decisions = [r.update(v).stop for v in (4.0, 3.5, 3.495, 3.49, 3.30, 3.299, 3.298, 3.297)]
    assert decisions == [False, False, False, False, False, False, False, True]

    s = AlphaDriftRule(floor=None, min_delta=0.01, patience=3)
    s.load_state_dict(r.state_dict())
    assert s.still_count == r.still_count and s.best == r.best
    with pytest.raises(ValueError, match="at least one"):
        AlphaDriftRule(floor=None)


def test_one_snapshot_phase_excursion_never_raises_phase_regression():
    """Hysteresis: a phase change counts only once it persists (issue 10)."""
    t = AlertTracker()
    seq = [Phase.HEAVY_TAILED, Phase.HEAVY_TAILED, Phase.BULK_PLUS_SPIKES, Phase.HEAVY_TAILED,
           Phase.RANDOM_LIKE, Phase.HEAVY_TAILED, Phase.BULK_PLUS_SPIKES, Phase.HEAVY_TAILED]
    for step, phase in enumerate(seq):
        assert t.update([layer(phase=phase)], [], step, 0) == [], (step, phase)
    assert t.confirmed_phase == {"fc": "heavy-tailed"}


def test_persistent_phase_regression_fires_once_confirmed():
    t = AlertTracker()
    t.update([layer(phase=Phase.HEAVY_TAILED)], [], 0, 0)
    assert t.update([layer(phase=Phase.BLEEDING_OUT)], [], 1, 0) == []  # seen once: not yet
    out = t.update([layer(phase=Phase.BLEEDING_OUT)], [], 2, 0)
    assert fired(out) == [("phase_regression", "fc", False)]
    assert "heavy-tailed to bleeding-out" in out[0].message and "docs/alerts.md#phase_regression" in out[0].message
    assert t.update([layer(phase=Phase.BLEEDING_OUT)], [], 3, 0) == []  # active: not repeated
    # A single snapshot back at heavy-tailed does not resolve it either.
    assert t.update([layer(phase=Phase.HEAVY_TAILED)], [], 4, 0) == []
    assert fired(t.update([layer(phase=Phase.HEAVY_TAILED)], [], 5, 0)) == [("phase_regression", "fc", True)]


def test_alpha_band_needs_confirmation_and_does_not_flap():
    t = AlertTracker(AlertConfig(alpha_high_warmup=0))
    # Hugging the boundary: never two consecutive snapshots below 2 -> no alert at all.
    for step, a in enumerate((2.01, 1.99, 2.02, 1.98, 2.05, 1.99, 2.3)):
        assert t.update([layer(alpha=a)], [], step, 0) == []
    out = t.update([layer(alpha=1.9996)], [], 10, 0)
    assert out == []
    out = t.update([layer(alpha=1.9996)], [], 11, 0)
    assert fired(out) == [("alpha_low", "fc", False)]
    # Printed with the precision that keeps it below the threshold (never "2.00 < 2").
    assert "alpha=1.9996 < 2 " in out[0].message
    assert t.update([layer(alpha=2.5)], [], 12, 0) == []  # one snapshot back in the band: still active
    assert fired(t.update([layer(alpha=2.5)], [], 13, 0)) == [("alpha_low", "fc", True)]


def test_collapsed_layer_gets_rank_collapse_not_under_trained_advice():
    t = AlertTracker(AlertConfig(alpha_high_warmup=0, alpha_confirm_snapshots=1))
    t.update([layer(alpha=3.0, phase=Phase.HEAVY_TAILED)], [], 0, 0)
    out = t.update([layer(alpha=44.5, rank_loss=40, phase=Phase.RANK_COLLAPSE)], [], 1, 0)
    assert fired(out) == [("rank_collapse", "fc", False)]
    out = t.update([layer(alpha=44.5, rank_loss=40, phase=Phase.RANK_COLLAPSE)], [], 2, 0)
    assert out == []  # no alpha_high ("under-trained?"), no duplicate phase_regression


def test_unreliable_layer_gets_no_alpha_alert_and_alerts_come_in_severity_order():
    t = AlertTracker(AlertConfig(alpha_high_warmup=0, alpha_confirm_snapshots=1))
    small = LayerResult(name="head", kind="linear", N=128, M=10, Q=12.8, num_evals=10, alpha=8.5, fit_ok=True,
                        reliable=False)
    out = t.update([small, layer(alpha=1.5, rank_loss=0), layer("fc2", rank_loss=50)],
                   [SkippedLayer("fc3", "linear", (4, 4), "non-finite weights (NaN or Inf)")], 0, 0)
    assert [(a.rule, a.layer) for a in out] == [("non_finite", "fc3"), ("rank_collapse", "fc2"), ("alpha_low", "fc")]


def test_diverging_layer_gets_diverging_not_rank_collapse_advice():
    def snap(log_spec, rank_loss=0, alpha=3.0):
        r = layer(alpha=alpha, rank_loss=rank_loss)
        r.log_spectral_norm = log_spec
        return [r]

    t = AlertTracker(AlertConfig(alpha_confirm_snapshots=1))
    for step, v in enumerate((0.2, 0.5, 0.9, 3.0)):  # growth below 3 decades per snapshot
        assert t.update(snap(v), [], step, 0) == []
    out = t.update(snap(30.0, rank_loss=95, alpha=1.2), [], 4, 0)  # the learning rate blew up
    assert fired(out) == [("diverging", "fc", False)] and "learning rate" in out[0].message
    assert t.update(snap(30.5, rank_loss=95, alpha=1.2), [], 5, 0) == []  # stays diverging, nothing else
    assert fired(t.update(snap(3.1), [], 6, 0)) == [("diverging", "fc", True)]
