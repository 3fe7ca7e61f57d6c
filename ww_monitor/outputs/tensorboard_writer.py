"""Write snapshot results to Lightning loggers.

* Scalars go to **every** logger through ``logger.log_metrics(metrics, step=snapshot_step)``
  (TensorBoard, CSV, MLflow, W&B, ...):

  - ``ww/<metric>/<layer>`` for :data:`LAYER_METRICS`,
  - ``ww/phase/<layer>``: the phase as an ordinal, its position in :class:`~ww_monitor.Phase`
    (0 random-like, 1 bleeding-out, 2 bulk+spikes, 3 bulk-decay, 4 heavy-tailed,
    5 rank-collapse), -1 (:data:`PHASE_UNDETERMINED`) for a layer too small for a phase,
  - ``ww/summary/<metric>``: the model-level means of ``Report.summary()`` and the counts,
  - ``ww/frozen/<layer>``: 1, with the analysis of a frozen layer (which is then carried forward).

* TensorBoard-only extras go to the ``SummaryWriter`` of each TensorBoard logger
  (``logger.experiment``): ESD histograms of log10(lambda) ``ww/esd/<layer>`` (non-finite and
  non-positive eigenvalues dropped; binned by :mod:`ww_monitor.functional.histogram`), figures as images under ``ww/plots/...``, a per-snapshot
  markdown table ``ww/layers`` (text) and, once per writer, a custom-scalars layout that groups
  the per-layer curves of each metric in one chart.

Nothing here raises on a broken or closed logger: each failure becomes one warning per logger
and kind of output. Figures are rendered to RGB arrays by :func:`render_figures`, which runs in
the background worker (matplotlib's object-oriented API with the Agg canvas, no pyplot state).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..analysis.phases import UNDETERMINED, Phase
from ..analysis.reliability import RELIABLE_MIN_EVALS, RELIABLE_MIN_TAIL
from ..analysis.results import SUMMARY_COUNTS, SUMMARY_METRICS, LayerResult
from ..functional.histogram import ESD_MAX_BINS, ESD_MIN_BINS, EsdHistogram, esd_bins, esd_histogram, esd_log10
from ..user_warnings import warn_user
from .display_names import display_name_map

__all__ = [
    "LAYER_METRICS",
    "PHASE_ORDER",
    "PHASE_UNDETERMINED",
    "LoggerWriter",
    "layer_scalars",
    "summary_scalars",
    "esd_log10",
    "EsdHistogram",
    "esd_histogram",
    "esd_bins",
    "ESD_AXES",
    "custom_scalars_layout",
    "render_figures",
    "choose_figure_layers",
    "is_tensorboard_logger",
]

log = logging.getLogger(__name__)

#: Per-layer metrics logged as ``ww/<metric>/<layer>``.
LAYER_METRICS = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "rank_loss",
    "num_spikes",
    "num_evals",
    "num_pl_spikes",
    "reliable",
)
#: Per-layer metrics logged as ``ww/<metric>/<layer>`` only when computed (options that are on).
OPTIONAL_LAYER_METRICS = (
    "distance_from_init",
    "esd_shift",
    "detX_num",
    "ERG_gap",
    "num_fingers",
    "Lambda",
    "rand_distance",
    "ww_softrank",
)
#: Ordinal of each phase for ``ww/phase/<layer>``.
PHASE_ORDER = {p: i for i, p in enumerate(Phase)}
#: ``ww/phase/<layer>`` of a layer analysed without a phase (too few eigenvalues).
PHASE_UNDETERMINED = -1.0


def _finite_or_nan(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def layer_scalars(results: Iterable[LayerResult]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for m in LAYER_METRICS:
            out[f"ww/{m}/{r.name}"] = _finite_or_nan(getattr(r, m, math.nan))
        for m in OPTIONAL_LAYER_METRICS:
            if getattr(r, m, None) is not None:
                out[f"ww/{m}/{r.name}"] = _finite_or_nan(getattr(r, m))
        if getattr(r, "frozen", False):  # logged with the (one) analysis of a frozen layer: ww-monitor report reads it
            out[f"ww/frozen/{r.name}"] = 1.0
        if r.phase is None:
            out[f"ww/phase/{r.name}"] = PHASE_UNDETERMINED
            continue
        try:
            out[f"ww/phase/{r.name}"] = float(PHASE_ORDER[Phase(r.phase)])
        except (ValueError, KeyError):
            pass
    return out


def summary_scalars(summary: dict) -> dict[str, float]:
    return {f"ww/summary/{k}": _finite_or_nan(v) for k, v in summary.items() if k in SUMMARY_METRICS + SUMMARY_COUNTS}


#: Kept for compatibility: the most buckets an ESD histogram gets.
ESD_HISTOGRAM_BINS = ESD_MAX_BINS
#: What the axes of the ``ww/esd/<layer>`` histograms mean (shown with the ``ww/layers`` table).
ESD_AXES = (
    "ESD histograms `ww/esd/<layer>` (Histograms tab): x axis = log10(lambda), lambda an eigenvalue of "
    "W^T W (squared singular value of the weight matrix); height = number of eigenvalues per bucket; "
    f"buckets = ceil(2 n^(1/3)) for n eigenvalues, between {ESD_MIN_BINS} and {ESD_MAX_BINS}. "
    "A heavy tail shows as a long ridge to the right."
)


#: Frozen layers named under the ``ww/layers`` table of a snapshot that carried them forward.
_MAX_CARRIED_LISTED = 20

#: Up to this many layers, the "ww per-layer" custom-scalars charts draw every layer in one chart
#: per metric; beyond it the lines cannot be told apart (TensorBoard cycles ~10 colours), so
#: the layout has one chart per block instead.
MAX_LAYERS_PER_CHART = 12
#: Model-level counts charted together in the overview.
_OVERVIEW_COUNTS = (
    "num_layers",
    "num_unreliable",
    "num_undetermined",
    "num_random_like",
    "num_failed_fits",
    "num_skipped",
    "num_frozen",
)


def _exact(tags: Iterable[str]) -> str:
    return "^(" + "|".join(re.escape(t) for t in tags) + ")$"


def custom_scalars_layout(names: Sequence[str] = ()) -> dict:
    """Custom-scalars layout (docs/tensorboard.md).

    * ``ww overview``: mean alpha, the layer counts, active alerts, mean alpha per block and per kind;
    * ``ww alpha per block``: one chart per block with the alpha of its layers (given ``names``),
      titled by the block's displayed name (``alpha layers.3``, not ``alpha model.model.layers.3``);
    * ``ww per-layer`` (at most :data:`MAX_LAYERS_PER_CHART` layers): one chart per metric, every layer;
    * ``ww summary``: one chart per model-level mean.
    """
    from .layer_groups import BLOCK_PREFIX, KIND_PREFIX, block_of, group_names

    overview = {
        "mean alpha (reliable layers)": ["Multiline", [r"^ww/summary/alpha$"]],
        "layer counts": ["Multiline", [_exact(f"ww/summary/{c}" for c in _OVERVIEW_COUNTS)]],
        "active alerts": ["Multiline", [r"^ww/alerts/active$"]],
        "mean alpha per block": ["Multiline", [rf"^{BLOCK_PREFIX}/alpha/"]],
        "mean alpha per kind": ["Multiline", [rf"^{KIND_PREFIX}/alpha/"]],
    }
    layout = {"ww overview": overview}
    if names:  # charts titled by the block as displayed (wrapper prefix left out); tags keep full names
        shown = display_name_map(names)
        layout["ww alpha per block"] = {
            f"alpha {block}": ["Multiline", [_exact(f"ww/alpha/{n}" for n in layers)]]
            for block, layers in group_names(names, key=lambda n: block_of(shown[n])).items()
        }
    if not names or len(names) <= MAX_LAYERS_PER_CHART:
        layout["ww per-layer"] = {m: ["Multiline", [rf"^ww/{re.escape(m)}/"]] for m in (*LAYER_METRICS, "phase")}
    layout["ww summary"] = {m: ["Multiline", [rf"^ww/summary/{re.escape(m)}$"]] for m in SUMMARY_METRICS}
    return layout


def layers_markdown(results: Sequence[LayerResult], carried: Sequence[str] = ()) -> str:
    """The per-layer table of one snapshot, with the counts each fit rests on and a legend;
    ``carried``: frozen layers not analysed again at this snapshot (named below the table)."""
    head = (
        "| layer | kind | eigenvalues | tail | reliable | alpha | alpha_weighted | log_spectral_norm "
        "| stable_rank | rank_loss | phase | frozen |\n"
    )
    head += "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    shown = display_name_map([r.name for r in results] + list(carried))
    rows = []
    for r in results:
        rows.append(
            f"| {shown[r.name]} | {r.kind} | {r.num_evals} | {r.num_pl_spikes} | {'yes' if r.reliable else 'no'} "
            f"| {r.alpha:.3f} | {r.alpha_weighted:.3f} | {r.log_spectral_norm:.3f} "
            f"| {r.stable_rank:.2f} | {r.rank_loss} | {r.phase if r.phase is not None else UNDETERMINED} "
            f"| {'yes' if getattr(r, 'frozen', False) else ''} |"
        )
    if carried:
        listed = ", ".join(shown[n] for n in carried[:_MAX_CARRIED_LISTED])
        more = f" and {len(carried) - _MAX_CARRIED_LISTED} more" if len(carried) > _MAX_CARRIED_LISTED else ""
        rows.append(
            f"\n{len(carried)} frozen layer(s) not analysed again (their weights do not require grad and "
            f"have not changed since their last analysis, shown at that step): {listed}{more}."
        )
    legend = (
        f"\n\n*tail* = eigenvalues in the power-law fit; a layer is *reliable* with >= {RELIABLE_MIN_EVALS} "
        f"eigenvalues and >= {RELIABLE_MIN_TAIL} in the tail. Unreliable layers are left out of the "
        f"`ww/summary/alpha*` means (counted in `ww/summary/num_unreliable`); layers under "
        f"{RELIABLE_MIN_EVALS} eigenvalues get no phase (*{UNDETERMINED}*). *frozen* layers (no parameter "
        "requires grad) are analysed once and carried forward; the `ww/summary/*` means cover the layers "
        "that train (frozen ones counted in `ww/summary/num_frozen`).\n\n" + ESD_AXES
    )
    return head + "\n".join(rows) + legend


def is_tensorboard_logger(logger) -> bool:
    """A Lightning TensorBoardLogger of either package (no import of either), or a sink that
    writes to a ``SummaryWriter`` (``writes_tensorboard``, :mod:`ww_monitor.core.sinks`)."""
    if getattr(logger, "writes_tensorboard", False) is True:
        return True
    return any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__)


def choose_figure_layers(
    names: Sequence[str], patterns: Sequence[str] | None, max_layers: int, results: Sequence[LayerResult] | None = None
) -> list[str]:
    """Layers that get an ESD figure: those matching ``patterns``, else the worst layers of
    ``results`` (:func:`~ww_monitor.outputs.worst_layers.choose_figure_layers`), then layers spread
    from first to last, up to ``max_layers``."""
    from .worst_layers import choose_figure_layers as choose

    if results is None:
        return choose(names, patterns, max_layers)
    by_name = {r.name: r for r in results}
    rows = [by_name.get(n) for n in names]
    return choose(
        names,
        patterns,
        max_layers,
        alphas=[r.alpha if r else math.nan for r in rows],
        tails=[r.num_pl_spikes if r else 0 for r in rows],
        reliable=[bool(r and r.reliable) for r in rows],
    )


def _figure_to_rgb(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:  # a figure made through pyplot stays registered until closed
        try:
            plt.close(fig)
        except Exception:  # pragma: no cover
            pass
    return img


def render_figures(
    results: Sequence[LayerResult],
    esd_layers: Sequence[str],
    phase_grid: tuple | None = None,
    alpha_grid: tuple | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Figures of one snapshot as HxWx3 uint8 arrays keyed by tag, and the failures (runs in
    the worker).

    ``ww/plots/alpha_per_layer``, ``ww/plots/esd/<layer>`` for ``esd_layers`` and, given
    ``phase_grid = (layer_names, steps, phases)`` with at least one known phase,
    ``ww/plots/phases``; given ``alpha_grid = (layer_names, steps, alphas, reliable)`` (arrays
    layer x snapshot) with a finite alpha, ``ww/plots/alpha_heatmap``. A figure that fails to
    render is left out and its error returned.
    """
    from . import plotting

    images: dict[str, np.ndarray] = {}
    errors: list[str] = []
    shown = display_name_map([r.name for r in results])
    step = alpha_grid[1][-1] if alpha_grid is not None and len(alpha_grid[1]) else None

    def attempt(tag, fn, *args):
        try:
            images[tag] = _figure_to_rgb(fn(*args))
        except Exception as err:
            log.debug("figure %s failed: %s", tag, err)
            errors.append(f"{tag}: {type(err).__name__}: {err}")

    attempt("ww/plots/alpha_per_layer", plotting.plot_alpha_per_layer, list(results), None, step)
    by_name = {r.name: r for r in results}
    for name in esd_layers:
        r = by_name.get(name)
        if r is not None and r.eigenvalues is not None:
            attempt(f"ww/plots/esd/{name}", plotting.plot_esd, r, None, shown.get(name, name))
    if phase_grid is not None:
        names, steps, phases = phase_grid
        if any(p is not None for row in phases for p in row):
            attempt("ww/plots/phases", plotting.plot_phase_heatmap, list(names), list(steps), phases)
    if alpha_grid is not None:
        names, steps, alphas, reliable = alpha_grid
        if np.isfinite(np.asarray(alphas, dtype=np.float64)).any():
            # the tails of this snapshot (the last column), for the ranking of the worst layers
            tails = [by_name[n].num_pl_spikes if n in by_name else math.nan for n in names]
            attempt(
                "ww/plots/alpha_heatmap",
                plotting.plot_alpha_heatmap,
                list(names),
                list(steps),
                alphas,
                np.asarray(reliable) > 0.5,
                None,
                tails,
            )
    return images, errors


def strip_eigenvalues(results: Sequence[LayerResult], keep: Iterable[str] = ()) -> list[LayerResult]:
    keep = set(keep)
    return [r if r.name in keep else replace(r, eigenvalues=None) for r in results]


class LoggerWriter:
    """Sends one snapshot's outputs to the trainer's loggers; never raises."""

    def __init__(self, prefix: str = "ww_monitor", no_logger: str = "no logger; results are kept only in the history."):
        self.prefix = prefix  # the front door's name, at the start of each warning
        self.no_logger = no_logger  # what to say when there is nowhere to write
        self._warned: set = set()
        self._layouts: set[int] = set()

    def _warn(self, key, message: str) -> None:
        if key in self._warned:
            log.debug(message)
            return
        self._warned.add(key)
        warn_user(f"{self.prefix}: {message}", RuntimeWarning)

    @staticmethod
    def _tb_writers(loggers) -> list[tuple[Any, Any]]:
        out = []
        for lg in loggers:
            if is_tensorboard_logger(lg):
                try:
                    exp = lg.experiment
                except Exception:
                    continue
                if hasattr(exp, "add_histogram_raw"):
                    out.append((lg, exp))
        return out

    def log_scalars(self, loggers, metrics: dict[str, float], step: int) -> None:
        if not loggers:
            self._warn(("no-logger",), self.no_logger)
            return
        for lg in loggers:
            try:
                lg.log_metrics(metrics, step=step)
            except Exception as err:
                self._warn(
                    (id(lg), "scalars"),
                    f"{type(lg).__name__}.log_metrics failed ({type(err).__name__}: {err}); continuing without it.",
                )

    def log_tensorboard(
        self,
        loggers,
        step: int,
        results: Sequence[LayerResult],
        histograms: bool = True,
        text: bool = True,
        precomputed: dict[str, EsdHistogram | None] | None = None,
        carried: Sequence[str] = (),
        layout: Sequence[str] | None = None,
    ) -> None:
        """ESD histograms (``precomputed`` by the worker where given), the layer table (naming the
        ``carried`` frozen layers), the custom-scalars layout: written once, from ``layout`` (the
        layers that train; default: every result) the first time it names a layer."""
        writers = self._tb_writers(loggers)
        if not writers:
            return
        hists: dict[str, EsdHistogram] = {}
        if histograms:
            for r in results:
                h = (
                    precomputed[r.name]
                    if precomputed is not None and r.name in precomputed
                    else esd_histogram(r.eigenvalues)
                )
                if h is not None:
                    hists[r.name] = h
        names = [r.name for r in results] if layout is None else list(layout)
        for lg, exp in writers:
            try:
                if id(exp) not in self._layouts and names:  # under LoRA: at the first snapshot with updates
                    exp.add_custom_scalars(custom_scalars_layout(names))
                    self._layouts.add(id(exp))
                for name, h in hists.items():
                    exp.add_histogram_raw(
                        f"ww/esd/{name}",
                        min=h.min,
                        max=h.max,
                        num=h.num,
                        sum=h.sum,
                        sum_squares=h.sum_squares,
                        bucket_limits=list(h.bucket_limits),
                        bucket_counts=list(h.bucket_counts),
                        global_step=step,
                    )
                if text and (results or carried):
                    exp.add_text("ww/layers", layers_markdown(results, carried), global_step=step)
            except Exception as err:
                self._warn(
                    (id(lg), "tensorboard"),
                    f"writing to TensorBoard failed ({type(err).__name__}: {err}); continuing without it.",
                )

    def log_images(self, loggers, step: int, images: dict[str, np.ndarray]) -> None:
        for lg, exp in self._tb_writers(loggers):
            try:
                for tag, img in images.items():
                    exp.add_image(tag, img, global_step=step, dataformats="HWC")
            except Exception as err:
                self._warn(
                    (id(lg), "images"),
                    f"writing figures to TensorBoard failed ({type(err).__name__}: {err}); continuing without them.",
                )

    def flush(self, loggers) -> None:
        for _, exp in self._tb_writers(loggers):
            try:
                exp.flush()
            except Exception:
                pass
