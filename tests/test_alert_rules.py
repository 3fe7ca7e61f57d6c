"""Alert rules and the alpha-drift state machine, on constructed snapshot results."""

import math

import pytest

from ww_monitor.analysis.phases import Phase
from ww_monitor.analysis.results import LayerResult, SkippedLayer
from ww_monitor.monitoring.alerts import AlertConfig, AlertTracker
from ww_monitor.monitoring.early_stopping import AlphaDriftRule


def layer(name="fc", alpha=3.0, rank_loss=0, num_evals=100, phase=Phase.HEAVY_TAILED, traps=None, ok=True, tail=100):
    """A layer whose fit rests on ``tail`` eigenvalues: standard error (alpha - 1) / sqrt(tail)."""
    return LayerResult(name=name, kind="linear", N=200, M=num_evals, Q=2.0, num_evals=num_evals, alpha=alpha,
                       rank_loss=rank_loss, phase=phase, num_traps=traps, fit_ok=ok, num_pl_spikes=tail)


#: The alpha band rules as they were before the per-layer margin and the model-level share.
PER_LAYER_BAND = dict(alpha_low_sigmas=0, alpha_low_min_share=0, alpha_high_min_share=0)


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
    t = AlertTracker(AlertConfig(alpha_high_warmup=0, **PER_LAYER_BAND))  # the hysteresis alone
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


def _with_norm(log_spec, **kw):
    r = layer(**kw)
    r.log_spectral_norm = log_spec
    return [r]


def test_shrinking_layer_gets_shrinking_not_alpha_or_phase_advice():
    t = AlertTracker(AlertConfig(alpha_confirm_snapshots=1))
    for step, v in enumerate((1.0, 1.4, 0.5, -1.0, -1.59)):  # up to 2.99 decades below the peak 1.4
        assert t.update(_with_norm(v), [], step, 0) == [], (step, v)
    # 3.1 decades below the peak; the spectrum's shape changed too (alpha < 2, a phase regression):
    # consequences of the same decay, so only shrinking speaks.
    out = t.update(_with_norm(-1.7, alpha=1.5, phase=Phase.BULK_PLUS_SPIKES), [], 5, 0)
    assert fired(out) == [("shrinking", "fc", False)]
    assert out[0].value == pytest.approx(3.1) and out[0].threshold == 3.0
    assert "weight decay" in out[0].message and "docs/alerts.md#shrinking" in out[0].message
    assert "1.26e+03x" in out[0].detail and "(log10 -3.10 < -3)" in out[0].detail
    assert t.update(_with_norm(-2.5, alpha=1.5, phase=Phase.BULK_PLUS_SPIKES), [], 6, 0) == []  # still shrinking
    # Back within 3 decades of the peak: shrinking resolves and the other rules read the layer
    # again (its phase stayed behind the heavy-tailed one it had reached).
    out = t.update(_with_norm(-1.0, phase=Phase.BULK_PLUS_SPIKES), [], 7, 0)
    assert fired(out) == [("phase_regression", "fc", False), ("shrinking", "fc", True)]


def test_shrinking_ignores_a_divergence_peak_and_can_be_disabled():
    t = AlertTracker(AlertConfig(alpha_confirm_snapshots=1))
    t.update(_with_norm(0.5), [], 0, 0)
    assert fired(t.update(_with_norm(30.0), [], 1, 0)) == [("diverging", "fc", False)]
    # Back to normal: the divergence resolves, and its peak is not the reference of a "fall".
    assert fired(t.update(_with_norm(0.4), [], 2, 0)) == [("diverging", "fc", True)]
    assert t.norm_peak == {"fc": 0.5}
    off = AlertTracker(AlertConfig(enabled=tuple(r for r in AlertConfig().enabled if r != "shrinking"),
                                   alpha_confirm_snapshots=1))
    off.update(_with_norm(1.0), [], 0, 0)
    # With the rule off, the other rules read the layer as usual.
    assert fired(off.update(_with_norm(-5.0, alpha=1.5), [], 1, 0)) == [("alpha_low", "fc", False)]


def test_shrinking_state_round_trip_and_validation():
    t = AlertTracker()
    t.update(_with_norm(2.0), [], 0, 0)
    u = AlertTracker()
    u.load_state_dict(t.state_dict())
    assert u.norm_peak == {"fc": 2.0}
    assert fired(u.update(_with_norm(-1.5), [], 1, 0)) == [("shrinking", "fc", False)]
    with pytest.raises(ValueError, match="shrinking_decades"):
        AlertConfig(shrinking_decades=0)


def test_alpha_low_needs_a_fit_that_resolves_it():
    """alpha + 2 sigma < 2, sigma = (alpha - 1) / sqrt(tail): 1.9 on 25 tail points (sigma 0.18)
    is not below 2; on 2500 (sigma 0.018) it is; without the margin both are."""
    def run(tail, **kw):
        t = AlertTracker(AlertConfig(alpha_confirm_snapshots=1, **kw))
        return fired(t.update([layer(alpha=1.9, tail=tail)], [], 0, 0))

    assert run(25) == []
    assert run(2500) == [("alpha_low", "fc", False)]
    assert run(25, alpha_low_sigmas=0) == [("alpha_low", "fc", False)]
    t = AlertTracker(AlertConfig(alpha_confirm_snapshots=1))
    out = t.update([layer(alpha=1.9, tail=2500)], [], 0, 0)
    assert out[0].message.startswith("alpha=1.90 < 2 (standard error 0.02) in fc; alpha < 2 (by 2 standard errors) "
                                      "in the one layer it reads: very heavy-tailed")
    assert out[0].headline == "alpha < 2 (by 2 standard errors)"


def test_alpha_low_fires_when_more_than_a_fifth_of_the_layers_it_reads_are_below():
    def snap(low):  # 10 layers the rule reads (+ a query projection it skips), `low` of them at 1.5
        return ([layer(f"l{i}", alpha=1.5 if i < low else 3.0) for i in range(10)]
                + [layer("attn.q_proj", alpha=1.5)])

    t = AlertTracker()
    for step in range(3):  # 2 of 10 = 20%, not more: what well-trained models show
        assert t.update(snap(2), [], step, 0) == []
    assert t.update(snap(3), [], 3, 0) == []  # 30%: confirmed on the next snapshot
    out = t.update(snap(3), [], 4, 0)
    assert fired(out) == [("alpha_low", f"l{i}", False) for i in range(3)]
    assert "; alpha < 2 (by 2 standard errors) in 3 of the 10 layers it reads:" in out[0].message
    # The share falls back to 20%: every layer of the finding resolves (after as many snapshots).
    assert t.update(snap(2), [], 5, 0) == []
    assert fired(t.update(snap(2), [], 6, 0)) == [("alpha_low", f"l{i}", True) for i in range(3)]
    old = AlertTracker(AlertConfig(alpha_confirm_snapshots=1, **PER_LAYER_BAND))
    assert fired(old.update(snap(1), [], 0, 0)) == [("alpha_low", "l0", False)]  # the former behaviour


def test_alpha_high_fires_when_most_of_the_model_is_above_6_after_the_warmup():
    def snap(high):  # 4 layers, `high` of them at alpha 8 (a thin tail: sigma 0.7 on 100 points)
        return [layer(f"l{i}", alpha=8.0 if i < high else 3.0) for i in range(4)]

    t = AlertTracker(AlertConfig(alpha_high_warmup=1, alpha_confirm_snapshots=1))
    assert t.update(snap(4), [], 0, 0) == []  # warm-up
    assert t.update(snap(2), [], 1, 0) == []  # half the model: not most of it
    out = t.update(snap(3), [], 2, 0)
    assert fired(out) == [("alpha_high", f"l{i}", False) for i in range(3)]
    assert "; alpha > 6 in 3 of the 4 layers it reads:" in out[0].message  # no margin asked: none named
    margin = AlertTracker(AlertConfig(alpha_high_warmup=0, alpha_confirm_snapshots=1, alpha_high_sigmas=3))
    assert margin.update(snap(4), [], 0, 0) == []  # 8 - 3 x 0.7 = 5.9: not resolved above 6


@pytest.mark.parametrize("kwargs, name", [
    (dict(alpha_low_sigmas=-1), "alpha_low_sigmas"), (dict(alpha_high_sigmas=math.inf), "alpha_high_sigmas"),
    (dict(alpha_low_min_share=1.0), "alpha_low_min_share"), (dict(alpha_high_min_share=-0.1), "alpha_high_min_share"),
    (dict(alpha_high_min_share="half"), "alpha_high_min_share"),
])
def test_band_settings_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"AlertConfig: `{name}`"):
        AlertConfig(**kwargs)
