"""Replay the alert rules on a run's recorded per-layer history, under any ``AlertConfig``.

The monitor is read-only (the training is the same with or without it, and with any alert
thresholds), and ``AlertTracker`` is a pure function of the snapshots' layer results. So
the alerts a different configuration *would* have raised on the same runs follow from the
recorded history, with no retraining: :func:`replay`. With the default configuration the replay
must reproduce the live alerts exactly (``tests/test_evidence.py`` checks it). ``bench_evidence``
uses it to put numbers before and after on a proposed change of a rule or its default.
"""

from __future__ import annotations

import math

#: The LayerResult fields the alert rules read, in the order they are recorded.
FIELDS = ("name", "kind", "N", "M", "Q", "num_evals", "log_spectral_norm", "rank_loss", "alpha", "fit_ok", "reliable",
          "num_traps", "phase")


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
                         None if math.isnan(traps) else int(traps), rec.phases[i]])
        out.append({"step": rec.step, "epoch": rec.epoch, "layers": rows, "skipped": [list(s) for s in rec.skipped]})
    return out


def replay(layer_history: list[dict], config=None) -> list[dict]:
    """The alerts ``AlertTracker(config)`` raises (and resolves) on the recorded snapshots, as
    the dicts ``evidence_cases.train`` records for live alerts."""
    from ww_monitor.analysis.phases import Phase
    from ww_monitor.analysis.results import LayerResult, SkippedLayer
    from ww_monitor.monitoring.alerts import AlertTracker

    tracker = AlertTracker(config)
    alerts = []
    for snap in layer_history:
        layers = []
        for row in snap["layers"]:
            d = dict(zip(FIELDS, row))
            d["phase"] = None if d["phase"] is None else Phase(d["phase"])
            layers.append(LayerResult(**d))
        skipped = [SkippedLayer(name, "", (), reason) for name, reason in snap["skipped"]]
        for a in tracker.update(layers, skipped, snap["step"], snap["epoch"]):
            alerts.append({"rule": a.rule, "layer": a.layer, "step": a.step, "epoch": a.epoch, "value": a.value,
                           "resolved": a.resolved})
    return alerts
