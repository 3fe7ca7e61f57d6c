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


#: A proposed rule, evaluated here by replay only (it is not in the package): ``shrinking`` fires
#: when a layer's largest eigenvalue fell more than this many decades below the largest it ever
#: had (its spectral norm shrank > ~30x): the weights are decaying to zero, as under excessive
#: weight decay. The mirror image of ``diverging`` (which watches jumps up); needed because
#: once the eigenvalues fall under the fit's absolute floor the power-law fit fails and no
#: alpha rule can speak.
SHRINK_DECADES = 3.0


def proposed_tracker(config=None, shrinking: bool = True):
    """An ``AlertTracker`` with the proposed ``shrinking`` rule (:data:`SHRINK_DECADES`) added,
    which ``AlertConfig`` cannot express."""
    from dataclasses import replace

    from ww_monitor.monitoring.alerts import AlertConfig, AlertTracker

    class ProposedTracker(AlertTracker):
        def __init__(self, cfg):
            super().__init__(cfg)
            if shrinking:
                object.__setattr__(self.config, "enabled", (*self.config.enabled, "shrinking"))
            self.norm_max: dict[str, float] = {}

        def _conditions(self, layers, skipped):
            yield from super()._conditions(layers, skipped)
            for l in layers if shrinking else ():
                if not math.isfinite(l.log_spectral_norm):
                    continue
                top = self.norm_max[l.name] = max(self.norm_max.get(l.name, -math.inf), l.log_spectral_norm)
                if top - l.log_spectral_norm > SHRINK_DECADES:
                    detail = f"lambda_max fell {top - l.log_spectral_norm:.1f} decades below its peak"
                    yield ("shrinking", l.name, top - l.log_spectral_norm, SHRINK_DECADES, f"{l.name}: {detail}",
                           detail)

    return ProposedTracker(replace(config or AlertConfig()))


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
            d = dict(zip(FIELDS, row))
            d["phase"] = None if d["phase"] is None else Phase(d["phase"])
            layers.append(LayerResult(**d))
        skipped = [SkippedLayer(name, "", (), reason) for name, reason in snap["skipped"]]
        for a in tracker.update(layers, skipped, snap["step"], snap["epoch"]):
            alerts.append({"rule": a.rule, "layer": a.layer, "step": a.step, "epoch": a.epoch, "value": a.value,
                           "resolved": a.resolved})
    return alerts
