"""What an offline report shows, read from a run: :class:`RunData` and :func:`load_run`.

:func:`load_run` reads a TensorBoard log folder or event file written with the monitor (alpha
and phases over training from ``ww/...`` scalars, ESD evolution from the ``ww/esd/<layer>``
histograms, alerts, the last layer table, logged figures, the run's own training scalars), or
hands a checkpoint / model file to :mod:`.run_checkpoint`. :mod:`.offline_report` renders it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.phases import UNDETERMINED, Phase
from ..errors import WWMonitorError

__all__ = ["RunData", "EsdSnapshot", "load_run"]

#: Per-layer TensorBoard metrics shown in the table (the callback's ``LAYER_METRICS``).
_TB_TABLE_METRICS = (
    "num_evals",
    "num_pl_spikes",
    "reliable",
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "rank_loss",
    "num_spikes",
)
#: Columns of the table when the full per-layer results are known (checkpoint or model).
_FULL_TABLE_COLUMNS = (
    "kind",
    "N",
    "M",
    "num_evals",
    "num_pl_spikes",
    "reliable",
    "alpha",
    "alpha_weighted",
    "D",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "rank_loss",
    "num_spikes",
    "phase",
)
_SIZE_GUIDANCE = {k: 0 for k in ("compressedHistograms", "images", "audio", "scalars", "histograms", "tensors")}
_MAX_TB_FIGURES = 12
#: Logged figures the report embeds: the ESDs with their fits (it redraws the others from scalars).
_LOGGED_FIGURES = "ww/plots/esd/"
#: Scalars Lightning logs that are not the run's metrics (the epoch counter, the hparams placeholder).
_NOT_TRAINING_SCALARS = ("epoch", "hp_metric")


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
    logged_figures: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # ESD tag -> (step, PNG bytes)
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
        esd_layers: regexes choosing the layers of the ESD section (default: the worst layers at
            the last snapshot by :func:`~ww_monitor.outputs.worst_layers.worst_layers`, then layers
            spread over the depth, ``max_esd_layers`` in all).
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
    from .run_checkpoint import from_weights  # imports torch and the analysis only when needed

    return from_weights(p, weights_only, esd_layers, max_esd_layers, analyze_fn)


def _event_files(folder: Path) -> list[Path]:
    out: list[Path] = []
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
        raise WWMonitorError(
            f"{target}: no ww/ tags in the TensorBoard event files (was WeightWatcherCallback "
            "attached to a Trainer with a TensorBoardLogger writing there?)"
        )
    found.sort(key=lambda ra: _latest_wall_time(ra[1]))
    run, acc = found[-1]
    data = RunData(source=str(run), source_kind="tensorboard")
    if len(found) > 1:
        others = ", ".join(str(r) for r, _ in found[:-1])
        data.notes.append(
            f"{len(found)} runs with ww/ tags under {target}; the detailed sections show the most "
            f"recent ({run}), the section Runs compares them all. Point the report at one run folder "
            f"for the details of another: {others}"
        )
        for r, a in found:
            if "ww/summary/alpha" in a.Tags().get("scalars", []):
                name = str(r.relative_to(target)) if target.is_dir() and r != target else r.name
                data.runs[name] = _dedupe_steps(a.Scalars("ww/summary/alpha"))
    tags = acc.Tags()
    scalars = {t: _dedupe_steps(acc.Scalars(t)) for t in tags.get("scalars", []) if t.startswith("ww/")}
    # the run's own metrics (losses, accuracies) from the same event files, shown beside alpha
    data.training_scalars = {
        t: _dedupe_steps(acc.Scalars(t))
        for t in tags.get("scalars", [])
        if not t.startswith("ww") and t not in _NOT_TRAINING_SCALARS
    }
    data.summary_series = {t[len("ww/summary/") :]: v for t, v in scalars.items() if t.startswith("ww/summary/")}
    data.reliable = {t[len("ww/reliable/") :]: v for t, v in scalars.items() if t.startswith("ww/reliable/")}

    layers = [t[len("ww/alpha/") :] for t in scalars if t.startswith("ww/alpha/")]
    for layer in layers:
        steps, values = scalars[f"ww/alpha/{layer}"]
        data.alpha[layer] = (steps, values)
    all_steps = sorted({s for t, (steps, _) in scalars.items() for s in steps})
    data.num_snapshots = len(all_steps)

    phase_layers = [t[len("ww/phase/") :] for t in scalars if t.startswith("ww/phase/")]
    if phase_layers:
        order = list(Phase)
        phase_steps = sorted({s for layer in phase_layers for s in scalars[f"ww/phase/{layer}"][0]})
        grid = []
        for layer in phase_layers:
            by_step = dict(zip(*scalars[f"ww/phase/{layer}"]))
            phase_row: list = []
            for s in phase_steps:
                v = by_step.get(s)
                ok = v is not None and math.isfinite(v) and 0 <= round(v) < len(order)
                # A negative ordinal: analysed, but too few eigenvalues for a phase.
                undetermined = v is not None and math.isfinite(v) and round(v) < 0
                phase_row.append(
                    order[int(round(v))] if ok and v is not None else (UNDETERMINED if undetermined else None)
                )
            grid.append(phase_row)
        data.phases = (phase_layers, phase_steps, grid)

    hist_layers = [t[len("ww/esd/") :] for t in tags.get("histograms", []) if t.startswith("ww/esd/")]
    last_value = _last_values(scalars, all_steps[-1] if all_steps else None)
    for layer in _choose_layers(
        hist_layers,
        esd_layers,
        max_esd_layers,
        *([last_value(f"ww/{m}/{n}") for n in hist_layers] for m in ("alpha", "num_pl_spikes", "reliable")),
    ):
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
        frozen = _frozen_at(scalars, table_layers)
        data.table_columns = _TB_TABLE_METRICS + ("phase",) + (("frozen",) if frozen else ())
        for layer in table_layers:
            at = frozen.get(layer, last)  # a frozen layer's values stand from its last analysis
            row: dict = {"layer": layer}
            for m in _TB_TABLE_METRICS:
                row[m] = dict(zip(*scalars.get(f"ww/{m}/{layer}", ([], [])))).get(at, math.nan)
            if data.phases is not None and layer in data.phases[0] and at in data.phases[1]:
                p = data.phases[2][data.phases[0].index(layer)][data.phases[1].index(at)]
                row["phase"] = getattr(p, "value", p)
            if frozen:
                row["frozen"] = at if layer in frozen else None
            data.table.append(row)
        for t, (steps, values) in scalars.items():
            if t.startswith("ww/summary/") and steps:
                by_step = dict(zip(steps, values))
                data.summary[t[len("ww/summary/") :]] = by_step.get(last, values[-1])

    # The ESD figures with their fits (the report redraws every other figure from the scalars): those
    # of the latest snapshot that has any, i.e. its worst layers.
    latest: dict[str, Any] = {}  # tag -> TensorBoard image event
    for tag in tags.get("images", []):
        if tag.startswith(_LOGGED_FIGURES):
            events = acc.Images(tag)
            if events:
                latest[tag] = max(events, key=lambda ev: (ev.step, ev.wall_time))
    newest = max((e.step for e in latest.values()), default=None)
    for tag, e in latest.items():
        if e.step == newest and len(data.logged_figures) < _MAX_TB_FIGURES:
            data.logged_figures[tag] = (e.step, bytes(e.encoded_image_string))
    return data


def _frozen_at(scalars: dict, layers: Sequence[str]) -> dict[str, int]:
    """``{layer: step}`` of the layers frozen at their latest analysis (``ww/frozen/<layer>`` is
    logged with each analysis of a frozen matrix; the monitor carries it forward afterwards)."""
    out = {}
    for layer in layers:
        frozen_steps = scalars.get(f"ww/frozen/{layer}", ([], []))[0]
        analysed = scalars.get(f"ww/alpha/{layer}", scalars.get(f"ww/phase/{layer}", ([], [])))[0]
        if frozen_steps and analysed and frozen_steps[-1] >= analysed[-1]:
            out[layer] = frozen_steps[-1]
    return out


def _last_values(scalars: dict, step):
    """``value(tag)``: the tag's value at ``step`` (NaN if not logged there)."""

    def value(tag: str) -> float:
        steps, values = scalars.get(tag, ([], []))
        return dict(zip(steps, values)).get(step, math.nan)

    return value


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


def _choose_layers(
    names: Sequence[str], patterns, max_layers: int, alphas=None, tails=None, reliable=None
) -> list[str]:
    """The ESD layers: ``patterns``, else the worst by alpha (given ``alphas``), then spread."""
    from .worst_layers import choose_figure_layers

    rel = [bool(r > 0.5) if math.isfinite(r) else True for r in reliable] if reliable is not None else None
    return choose_figure_layers(list(names), list(patterns) if patterns else None, max_layers, alphas, tails, rel)


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
