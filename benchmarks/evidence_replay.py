"""Replay the alert rules on a run's recorded per-layer history, under any ``AlertConfig``.

The monitor is read-only (the training is the same with or without it, and with any alert
thresholds), and ``AlertTracker`` is a pure function of the snapshots' layer results. So
the alerts a different configuration *would* have raised on the same runs follow from the
recorded history, with no retraining: :func:`replay`. With the default configuration the replay
must reproduce the live alerts exactly (``tests/test_evidence.py`` checks it). ``bench_evidence``
uses it to put numbers on the defaults, the previous defaults and each candidate change side by side.
"""

from __future__ import annotations

import math

#: The LayerResult fields the alert rules read, in the order they are recorded.
FIELDS = ("name", "kind", "N", "M", "Q", "num_evals", "log_spectral_norm", "rank_loss", "alpha", "fit_ok", "reliable",
          "num_traps", "phase")
#: Further LayerResult fields recorded after :data:`FIELDS` (numbers; ``None`` where not computed),
#: so that candidate rules reading the fit's tail size and standard error, the Marchenko-Pastur
#: diagnostics or the ESD's movement can be replayed too. Records made before they were added
#: replay with the LayerResult defaults for them.
EXTRA = ("num_pl_spikes", "sigma", "xmin", "D", "lambda_max", "stable_rank", "entropy", "lambda_plus", "mp_ks",
         "num_spikes", "mp_softrank", "esd_shift", "distance_from_init")
_INT_EXTRA = {"num_pl_spikes", "num_spikes"}


def record_history(history) -> list[dict]:
    """Per snapshot of a ``History``: step, epoch, the alert-relevant fields of every analysed
    layer, and the skipped layers with their reasons (JSON-ready)."""
    out = []
    for rec in history:
        cols = {c: j for j, c in enumerate(rec.columns)}
        rows = []
        for i, (name, kind) in enumerate(zip(rec.layers, rec.kinds)):
            v = rec.values[i]
            traps = v[cols["num_traps"]]
            rows.append([name, kind, int(v[cols["N"]]), int(v[cols["M"]]), float(v[cols["Q"]]),
                         int(v[cols["num_evals"]]), float(v[cols["log_spectral_norm"]]), int(v[cols["rank_loss"]]),
                         float(v[cols["alpha"]]), bool(v[cols["fit_ok"]]), bool(v[cols["reliable"]]),
                         None if math.isnan(traps) else int(traps), rec.phases[i],
                         *(_number(v[cols[c]], c in _INT_EXTRA) if c in cols else None for c in EXTRA)])
        out.append({"step": rec.step, "epoch": rec.epoch, "layers": rows, "skipped": [list(s) for s in rec.skipped]})
    return out


def _number(x, integer: bool):
    x = float(x)
    return None if math.isnan(x) else int(x) if integer else x


def candidate_tracker(config=None, low_phases=None):
    """An ``AlertTracker`` with a candidate change that ``AlertConfig`` cannot express, evaluated
    here by replay only: with ``low_phases`` (phase values), a layer counts for ``alpha_low`` only
    when its phase at the snapshot is one of them (e.g. ``("heavy-tailed",)``: alpha < 2 read as
    "very heavy-tailed" only where the phase classifier finds no Marchenko-Pastur bulk left)."""
    from ww_monitor.analysis.phases import Phase
    from ww_monitor.monitoring.alerts import AlertTracker

    class CandidateTracker(AlertTracker):
        def _band_layer(self, l, band):
            outside = len(band["alpha_low"][1])
            super()._band_layer(l, band)
            phase = None if l.phase is None else Phase(l.phase).value
            if low_phases is not None and len(band["alpha_low"][1]) > outside and phase not in low_phases:
                band["alpha_low"][1].pop()  # still read by the rule, no longer outside the band

    return CandidateTracker(config)


def replay(layer_history: list[dict], config=None, tracker=None) -> list[dict]:
    """The alerts ``AlertTracker(config)`` (or the given ``tracker``) raises and resolves on the
    recorded snapshots, as the dicts ``evidence_cases.train`` records for live alerts."""
    from ww_monitor.analysis.phases import Phase
    from ww_monitor.analysis.results import LayerResult, SkippedLayer
    from ww_monitor.monitoring.alerts import AlertTracker

    tracker = tracker if tracker is not None else AlertTracker(config)
    alerts = []
    for snap in layer_history:
        layers = []
        for row in snap["layers"]:
            d = dict(zip(FIELDS + EXTRA, row))
            d.update({k: 0 if k in _INT_EXTRA else math.nan for k in EXTRA[:len(row) - len(FIELDS)]
                      if d[k] is None and k not in ("esd_shift", "distance_from_init")})
            d["phase"] = None if d["phase"] is None else Phase(d["phase"])
            layers.append(LayerResult(**d))
        skipped = [SkippedLayer(name, "", (), reason) for name, reason in snap["skipped"]]
        for a in tracker.update(layers, skipped, snap["step"], snap["epoch"]):
            alerts.append({"rule": a.rule, "layer": a.layer, "step": a.step, "epoch": a.epoch, "value": a.value,
                           "resolved": a.resolved})
    return alerts
