"""Offline HTML report of a monitored training run (``ww-monitor report LOGDIR_OR_CKPT``).

Sources, in order of preference for the over-training views:

* a **TensorBoard log folder** (or one event file) written through a ``TensorBoardLogger`` with
  :class:`~ww_monitor.WeightWatcherCallback` attached: alpha over training from the scalars
  ``ww/alpha/<layer>``, the phase heatmap from ``ww/phase/<layer>`` (ordinal of
  :class:`~ww_monitor.Phase`), the ESD evolution from the histograms ``ww/esd/<layer>``, alerts
  from the text ``ww/alerts`` and the per-layer table at the last snapshot;
* a **Lightning checkpoint** (``.ckpt``) holding the callback's state: the same views from the
  stored :class:`~ww_monitor.monitoring.history.History`, alerts replayed over that history with the default
  :class:`~ww_monitor.monitoring.alerts.AlertConfig`, and ESDs with their fits from an analysis of the
  checkpoint's final weights;
* a **plain model file** (state dict, ``.safetensors``, or a folder of them): the analysis of
  that one model.

:func:`load_run` gathers a :class:`RunData`; :func:`render_html` turns it into one
self-contained HTML page (figures embedded as base64 PNG, no external assets);
:func:`write_report` does both. Nothing here prints; user errors raise
:class:`~ww_monitor.errors.WWMonitorError`. Figures use matplotlib's object-oriented API only.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import WWMonitorError
from ..analysis.phases import UNDETERMINED, Phase
from .tensorboard_writer import MAX_LAYERS_PER_CHART

__all__ = ["RunData", "EsdSnapshot", "load_run", "render_html", "write_report", "write_figures"]

#: Per-layer TensorBoard metrics shown in the table (the callback's ``LAYER_METRICS``).
_TB_TABLE_METRICS = ("num_evals", "num_pl_spikes", "reliable", "alpha", "alpha_weighted", "log_norm",
                     "log_spectral_norm", "stable_rank", "rank_loss", "num_spikes")
#: Columns of the table when the full per-layer results are known (checkpoint or model).
_FULL_TABLE_COLUMNS = ("kind", "N", "M", "num_evals", "num_pl_spikes", "reliable", "alpha", "alpha_weighted", "D",
                       "log_norm",
                       "log_spectral_norm", "stable_rank", "rank_loss", "num_spikes", "phase")
_SIZE_GUIDANCE = {k: 0 for k in ("compressedHistograms", "images", "audio", "scalars", "histograms", "tensors")}
_MAX_TB_FIGURES = 12
#: Scalars Lightning logs that are not the run's metrics (the epoch counter, the hparams placeholder).
_NOT_TRAINING_SCALARS = ("epoch", "hp_metric")
#: Layers named in the report's "farthest outside the band" line.
_WORST_LISTED = 5


def _alpha_grid(data: "RunData") -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """``(layers, steps, alpha[layer, step], reliable[layer, step])`` from the per-layer series
    (NaN alpha where a layer has no value at a step; reliable where not logged)."""
    names = list(data.alpha)
    steps = sorted({s for st, _ in data.alpha.values() for s in st})
    col = {s: j for j, s in enumerate(steps)}
    values = np.full((len(names), len(steps)), np.nan)
    reliable = np.ones((len(names), len(steps)), dtype=bool)
    for i, name in enumerate(names):
        for s, v in zip(*data.alpha[name]):
            values[i, col[s]] = v
        for s, v in zip(*data.reliable.get(name, ([], []))):
            if s in col and math.isfinite(v):
                reliable[i, col[s]] = v > 0.5
    return names, steps, values, reliable


@dataclass
class EsdSnapshot:
    """One logged ESD histogram of log10(lambda): bin edges (log10 units), counts, total count."""

    step: int
    edges: np.ndarray
    counts: np.ndarray
    total: float


@dataclass
class RunData:
    """Everything the report shows, independent of where it came from."""

    source: str
    source_kind: str  # "tensorboard" | "checkpoint" | "model"
    alpha: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    phases: tuple[list[str], list[int], list[list]] | None = None
    esd_evolution: dict[str, list[EsdSnapshot]] = field(default_factory=dict)
    esd_results: list = field(default_factory=list)  # LayerResult with eigenvalues (final weights)
    final_results: list = field(default_factory=list)  # every LayerResult of the final weights
    alerts: list[dict] = field(default_factory=list)  # {"step", "text"} or {"step", "rule", "layer", ...}
    alerts_origin: str = ""
    table_columns: tuple[str, ...] = ()
    table: list[dict] = field(default_factory=list)  # one row per layer, key "layer" plus columns
    table_step: int | None = None
    summary: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    logged_figures: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # tag -> (step, PNG bytes)
    num_snapshots: int = 0
    notes: list[str] = field(default_factory=list)
    reliable: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # 1/0 per layer and step
    summary_series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # ww/summary/* over steps
    training_scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # the run's own
    runs: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # run -> mean alpha over steps
    esd_snapshots_total: int = 0  # ESD histograms logged per layer (some may be left out of the figures)


# --------------------------------------------------------------------------- loading
def load_run(
    path: str | os.PathLike,
    *,
    weights_only: bool = True,
    esd_layers: Sequence[str] | None = None,
    max_esd_layers: int = 4,
    max_esd_snapshots: int = 8,
    analyze_fn: Callable[[Mapping], object] | None = None,
) -> RunData:
    """Read a TensorBoard log folder / event file, a checkpoint or a model file into a :class:`RunData`.

    Args:
        path: log folder, event file, ``.ckpt`` with the callback's state, model file or folder.
        weights_only: load checkpoints with PyTorch's safe unpickler (default).
        esd_layers: regexes choosing the layers of the ESD section (default: ``max_esd_layers``
            layers spread over the depth).
        max_esd_layers: most layers in the ESD section.
        max_esd_snapshots: most snapshots per ESD evolution heatmap (spread evenly, first
            and last always kept).
        analyze_fn: ``state_dict -> Report`` used for checkpoints and model files (default:
            :func:`ww_monitor.analyze`, keeping eigenvalues); the CLI passes one with a progress bar.
    """
    for pattern in esd_layers or ():
        try:
            re.compile(pattern)
        except re.error as err:
            raise WWMonitorError(f"invalid layer regex {pattern!r}: {err}") from None
    p = Path(path)
    if not p.exists():
        raise WWMonitorError(f"{p}: no such file or directory")
    if p.is_dir():
        if _event_files(p):
            return _from_tensorboard(p, esd_layers, max_esd_layers, max_esd_snapshots)
        from ..analysis.loading import SUPPORTED_SUFFIXES

        if not any(f.is_file() and f.suffix in SUPPORTED_SUFFIXES for f in p.iterdir()):
            raise WWMonitorError(f"{p}: holds no TensorBoard event files and no checkpoint files")
    elif "tfevents" in p.name:
        return _from_tensorboard(p, esd_layers, max_esd_layers, max_esd_snapshots)
    return _from_weights(p, weights_only, esd_layers, max_esd_layers, analyze_fn)


def _event_files(folder: Path) -> list[Path]:
    out = []
    for root, _dirs, files in os.walk(folder):
        out.extend(Path(root) / f for f in files if "tfevents" in f)
    return sorted(out)


def _accumulator(target: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(target), size_guidance=dict(_SIZE_GUIDANCE))
    try:
        acc.Reload()
    except Exception as err:  # corrupt event file
        raise WWMonitorError(f"{target}: could not read TensorBoard events ({type(err).__name__}: {err})") from None
    return acc


def _ww_tags(acc) -> list[str]:
    tags = acc.Tags()
    kinds = ("scalars", "histograms", "tensors", "images")
    return [t for kind in kinds for t in tags.get(kind, []) if t.startswith("ww/")]


def _latest_wall_time(acc) -> float:
    latest = 0.0
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("ww/"):
            events = acc.Scalars(tag)
            if events:
                latest = max(latest, events[-1].wall_time)
    return latest


def _from_tensorboard(target: Path, esd_layers, max_esd_layers: int, max_esd_snapshots: int) -> RunData:
    runs = sorted({f.parent for f in _event_files(target)}) if target.is_dir() else [target]
    found = []
    for run in runs:
        acc = _accumulator(run)
        if _ww_tags(acc):
            found.append((run, acc))
    if not found:
        raise WWMonitorError(f"{target}: no ww/ tags in the TensorBoard event files (was WeightWatcherCallback "
                             "attached to a Trainer with a TensorBoardLogger writing there?)")
    found.sort(key=lambda ra: _latest_wall_time(ra[1]))
    run, acc = found[-1]
    data = RunData(source=str(run), source_kind="tensorboard")
    if len(found) > 1:
        others = ", ".join(str(r) for r, _ in found[:-1])
        data.notes.append(f"{len(found)} runs with ww/ tags under {target}; the detailed sections show the most "
                          f"recent ({run}), the section Runs compares them all. Point the report at one run folder "
                          f"for the details of another: {others}")
        for r, a in found:
            if "ww/summary/alpha" in a.Tags().get("scalars", []):
                name = str(r.relative_to(target)) if target.is_dir() and r != target else r.name
                data.runs[name] = _dedupe_steps(a.Scalars("ww/summary/alpha"))
    tags = acc.Tags()
    scalars = {t: _dedupe_steps(acc.Scalars(t)) for t in tags.get("scalars", []) if t.startswith("ww/")}
    # the run's own metrics (losses, accuracies) from the same event files, shown beside alpha
    data.training_scalars = {t: _dedupe_steps(acc.Scalars(t)) for t in tags.get("scalars", [])
                             if not t.startswith("ww") and t not in _NOT_TRAINING_SCALARS}
    data.summary_series = {t[len("ww/summary/"):]: v for t, v in scalars.items() if t.startswith("ww/summary/")}
    data.reliable = {t[len("ww/reliable/"):]: v for t, v in scalars.items() if t.startswith("ww/reliable/")}

    layers = [t[len("ww/alpha/"):] for t in scalars if t.startswith("ww/alpha/")]
    for layer in layers:
        steps, values = scalars[f"ww/alpha/{layer}"]
        data.alpha[layer] = (steps, values)
    all_steps = sorted({s for t, (steps, _) in scalars.items() for s in steps})
    data.num_snapshots = len(all_steps)

    phase_layers = [t[len("ww/phase/"):] for t in scalars if t.startswith("ww/phase/")]
    if phase_layers:
        order = list(Phase)
        phase_steps = sorted({s for layer in phase_layers for s in scalars[f"ww/phase/{layer}"][0]})
        grid = []
        for layer in phase_layers:
            by_step = dict(zip(*scalars[f"ww/phase/{layer}"]))
            row = []
            for s in phase_steps:
                v = by_step.get(s)
                ok = v is not None and math.isfinite(v) and 0 <= round(v) < len(order)
                # A negative ordinal: analysed, but too few eigenvalues for a phase.
                undetermined = v is not None and math.isfinite(v) and round(v) < 0
                row.append(order[int(round(v))] if ok else (UNDETERMINED if undetermined else None))
            grid.append(row)
        data.phases = (phase_layers, phase_steps, grid)

    hist_layers = [t[len("ww/esd/"):] for t in tags.get("histograms", []) if t.startswith("ww/esd/")]
    for layer in _choose_layers(hist_layers, esd_layers, max_esd_layers):
        events = _dedupe_events(acc.Histograms(f"ww/esd/{layer}"))
        data.esd_snapshots_total = max(data.esd_snapshots_total, len(events))
        snaps = [_esd_from_histogram(e.step, e.histogram_value) for e in _spread(events, max_esd_snapshots)]
        data.esd_evolution[layer] = [s for s in snaps if s is not None]

    for tag in tags.get("tensors", []):
        if tag == "ww/alerts" or tag.startswith("ww/alerts/"):
            for e in _dedupe_events(acc.Tensors(tag)):
                text = _decode_text(e.tensor_proto)
                if text:
                    data.alerts.append({"step": e.step, "text": text})
    if data.alerts:
        data.alerts_origin = "TensorBoard text ww/alerts"

    if all_steps:
        last = all_steps[-1]
        data.table_step = last
        table_layers = list(dict.fromkeys(layers + phase_layers))
        data.table_columns = _TB_TABLE_METRICS + ("phase",)
        for layer in table_layers:
            row: dict = {"layer": layer}
            for m in _TB_TABLE_METRICS:
                row[m] = dict(zip(*scalars.get(f"ww/{m}/{layer}", ([], [])))).get(last, math.nan)
            if data.phases is not None and layer in data.phases[0] and last in data.phases[1]:
                p = data.phases[2][data.phases[0].index(layer)][data.phases[1].index(last)]
                row["phase"] = getattr(p, "value", p)
            data.table.append(row)
        for t, (steps, values) in scalars.items():
            if t.startswith("ww/summary/") and steps:
                by_step = dict(zip(steps, values))
                data.summary[t[len("ww/summary/"):]] = by_step.get(last, values[-1])

    for tag in tags.get("images", []):
        if tag.startswith("ww/plots/") and len(data.logged_figures) < _MAX_TB_FIGURES:
            events = acc.Images(tag)
            if events:
                e = max(events, key=lambda ev: (ev.step, ev.wall_time))
                data.logged_figures[tag] = (e.step, bytes(e.encoded_image_string))
    return data


def _dedupe_events(events) -> list:
    """One event per step (the latest written, e.g. after a resume), in step order."""
    by_step: dict[int, object] = {}
    for e in sorted(events, key=lambda ev: ev.wall_time):
        by_step[e.step] = e
    return [by_step[s] for s in sorted(by_step)]


def _dedupe_steps(events) -> tuple[list[int], list[float]]:
    events = _dedupe_events(events)
    return [e.step for e in events], [float(e.value) for e in events]


def _spread(items: list, n: int) -> list:
    if n <= 0 or len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def _choose_layers(names: Sequence[str], patterns, max_layers: int) -> list[str]:
    from .tensorboard_writer import choose_figure_layers

    return choose_figure_layers(list(names), list(patterns) if patterns else None, max_layers)


def _esd_from_histogram(step: int, h) -> EsdSnapshot | None:
    """Bucket edges and counts of a TensorBoard histogram (bucket ``i`` spans
    ``(limit[i-1], limit[i]]``, clipped to the recorded ``[min, max]``)."""
    counts = np.asarray(h.bucket, dtype=np.float64)
    limits = np.asarray(h.bucket_limit, dtype=np.float64)
    if counts.size == 0 or not counts.sum() > 0 or not (math.isfinite(h.min) and math.isfinite(h.max)):
        return None
    edges = np.concatenate([[h.min], limits])
    edges = np.maximum.accumulate(np.clip(edges, h.min, h.max))
    return EsdSnapshot(step=int(step), edges=edges, counts=counts, total=float(counts.sum()))


def _decode_text(tensor_proto) -> str:
    from tensorboard.util import tensor_util

    try:
        arr = tensor_util.make_ndarray(tensor_proto)
    except Exception:
        return ""
    parts = []
    for item in np.asarray(arr, dtype=object).ravel():
        parts.append(item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item))
    return "\n".join(parts).strip()


def _from_weights(p: Path, weights_only: bool, esd_layers, max_esd_layers: int, analyze_fn) -> RunData:
    from ..monitoring.history import History
    from ..analysis.loading import load_state_dict

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
    chosen = set(_choose_layers([r.name for r in report.layers if r.eigenvalues is not None], esd_layers,
                                max_esd_layers))
    data.esd_results = [r for r in report.layers if r.name in chosen]
    if len(history):
        _fill_from_history(data, history)
    else:
        if p.suffix.lower() == ".ckpt":
            data.notes.append("no WeightWatcherCallback state in this checkpoint: showing the analysis of its "
                              "weights only")
        step = step if step is not None else 0
        data.num_snapshots = 1
        data.phases = ([r.name for r in report.layers], [step],
                       [[r.phase if r.phase is not None else UNDETERMINED] for r in report.layers])
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


def _callback_history_state(raw: Mapping) -> dict | None:
    """The richest ``history`` state among the checkpoint's callback states."""
    best = None
    callbacks = raw.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for state in callbacks.values():
        hist = state.get("history") if isinstance(state, Mapping) else None
        if isinstance(hist, Mapping) and isinstance(hist.get("records"), list):
            if best is None or len(hist["records"]) > len(best["records"]):
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
    data.table_columns = _FULL_TABLE_COLUMNS
    for i, name in enumerate(last.layers):
        row: dict = {"layer": name, "kind": last.kinds[i], "phase": last.phases[i] or UNDETERMINED}
        for c in _FULL_TABLE_COLUMNS:
            if c in last.columns:
                row[c] = float(last.values[i, last.columns.index(c)])
        data.table.append(row)
    data.summary = dict(last.summary)
    data.alerts = _replay_alerts([(r.step, r.epoch, _results_from_record(r), _skipped_from_record(r)) for r in history])
    data.alerts_origin = "replayed over the checkpoint's history with the default alert thresholds"


def _results_from_record(rec) -> list:
    from ..analysis.results import LayerResult

    out = []
    for i, name in enumerate(rec.layers):
        v = dict(zip(rec.columns, rec.values[i].tolist()))
        num_evals = int(v["num_evals"]) if math.isfinite(v.get("num_evals", math.nan)) else 0
        traps = v.get("num_traps", math.nan)
        out.append(LayerResult(
            name=name, kind=rec.kinds[i], N=_int(v.get("N")), M=_int(v.get("M")), Q=v.get("Q", math.nan),
            num_evals=num_evals, alpha=v.get("alpha", math.nan), rank_loss=_int(v.get("rank_loss")),
            fit_ok=bool(v.get("fit_ok", 0.0) == 1.0), num_traps=int(traps) if math.isfinite(traps) else None,
            num_pl_spikes=_int(v.get("num_pl_spikes")), reliable=bool(v.get("reliable", 1.0) != 0.0),
            log_spectral_norm=v.get("log_spectral_norm", math.nan),
            phase=Phase(rec.phases[i]) if rec.phases[i] is not None else None,
        ))
    return out


def _skipped_from_record(rec) -> list:
    from ..analysis.results import SkippedLayer

    return [SkippedLayer(name, "", (), reason) for name, reason in rec.skipped]


def _int(v) -> int:
    return int(v) if v is not None and math.isfinite(v) else 0


def _replay_alerts(snapshots) -> list[dict]:
    from ..monitoring.alerts import AlertTracker

    tracker = AlertTracker()
    out = []
    for step, epoch, results, skipped in snapshots:
        for a in tracker.update(results, skipped, step=step, epoch=epoch):
            out.append({"step": a.step, "rule": a.rule, "layer": a.layer, "message": a.message,
                        "status": "resolved" if a.resolved else "raised"})
    return out


def _row_from_result(r) -> dict:
    d = r.to_dict()
    row = {"layer": r.name}
    row.update({c: d.get(c) for c in _FULL_TABLE_COLUMNS})
    if row.get("phase") is None:
        row["phase"] = UNDETERMINED
    return row


# --------------------------------------------------------------------------- figures
def _png_base64(fig, dpi: int = 90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.note{color:#666;font-size:.9em}pre{background:#f8f8f8;padding:.5em;overflow-x:auto;font-size:.85em}
.grid{display:flex;flex-wrap:wrap;gap:.5em}.grid figure{margin:0;flex:1 1 480px}
figcaption{font-size:.8em;color:#555}
"""


def _fmt(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "&ndash;"
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return html.escape(str(getattr(v, "value", v)))


def _cell(column: str, v) -> str:
    if column == "reliable" and v is not None and not (isinstance(v, float) and math.isnan(v)):
        return "yes" if bool(v) else "no"
    return _fmt(v)


def _img(b64: str, alt: str, caption: str | None = None) -> str:
    tag = f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
    if caption is None:
        return tag
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _figure_html(fn, *args, alt: str, caption: str | None = None, errors: list[str]) -> str:
    try:
        return _img(_png_base64(fn(*args)), alt, caption)
    except Exception as err:  # one broken figure must not cost the report
        errors.append(f"{alt}: {type(err).__name__}: {err}")
        return (f'<p class="note">figure &ldquo;{html.escape(alt)}&rdquo; could not be drawn '
                f"({html.escape(str(err))})</p>")


def render_html(data: RunData, title: str | None = None) -> str:
    """One self-contained HTML page (inline CSS, figures as base64 PNG, no external assets)."""
    from . import plotting
    from .report_views import (
        MAX_TRAINING_PANELS,
        plot_alpha_over_training,
        plot_esd_density,
        plot_run_overview,
        plot_runs_compared,
    )

    if title is None:
        parts = Path(data.source).parts
        run = "/".join(parts[-2:]) if data.source_kind == "tensorboard" else (parts[-1] if parts else data.source)
        title = f"ww-monitor report: {run}"
    errors: list[str] = []
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    kind = {"tensorboard": "TensorBoard log", "checkpoint": "checkpoint with WeightWatcherCallback history",
            "model": "model weights (single analysis)"}[data.source_kind]
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    out.append(f'<p class="note">Source: <code>{html.escape(data.source)}</code> ({kind}); '
               f"{data.num_snapshots} snapshot(s); generated {stamp} by ww-monitor.</p>")
    for note in data.notes:
        out.append(f'<p class="note">{html.escape(note)}</p>')

    # model-level summary
    out.append('<section id="summary"><h2>Summary</h2>')
    if data.summary:
        out.append("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in data.summary) + "</tr><tr>"
                   + "".join(f"<td>{_fmt(v)}</td>" for v in data.summary.values()) + "</tr></table>")
        if data.table_step is not None:
            out.append(f'<p class="note">Model-level means at step {data.table_step}.</p>')
        if "num_unreliable" in data.summary:
            from ..analysis.reliability import RELIABLE_MIN_EVALS, RELIABLE_MIN_TAIL

            out.append(f'<p class="note">The alpha means leave out {_fmt(data.summary["num_unreliable"])} unreliable '
                       f"layer(s) (fewer than {RELIABLE_MIN_EVALS} eigenvalues or {RELIABLE_MIN_TAIL} in the power-law "
                       "tail); those get no phase when under the eigenvalue count (<em>undetermined</em>).</p>")
    else:
        out.append('<p class="note">No summary logged.</p>')
    out.append("</section>")

    # over training: model level, and the runs of the folder
    if data.summary_series:
        out.append('<section id="overview"><h2>Over training: mean alpha, reliable layers, the run&#39;s metrics'
                   '</h2>')
        shown = list(data.training_scalars)[:MAX_TRAINING_PANELS]
        more = len(data.training_scalars) - len(shown)
        out.append(f'<p class="note">Run metrics from the same event files: {html.escape(", ".join(shown) or "none")}'
                   + (f" ({more} more not shown)" if more > 0 else "") + ".</p>")
        out.append(_figure_html(plot_run_overview, data.summary_series, data.training_scalars,
                                alt="mean alpha over training", errors=errors))
        out.append("</section>")
    if len(data.runs) > 1:
        out.append(f'<section id="runs"><h2>Runs in this folder ({len(data.runs)})</h2>')
        out.append(_figure_html(plot_runs_compared, data.runs, alt="runs compared", errors=errors))
        out.append('<table><tr><th class="l">run</th><th>snapshots</th><th>last step</th><th>mean alpha (last)</th>'
                   "</tr>" + "".join(
                       f'<tr><td class="l">{html.escape(name)}</td><td>{len(steps)}</td>'
                       f"<td>{_fmt(steps[-1] if steps else None)}</td><td>{_fmt(values[-1] if values else None)}</td></tr>"
                       for name, (steps, values) in data.runs.items()) + "</table></section>")

    # alpha over training
    out.append('<section id="alpha"><h2>Alpha per layer over training</h2>')
    multi = any(len(steps) > 1 for steps, _ in data.alpha.values())
    if data.alpha and (multi or data.source_kind != "model"):
        names, steps, values, reliable = _alpha_grid(data)
        worst = plotting.worst_layers(names, values[:, -1].tolist(), count=_WORST_LISTED)
        if worst:
            out.append(f'<p>Farthest outside the [{plotting.ALPHA_GOOD_BAND[0]:g}, {plotting.ALPHA_GOOD_BAND[1]:g}] '
                       f"band at step {steps[-1]}: " + ", ".join(
                           f"<code>{html.escape(n)}</code> ({a:.2f})" for n, a in worst) + ".</p>")
        else:
            out.append(f'<p>Every layer is inside the [{plotting.ALPHA_GOOD_BAND[0]:g}, '
                       f"{plotting.ALPHA_GOOD_BAND[1]:g}] band at step {steps[-1]}.</p>")
        out.append(_figure_html(plotting.plot_alpha_heatmap, names, steps, values, reliable,
                                alt="alpha heatmap", errors=errors))
        if len(names) <= MAX_LAYERS_PER_CHART:
            out.append(_figure_html(plot_alpha_over_training, data.alpha, alt="alpha over training", errors=errors))
        else:
            out.append(f'<p class="note">{len(names)} layers: one row each in the heatmap (model order) instead of '
                       "one line each.</p>")
    elif data.final_results:
        out.append('<p class="note">A single model: alpha of each layer (no training history).</p>')
        out.append(_figure_html(plotting.plot_alpha_per_layer, data.final_results, alt="alpha per layer",
                                errors=errors))
    else:
        out.append('<p class="note">No ww/alpha/* values logged.</p>')
    out.append("</section>")

    # phases
    out.append('<section id="phases"><h2>Phase per layer and snapshot</h2>')
    if data.phases is not None and any(p is not None for row in data.phases[2] for p in row):
        out.append(_figure_html(plotting.plot_phase_heatmap, *data.phases, alt="phase heatmap", errors=errors))
    else:
        out.append('<p class="note">No phases logged.</p>')
    out.append("</section>")

    # ESDs
    out.append('<section id="esd"><h2>Eigenvalue spectra (ESD)</h2>')
    if data.esd_evolution:
        shown = max(len(v) for v in data.esd_evolution.values())
        left_out = (f" {shown} of the {data.esd_snapshots_total} logged snapshots are shown, spread evenly "
                    "(first and last kept; <code>--max-snapshots 0</code> shows all)."
                    if data.esd_snapshots_total > shown else "")
        out.append('<p class="note">ESD histograms logged at each snapshot (<code>ww/esd/&lt;layer&gt;</code>), one '
                   f"column per snapshot, colour = density on a log scale.{left_out}</p><div class=\"grid\">")
        for layer, snaps in data.esd_evolution.items():
            out.append(_figure_html(plot_esd_density, layer, snaps, alt=f"ESD evolution {layer}", errors=errors))
        out.append("</div>")
    if data.esd_results:
        out.append(f'<p class="note">ESD of the {"final " if data.source_kind == "checkpoint" else ""}weights with the '
                   "Marchenko-Pastur fit and the power-law tail fit.</p><div class=\"grid\">")
        for r in data.esd_results:
            out.append(_figure_html(plotting.plot_esd, r, alt=f"ESD {r.name}", errors=errors))
        out.append("</div>")
    if not data.esd_evolution and not data.esd_results:
        out.append('<p class="note">No ESDs available.</p>')
    out.append("</section>")

    # alerts
    out.append('<section id="alerts"><h2>Alerts</h2>')
    out.append(_alerts_html(data))
    out.append("</section>")

    # per-layer table
    out.append('<section id="layers"><h2>Per-layer metrics at the last snapshot</h2>')
    if data.table:
        if data.table_step is not None:
            out.append(f'<p class="note">Step {data.table_step}.</p>')
        cols = list(data.table_columns)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        out.append(f'<table><tr><th class="l">layer</th>{head}</tr>')
        for row in data.table:
            cells = "".join(f'<td{" class=l" if c in ("kind", "phase") else ""}>{_cell(c, row.get(c))}</td>'
                            for c in cols)
            out.append(f'<tr><td class="l">{html.escape(row["layer"])}</td>{cells}</tr>')
        out.append("</table>")
    else:
        out.append('<p class="note">No per-layer metrics.</p>')
    if data.skipped:
        out.append(f"<h3>Skipped layers ({len(data.skipped)})</h3><ul>"
                   + "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(r)}</li>" for n, r in data.skipped)
                   + "</ul>")
    out.append("</section>")

    if data.logged_figures:
        out.append('<section id="logged-figures"><h2>Figures logged during training (latest of each)</h2>'
                   '<div class="grid">')
        for tag, (step, png) in data.logged_figures.items():
            out.append(_img(base64.b64encode(png).decode("ascii"), tag, f"{tag} (step {step})"))
        out.append("</div></section>")
    if errors:
        out.append('<section id="errors"><h2>Figures that failed</h2><ul>'
                   + "".join(f"<li>{html.escape(e)}</li>" for e in errors) + "</ul></section>")
    out.append("</body></html>\n")
    return "\n".join(out)


_MD_INLINE = ((re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>"))


def markdown_html(text: str) -> str:
    """The small markdown subset the alert texts use (paragraphs, ``* `` bullet lists,
    ``**bold**``, ```code```), escaped and rendered as HTML, as TensorBoard's Text tab shows it."""
    out: list[str] = []
    in_list = False
    for line in text.splitlines():
        body = html.escape(line.strip())
        for pattern, repl in _MD_INLINE:
            body = pattern.sub(repl, body)
        if line.lstrip().startswith("* "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{body[2:]}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if body:
            out.append(f"<p>{body}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def _alerts_html(data: RunData) -> str:
    if not data.alerts:
        if data.source_kind == "tensorboard":
            return '<p class="note">No alerts: this log has no <code>ww/alerts</code> text.</p>'
        return f'<p class="note">No alerts ({html.escape(data.alerts_origin)}).</p>'
    parts = [f'<p class="note">Source: {html.escape(data.alerts_origin)}.</p>']
    if "text" in data.alerts[0]:
        for a in data.alerts:
            parts.append(f"<h4>step {a['step']}</h4>{markdown_html(a['text'])}")
        return "\n".join(parts)
    parts.append('<table><tr><th>step</th><th class="l">status</th><th class="l">rule</th><th class="l">layer</th>'
                 '<th class="l">message</th></tr>')
    for a in data.alerts:
        parts.append(f"<tr><td>{a['step']}</td>" + "".join(
            f'<td class="l">{html.escape(str(a[k]))}</td>' for k in ("status", "rule", "layer", "message")) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, out: str | os.PathLike = "report.html", **kwargs) -> Path:
    """Load ``path`` (see :func:`load_run` for the keyword arguments), render it and write the
    HTML to ``out``. Returns the path written."""
    data = load_run(path, **kwargs)
    page = render_html(data)
    target = Path(out)
    if target.is_dir():
        raise WWMonitorError(f"{target}: is a folder; give the report's file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as err:
        raise WWMonitorError(f"{target}: cannot write the report ({err.strerror or err})") from None
    return target


# --------------------------------------------------------------------------- PNG files
def _safe_filename(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._")
    return safe or "layer"


def write_figures(report, folder: str | os.PathLike, max_esd: int = 12, dpi: int = 100) -> list[Path]:
    """Save ``alpha_per_layer.png`` and one ``esd_<layer>.png`` (ESD with its MP and power-law
    fits) for at most ``max_esd`` analysed layers spread over the depth (0: none) into
    ``folder``. ``report`` is a :class:`~ww_monitor.analysis.results.Report` analysed with eigenvalues
    kept. Returns the files written."""
    from . import plotting

    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise WWMonitorError(f"{target}: exists and is not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WWMonitorError(f"{target}: cannot create the folder ({err.strerror or err})") from None
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = target / name
        try:
            fig.savefig(path, dpi=dpi)
        except OSError as err:
            raise WWMonitorError(f"{path}: cannot write ({err.strerror or err})") from None
        written.append(path)

    if report.layers:
        save(plotting.plot_alpha_per_layer(report.layers), "alpha_per_layer.png")
    with_evals = [r for r in report.layers if r.eigenvalues is not None]
    chosen = set(_choose_layers([r.name for r in with_evals], None, max_esd)) if max_esd > 0 else set()
    used: set[str] = set()
    for r in with_evals:
        if r.name not in chosen:
            continue
        stem = f"esd_{_safe_filename(r.name)}"
        name, k = f"{stem}.png", 1
        while name in used:  # two names that sanitise alike
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        save(plotting.plot_esd(r), name)
    return written


def __getattr__(name: str):
    # The report's figure functions live in report_views (imported on use: it imports matplotlib).
    if name in ("plot_alpha_over_training", "plot_esd_evolution"):
        from . import report_views

        return getattr(report_views, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
