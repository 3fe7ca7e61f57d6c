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

:func:`load_run` gathers a :class:`RunData` (:mod:`.run_data`, :mod:`.run_checkpoint`);
:func:`render_html` turns it into one self-contained HTML page (figures embedded as base64 PNG, no external assets);
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
from pathlib import Path

import numpy as np

from ..errors import WWMonitorError
from .display_names import display_name_map
from .report_alerts import alerts_html, markdown_html  # noqa: F401  (markdown_html: public here)
from .run_data import EsdSnapshot, RunData, _choose_layers, load_run
from .tensorboard_writer import MAX_LAYERS_PER_CHART
from .worst_layers import ALPHA_GOOD_BAND, WORST_LISTED, worst_layers

__all__ = ["RunData", "EsdSnapshot", "load_run", "render_html", "write_report", "write_figures"]


def _alpha_grid(data: RunData) -> tuple[list[str], list[int], np.ndarray, np.ndarray, list[float]]:
    """``(layers, steps, alpha[layer, step], reliable[layer, step], tails)`` from the per-layer
    series (NaN alpha where a layer has no value at a step; reliable where not logged); ``tails``:
    each layer's tail size at the last step, from the per-layer table (NaN if unknown)."""
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
    last = steps[-1] if steps else None
    by_layer = (
        {row["layer"]: row.get("num_pl_spikes", math.nan) for row in data.table} if data.table_step == last else {}
    )
    return names, steps, values, reliable, [float(by_layer.get(n, math.nan)) for n in names]


# --------------------------------------------------------------------------- figures
def _png_base64(fig, dpi: int = 90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
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
    if column == "frozen":  # the step of a frozen layer's (last) analysis, whose values stand
        return "" if v is None or v is False else f"yes, step {int(v)}"
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
        return (
            f'<p class="note">figure &ldquo;{html.escape(alt)}&rdquo; could not be drawn ({html.escape(str(err))})</p>'
        )


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
    # every layer by its displayed name (the wrapper prefix left out), one rule for the whole page
    shown = display_name_map(
        list(data.alpha)
        + [row["layer"] for row in data.table]
        + [r.name for r in data.final_results]
        + list(data.esd_evolution)
        + [n for n, _ in data.skipped]
        + (list(data.phases[0]) if data.phases else [])
    )
    out = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    kind = {
        "tensorboard": "TensorBoard log",
        "checkpoint": "checkpoint with WeightWatcherCallback history",
        "model": "model weights (single analysis)",
    }[data.source_kind]
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    out.append(
        f'<p class="note">Source: <code>{html.escape(data.source)}</code> ({kind}); '
        f"{data.num_snapshots} snapshot(s); generated {stamp} by ww-monitor.</p>"
    )
    for note in data.notes:
        out.append(f'<p class="note">{html.escape(note)}</p>')

    # model-level summary
    out.append('<section id="summary"><h2>Summary</h2>')
    if data.summary:
        out.append(
            "<table><tr>"
            + "".join(f"<th>{html.escape(k)}</th>" for k in data.summary)
            + "</tr><tr>"
            + "".join(f"<td>{_fmt(v)}</td>" for v in data.summary.values())
            + "</tr></table>"
        )
        if data.table_step is not None:
            out.append(f'<p class="note">Model-level means at step {data.table_step}.</p>')
        if "num_unreliable" in data.summary:
            from ..analysis.reliability import RELIABLE_MIN_EVALS, RELIABLE_MIN_TAIL

            out.append(
                f'<p class="note">The alpha means leave out {_fmt(data.summary["num_unreliable"])} unreliable '
                f"layer(s) (fewer than {RELIABLE_MIN_EVALS} eigenvalues or {RELIABLE_MIN_TAIL} in the power-law "
                "tail); those get no phase when under the eigenvalue count (<em>undetermined</em>).</p>"
            )
    else:
        out.append('<p class="note">No summary logged.</p>')
    out.append("</section>")

    # over training: model level, and the runs of the folder
    if data.summary_series:
        out.append('<section id="overview"><h2>Over training: mean alpha, reliable layers, the run&#39;s metrics</h2>')
        panels = list(data.training_scalars)[:MAX_TRAINING_PANELS]
        more = len(data.training_scalars) - len(panels)
        out.append(
            f'<p class="note">Run metrics from the same event files: {html.escape(", ".join(panels) or "none")}'
            + (f" ({more} more not shown)" if more > 0 else "")
            + ".</p>"
        )
        out.append(
            _figure_html(
                plot_run_overview,
                data.summary_series,
                data.training_scalars,
                alt="mean alpha over training",
                errors=errors,
            )
        )
        out.append("</section>")
    if len(data.runs) > 1:
        out.append(f'<section id="runs"><h2>Runs in this folder ({len(data.runs)})</h2>')
        out.append(_figure_html(plot_runs_compared, data.runs, alt="runs compared", errors=errors))
        out.append(
            '<table><tr><th class="l">run</th><th>snapshots</th><th>last step</th><th>mean alpha (last)</th>'
            "</tr>"
            + "".join(
                f'<tr><td class="l">{html.escape(name)}</td><td>{len(steps)}</td>'
                f"<td>{_fmt(steps[-1] if steps else None)}</td><td>{_fmt(values[-1] if values else None)}</td></tr>"
                for name, (steps, values) in data.runs.items()
            )
            + "</table></section>"
        )

    # alpha over training
    out.append('<section id="alpha"><h2>Alpha per layer over training</h2>')
    multi = any(len(steps) > 1 for steps, _ in data.alpha.values())
    if data.alpha and (multi or data.source_kind != "model"):
        names, steps, values, reliable, tails = _alpha_grid(data)
        # the same ranking (and count) as the heatmap's title, in TensorBoard and here
        worst = worst_layers(names, values[:, -1].tolist(), tails, reliable[:, -1].tolist(), count=WORST_LISTED)
        band = f"[{ALPHA_GOOD_BAND[0]:g}, {ALPHA_GOOD_BAND[1]:g}]"
        if worst:
            out.append(
                f"<p>Worst at step {steps[-1]}, by standard errors of the fit outside the {band} band: "
                + ", ".join(
                    f"<code>{html.escape(shown.get(o.name, o.name))}</code> ({o.alpha:.2f}"
                    + (f", tail {o.tail}" if o.tail is not None else "")
                    + ")"
                    for o in worst
                )
                + ".</p>"
            )
        else:
            out.append(f"<p>Every layer with a reliable fit is inside the {band} band at step {steps[-1]}.</p>")
        out.append(
            _figure_html(
                plotting.plot_alpha_heatmap,
                names,
                steps,
                values,
                reliable,
                None,
                tails,
                alt="alpha heatmap",
                errors=errors,
            )
        )
        if len(names) <= MAX_LAYERS_PER_CHART:
            series = {shown.get(n, n): v for n, v in data.alpha.items()}
            out.append(_figure_html(plot_alpha_over_training, series, alt="alpha over training", errors=errors))
        else:
            out.append(
                f'<p class="note">{len(names)} layers: one row each in the heatmap (model order) instead of '
                "one line each.</p>"
            )
    elif data.final_results:
        out.append('<p class="note">A single model: alpha of each layer (no training history).</p>')
        out.append(
            _figure_html(plotting.plot_alpha_per_layer, data.final_results, alt="alpha per layer", errors=errors)
        )
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

    # ESDs: the worst layers first
    out.append('<section id="esd"><h2>Eigenvalue spectra (ESD)</h2>')
    if data.esd_evolution:
        most = max(len(v) for v in data.esd_evolution.values())
        left_out = (
            f" {most} of the {data.esd_snapshots_total} logged snapshots are shown, spread evenly "
            "(first and last kept; <code>--max-snapshots 0</code> shows all)."
            if data.esd_snapshots_total > most
            else ""
        )
        out.append(
            '<p class="note">ESD histograms logged at each snapshot (<code>ww/esd/&lt;layer&gt;</code>) of the '
            "worst layers at the last snapshot (then layers spread over the depth): x = training step, "
            f'colour = density on a log scale.{left_out}</p><div class="grid">'
        )
        for layer, snaps in data.esd_evolution.items():
            out.append(
                _figure_html(
                    plot_esd_density, shown.get(layer, layer), snaps, alt=f"ESD evolution {layer}", errors=errors
                )
            )
        out.append("</div>")
    if data.logged_figures:
        step = max(st for st, _ in data.logged_figures.values())
        out.append(
            f'<p class="note">ESD with the Marchenko-Pastur and power-law fits, as logged during training at '
            f'step {step} (<code>ww/plots/esd/&lt;layer&gt;</code>).</p><div class="grid">'
        )
        for tag, (st, png) in data.logged_figures.items():
            out.append(_img(base64.b64encode(png).decode("ascii"), tag, f"{tag} (step {st})"))
        out.append("</div>")
    if data.esd_results:
        out.append(
            f'<p class="note">ESD of the {"final " if data.source_kind == "checkpoint" else ""}weights with the '
            'Marchenko-Pastur fit and the power-law tail fit, worst layers first.</p><div class="grid">'
        )
        for r in data.esd_results:
            out.append(
                _figure_html(plotting.plot_esd, r, None, shown.get(r.name, r.name), alt=f"ESD {r.name}", errors=errors)
            )
        out.append("</div>")
    if not data.esd_evolution and not data.esd_results and not data.logged_figures:
        out.append('<p class="note">No ESDs available.</p>')
    out.append("</section>")

    # alerts
    out.append('<section id="alerts"><h2>Alerts</h2>')
    out.append(alerts_html(data))
    out.append("</section>")

    # per-layer table
    out.append('<section id="layers"><h2>Per-layer metrics at the last snapshot</h2>')
    if data.table:
        if data.table_step is not None:
            out.append(f'<p class="note">Step {data.table_step}.</p>')
        if "frozen" in data.table_columns:
            out.append(
                '<p class="note"><i>frozen</i>: no parameter of the layer requires grad, so the monitor '
                "analysed it at the step shown and carried it forward (its weights have not changed since); "
                "its values are from that step. The model-level means cover the layers that train.</p>"
            )
        cols = list(data.table_columns)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        out.append(f'<table><tr><th class="l">layer</th>{head}</tr>')
        for row in data.table:
            cells = "".join(
                f"<td{' class=l' if c in ('kind', 'phase') else ''}>{_cell(c, row.get(c))}</td>" for c in cols
            )
            out.append(f'<tr><td class="l">{html.escape(shown.get(row["layer"], row["layer"]))}</td>{cells}</tr>')
        out.append("</table>")
    else:
        out.append('<p class="note">No per-layer metrics.</p>')
    if data.skipped:
        out.append(
            f"<h3>Skipped layers ({len(data.skipped)})</h3><ul>"
            + "".join(
                f"<li><code>{html.escape(shown.get(n, n))}</code>: {html.escape(r)}</li>" for n, r in data.skipped
            )
            + "</ul>"
        )
    out.append("</section>")

    if errors:
        out.append(
            '<section id="errors"><h2>Figures that failed</h2><ul>'
            + "".join(f"<li>{html.escape(e)}</li>" for e in errors)
            + "</ul></section>"
        )
    out.append("</body></html>\n")
    return "\n".join(out)


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
    fits) for at most ``max_esd`` analysed layers, the worst first, then spread over the depth (0: none), into
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
    chosen = (
        set(
            _choose_layers(
                [r.name for r in with_evals],
                None,
                max_esd,
                [r.alpha for r in with_evals],
                [r.num_pl_spikes for r in with_evals],
                [float(r.reliable) for r in with_evals],
            )
        )
        if max_esd > 0
        else set()
    )
    shown = display_name_map([r.name for r in report.layers])
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
        save(plotting.plot_esd(r, None, shown[r.name]), name)
    return written


def __getattr__(name: str):
    # The report's figure functions live in report_views (imported on use: it imports matplotlib).
    if name in ("plot_alpha_over_training", "plot_esd_evolution"):
        from . import report_views

        return getattr(report_views, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
