"""A report's :class:`~ww_monitor.outputs.run_data.RunData` from a checkpoint or a model file.

A Lightning checkpoint holding the callback's state gives the history (alpha, phases, table,
alerts replayed with the default :class:`~ww_monitor.monitoring.alerts.AlertConfig`); the final
weights are analysed for the ESDs and their fits. A plain model file gives that one analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..analysis.phases import UNDETERMINED, Phase
from ..errors import WWMonitorError
from .run_data import _FULL_TABLE_COLUMNS, RunData, _choose_layers

__all__ = ["from_weights"]


def from_weights(p: Path, weights_only: bool, esd_layers, max_esd_layers: int, analyze_fn) -> RunData:
    from ..analysis.loading import load_state_dict
    from ..monitoring.history import History

    state = load_state_dict(p, weights_only=weights_only)
    history = History()
    step = None
    raw = _raw_checkpoint(p, weights_only) if p.is_file() and p.suffix.lower() == ".ckpt" else None
    if isinstance(raw, Mapping):
        best = _callback_history_state(raw)
        if best is not None:
            history.load_state_dict(best)
        if isinstance(raw.get("global_step"), int):
            step = raw["global_step"]
    if analyze_fn is None:
        from ..analysis.analyze import analyze

        def analyze_fn(source):
            return analyze(source)

    report = analyze_fn(state)
    if not report.layers and not report.skipped:
        raise WWMonitorError(f"{p}: no weight matrices found")
    data = RunData(source=str(p), source_kind="checkpoint" if len(history) else "model")
    data.final_results = list(report.layers)
    data.skipped = [(s.name, s.reason) for s in report.skipped]
    with_evals = [r for r in report.layers if r.eigenvalues is not None]
    chosen = _choose_layers(
        [r.name for r in with_evals],
        esd_layers,
        max_esd_layers,
        [r.alpha for r in with_evals],
        [r.num_pl_spikes for r in with_evals],
        [float(r.reliable) for r in with_evals],
    )
    by_name = {r.name: r for r in with_evals}
    data.esd_results = [by_name[n] for n in chosen]  # worst first
    if len(history):
        _fill_from_history(data, history)
    else:
        if p.suffix.lower() == ".ckpt":
            data.notes.append(
                "no WeightWatcherCallback state in this checkpoint: showing the analysis of its weights only"
            )
        step = step if step is not None else 0
        data.num_snapshots = 1
        data.phases = (
            [r.name for r in report.layers],
            [step],
            [[r.phase if r.phase is not None else UNDETERMINED] for r in report.layers],
        )
        data.table_step = step
        data.table_columns = _FULL_TABLE_COLUMNS
        data.table = [_row_from_result(r) for r in report.layers]
        data.summary = report.summary()
        data.alerts = _replay_alerts([(step, 0, list(report.layers), list(report.skipped))])
        data.alerts_origin = "computed from these weights with the default alert thresholds"
    return data


def _raw_checkpoint(p: Path, weights_only: bool):
    """The checkpoint's top-level object (memory-mapped where possible: the weights were
    already read and validated by :func:`~ww_monitor.analysis.loading.load_state_dict`)."""
    import torch

    for mmap in (True, False):
        try:
            return torch.load(p, map_location="cpu", weights_only=weights_only, mmap=mmap)
        except Exception:
            continue
    return None


def _callback_history_state(raw: Mapping) -> Mapping | None:
    """The richest ``history`` state among the checkpoint's callback states."""
    best = None
    callbacks = raw.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for state in callbacks.values():
        hist = state.get("history") if isinstance(state, Mapping) else None
        if (
            isinstance(hist, Mapping)
            and isinstance(hist.get("records"), list)
            and (best is None or len(hist["records"]) > len(best["records"]))
        ):
            best = hist
    return best


def _fill_from_history(data: RunData, history) -> None:
    data.num_snapshots = len(history)
    for name in history.layer_names:
        for metric, target in (("alpha", data.alpha), ("reliable", data.reliable)):
            steps, values = [], []
            for rec in history:
                if name in rec.layers:
                    steps.append(rec.step)
                    values.append(rec.metric(metric)[name])
            target[name] = (steps, values)
    for key in ("alpha", "num_layers", "num_unreliable"):
        points = [(rec.step, float(rec.summary[key])) for rec in history if key in rec.summary]
        if points:
            data.summary_series[key] = ([p[0] for p in points], [p[1] for p in points])
    data.phases = history.phases()
    last = history[-1]
    data.table_step = last.step
    latest = _latest_rows(history)
    frozen = any(rec.values[i, rec.columns.index("frozen")] == 1.0 for rec, i in latest.values())
    data.table_columns = _FULL_TABLE_COLUMNS + (("frozen",) if frozen else ())
    for name, (rec, i) in latest.items():
        row: dict = {"layer": name, "kind": rec.kinds[i], "phase": rec.phases[i] or UNDETERMINED}
        for c in _FULL_TABLE_COLUMNS:
            if c in rec.columns:
                row[c] = float(rec.values[i, rec.columns.index(c)])
        if frozen:
            row["frozen"] = rec.step if rec.values[i, rec.columns.index("frozen")] == 1.0 else None
        data.table.append(row)
    data.summary = dict(last.summary)
    data.alerts = _replay_alerts([(r.step, r.epoch, _results_from_record(r), _skipped_from_record(r)) for r in history])
    data.alerts_origin = "replayed over the checkpoint's history with the default alert thresholds"


def _latest_rows(history) -> dict:
    """``{layer: (record, row)}``: every layer of the last snapshot, and each frozen layer the
    monitor carried forward from an earlier one (its last analysis stands), in model order."""
    last = history[-1]
    out = {name: (last, i) for i, name in enumerate(last.layers)}
    j = last.columns.index("frozen")
    decided = set(out)
    for rec in reversed(history.records[:-1]):
        for i, name in enumerate(rec.layers):
            if name not in decided and rec.values[i, j] == 1.0:  # frozen at its latest analysis
                out[name] = (rec, i)
            decided.add(name)
    order = {name: k for k, name in enumerate(history.layer_names)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def _results_from_record(rec) -> list:
    from ..analysis.results import LayerResult

    out = []
    for i, name in enumerate(rec.layers):
        v = dict(zip(rec.columns, rec.values[i].tolist()))
        num_evals = int(v["num_evals"]) if math.isfinite(v.get("num_evals", math.nan)) else 0
        traps = v.get("num_traps", math.nan)
        out.append(
            LayerResult(
                name=name,
                kind=rec.kinds[i],
                N=_int(v.get("N")),
                M=_int(v.get("M")),
                Q=v.get("Q", math.nan),
                num_evals=num_evals,
                alpha=v.get("alpha", math.nan),
                rank_loss=_int(v.get("rank_loss")),
                fit_ok=bool(v.get("fit_ok", 0.0) == 1.0),
                num_traps=int(traps) if math.isfinite(traps) else None,
                num_pl_spikes=_int(v.get("num_pl_spikes")),
                reliable=bool(v.get("reliable", 1.0) != 0.0),
                log_spectral_norm=v.get("log_spectral_norm", math.nan),
                phase=Phase(rec.phases[i]) if rec.phases[i] is not None else None,
            )
        )
    return out


def _skipped_from_record(rec) -> list:
    from ..analysis.results import SkippedLayer

    return [SkippedLayer(name, "", (), reason) for name, reason in rec.skipped]


def _int(v) -> int:
    return int(v) if v is not None and math.isfinite(v) else 0


def _replay_alerts(snapshots) -> list[dict]:
    """The default alert rules replayed over ``(step, epoch, results, skipped)`` snapshots: one
    ``{"step", "text"}`` entry per snapshot with alerts, the markdown TensorBoard would show."""
    from ..monitoring.alerts import AlertTracker
    from .alert_text import alerts_markdown

    tracker = AlertTracker()
    out = []
    for step, epoch, results, skipped in snapshots:
        alerts = tracker.update(results, skipped, step=step, epoch=epoch)
        if alerts:
            text = alerts_markdown(
                alerts, step, len(tracker.active), [r.name for r in results], {r.name: r.num_pl_spikes for r in results}
            )
            out.append({"step": step, "text": text})
    return out


def _row_from_result(r) -> dict:
    d = r.to_dict()
    row = {"layer": r.name}
    row.update({c: d.get(c) for c in _FULL_TABLE_COLUMNS})
    if row.get("phase") is None:
        row["phase"] = UNDETERMINED
    return row
