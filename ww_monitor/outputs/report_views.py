"""Figures of the HTML report that stay readable at 50-200 layers and over several runs.

* :func:`plot_run_overview`: the model-level mean alpha (reliable layers) and the count of
  reliable layers over training, above the run's own logged training/validation scalars
  (same step axis), so a change in alpha can be set against the loss;
* :func:`plot_runs_compared`: mean alpha over training of several runs of one folder;
* :func:`plot_esd_density`: one layer's ESD over training as a log-density heatmap
  (snapshot x log10 lambda), every snapshot visible at once;
* :func:`robust_limits`: axis limits that keep the [2, 4] band readable when one value is far
  off; values outside are drawn on the edge as triangles and counted.

Matplotlib's object-oriented API only (no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .plotting import ALPHA_GOOD_BAND

__all__ = [
    "plot_alpha_over_training",
    "plot_esd_evolution",
    "robust_limits",
    "plot_with_outliers",
    "plot_run_overview",
    "plot_runs_compared",
    "plot_esd_density",
    "MAX_TRAINING_PANELS",
]

#: Percentiles that set a robust axis range (a few outlying snapshots or layers do not set it).
_ROBUST_PERCENTILES = (2.0, 98.0)
#: Relative margin added on each side of the robust range.
_MARGIN = 0.08
#: At most this many of the run's own scalars (losses, accuracies) get a panel in the overview.
MAX_TRAINING_PANELS = 4
#: Decades of density shown in the ESD heatmap below its peak (lower densities are blank).
_DENSITY_DECADES = 4.0
#: Bins per decade of eigenvalue in the ESD heatmap (as in the ESD figures).
_BINS_PER_DECADE = 12
#: Tick label size of the report's figures (points).
_TICK_FONT = 9


def robust_limits(values, always: Sequence[float] = ()) -> tuple[float, float]:
    """``(lo, hi)``: the 2nd-98th percentile of the finite ``values`` widened to include
    ``always`` (e.g. the alpha band), plus a margin."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    points = list(always)
    if v.size:
        points += [float(np.percentile(v, _ROBUST_PERCENTILES[0])), float(np.percentile(v, _ROBUST_PERCENTILES[1]))]
    if not points:
        return 0.0, 1.0
    lo, hi = min(points), max(points)
    pad = (hi - lo) * _MARGIN or max(abs(lo), 1.0) * _MARGIN
    return lo - pad, hi + pad


def plot_with_outliers(ax, x, y, limits: tuple[float, float], **kwargs) -> int:
    """Plot ``y`` against ``x`` clipped to ``limits``; points outside are drawn on the edge as
    open triangles (pointing the way they lie). Returns how many points were outside."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lo, hi = limits
    ax.plot(x, np.clip(y, lo, hi), **kwargs)
    color = ax.lines[-1].get_color()
    above, below = y > hi, y < lo
    if above.any():
        ax.plot(x[above], np.full(above.sum(), hi), linestyle="none", marker="^", mfc="none", color=color, ms=8)
    if below.any():
        ax.plot(x[below], np.full(below.sum(), lo), linestyle="none", marker="v", mfc="none", color=color, ms=8)
    return int(above.sum() + below.sum())


def plot_run_overview(
    summary: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    training: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
) -> Figure:
    """Mean alpha and reliable-layer count (from ``summary``: ``{"alpha": (steps, values),
    "num_layers": ..., "num_unreliable": ...}``), then up to :data:`MAX_TRAINING_PANELS` of the
    run's own scalars, all on one step axis. Keys sit beside the panels (never on a point); the
    reliable-layer line is drawn over a wide band of the analysed-layer count, so where every
    layer is reliable both stay visible."""
    training = training or {}
    names = list(training)[:MAX_TRAINING_PANELS]
    panels = 2 + len(names)
    fig = Figure(figsize=(9.0, 1.9 * panels + 0.6), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.axhspan(*ALPHA_GOOD_BAND, color="#55a868", alpha=0.12, label="$\\alpha \\in [2, 4]$")
    if "alpha" in summary:
        steps, values = summary["alpha"]
        limits = robust_limits(values, ALPHA_GOOD_BAND)
        out = plot_with_outliers(ax, steps, values, limits, marker="o", ms=3, color="black", label="mean alpha")
        ax.set_ylim(*limits)
        if out:
            ax.text(
                0.99,
                0.02,
                f"{out} point(s) beyond the axis (triangles)",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize="small",
            )
    ax.set_ylabel("mean $\\alpha$")
    ax.set_title(
        "model level: mean alpha over reliable layers, reliable layers, the run's own metrics", fontsize="medium"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax = axes[1]
    if "num_layers" in summary:
        steps, total = summary["num_layers"]
        ax.plot(
            steps,
            total,
            drawstyle="steps-post",
            color="#bbbbbb",
            lw=6,
            solid_capstyle="butt",
            zorder=1,
            label="analysed layers (wide grey)",
        )
        top = max(total) if total else 1
        if "num_unreliable" in summary:
            by_step = dict(zip(*summary["num_unreliable"]))
            reliable = [t - by_step.get(s, math.nan) for s, t in zip(steps, total)]
            ax.plot(
                steps,
                reliable,
                drawstyle="steps-post",
                color="#4c72b0",
                marker="o",
                ms=3,
                lw=1.5,
                zorder=3,
                label="reliable layers",
            )
        ax.set_ylim(0, top * 1.15 + 1)  # a line at the maximum stays off the frame
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.set_ylabel("layers")
    for ax, name in zip(axes[2:], names):
        steps, values = training[name]
        limits = robust_limits(values)
        plot_with_outliers(ax, steps, values, limits, lw=1.2, color="#c44e52")
        ax.set_ylim(*limits)
        ax.set_ylabel(name, fontsize="small")
    axes[-1].set_xlabel("training step")
    return fig


def plot_runs_compared(runs: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> Figure:
    """Mean alpha over training of each run (one line per run, named in the legend)."""
    from matplotlib import colormaps

    fig = Figure(figsize=(8.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.axhspan(*ALPHA_GOOD_BAND, color="#55a868", alpha=0.12)
    all_values = [v for _, values in runs.values() for v in values]
    limits = robust_limits(all_values, ALPHA_GOOD_BAND)
    cmap = colormaps["tab10"]
    for i, (name, (steps, values)) in enumerate(runs.items()):
        plot_with_outliers(ax, steps, values, limits, marker="o", ms=3, color=cmap(i % 10), label=name)
    ax.set_ylim(*limits)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean $\\alpha$")
    ax.set_title("mean alpha (reliable layers) of each run in the folder", fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _step_edges(steps: Sequence[int]) -> np.ndarray:
    """Column edges on a step axis: each snapshot's column reaches halfway to its neighbours (the
    first and last as far out as their one neighbour), so uneven intervals show as uneven widths."""
    s = np.asarray(steps, dtype=np.float64)
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2.0
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def plot_esd_density(layer: str, snapshots: Sequence) -> Figure:
    """ESD of one layer at every snapshot as a heatmap: x = training step (each snapshot a column
    as wide as the steps around it, so uneven intervals look uneven; a tick mark on top per
    snapshot), y = log10(lambda), colour = log10 of the density (counts per log10 unit, normalised
    per snapshot); ``snapshots`` are :class:`~ww_monitor.outputs.offline_report.EsdSnapshot`. A heavy
    tail growing shows as colour creeping upwards."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    snapshots = [s for s in snapshots if s.total > 0]
    if not snapshots:
        ax.text(0.5, 0.5, "no ESD logged", transform=ax.transAxes, ha="center")
        ax.set_title(layer)
        return fig
    lo = min(float(s.edges[0]) for s in snapshots)
    hi = max(float(s.edges[-1]) for s in snapshots)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    grid = np.linspace(lo, hi, max(int(math.ceil((hi - lo) * _BINS_PER_DECADE)), 8) + 1)
    dens = np.full((grid.size - 1, len(snapshots)), np.nan)
    for j, s in enumerate(snapshots):
        cdf = np.concatenate([[0.0], np.cumsum(s.counts)])
        mass = np.diff(np.interp(grid, s.edges, cdf, left=0.0, right=s.total)) / s.total
        with np.errstate(divide="ignore"):
            dens[:, j] = np.where(mass > 0, np.log10(mass / np.diff(grid)), np.nan)
    top = np.nanmax(dens)
    cmap = colormaps["magma_r"].with_extremes(bad="#ffffff")
    steps = [s.step for s in snapshots]
    mesh = ax.pcolormesh(
        _step_edges(steps), grid, np.ma.masked_invalid(dens), cmap=cmap, vmin=top - _DENSITY_DECADES, vmax=top
    )
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.tick_params(labelsize=_TICK_FONT)
    marks = ax.secondary_xaxis("top")  # where the snapshots are
    marks.set_xticks(steps, [""] * len(steps))
    marks.tick_params(direction="in", length=4)
    ax.set_xlabel(f"training step ({len(steps)} snapshots, marked on top)", fontsize=_TICK_FONT + 1)
    ax.set_ylabel("log10 eigenvalue $\\lambda$ of $W^TW$")
    ax.set_title(f"ESD of {layer} over training", fontsize="medium")
    fig.colorbar(mesh, ax=ax, label="log10 density", shrink=0.8)
    return fig


def plot_alpha_over_training(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], ax=None):
    """Alpha of every layer against the training step (one line per layer), [2, 4] shaded."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(8.0, 4.5), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    names = list(series)
    cmap = colormaps["viridis"] if len(names) > 10 else colormaps["tab10"]
    ax.axhspan(*ALPHA_GOOD_BAND, color="#55a868", alpha=0.12, label="$\\alpha \\in [2, 4]$")
    limits = robust_limits([v for _, values in series.values() for v in values], ALPHA_GOOD_BAND)
    outside = 0
    for i, name in enumerate(names):
        steps, values = series[name]
        color = cmap(i / max(len(names) - 1, 1)) if len(names) > 10 else cmap(i % 10)
        outside += plot_with_outliers(ax, steps, values, limits, marker="o", ms=3, lw=1.5, color=color, label=name)
    ax.set_ylim(*limits)
    if outside:
        ax.text(
            0.01,
            0.01,
            f"{outside} point(s) beyond the axis, drawn as triangles on its edge",
            transform=ax.transAxes,
            fontsize="small",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("$\\alpha$")
    ax.set_title("power-law $\\alpha$ per layer over training")
    if len(names) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.text(
            0.99,
            0.99,
            f"{len(names)} layers, dark = first, yellow = last",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize="small",
        )
    return fig


def plot_esd_evolution(layer: str, snapshots: Sequence, ax=None):
    """Overlaid ESD histograms of one layer on log-log axes, one colour per snapshot (early =
    dark, late = yellow). The logged log10 buckets are re-binned onto a common grid."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(6.5, 4.0), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    snapshots = [s for s in snapshots if s.total > 0]
    if not snapshots:
        ax.text(0.5, 0.5, "no ESD logged", transform=ax.transAxes, ha="center")
        ax.set_title(layer)
        return fig
    lo = min(s.edges[0] for s in snapshots)
    hi = max(s.edges[-1] for s in snapshots)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    grid = np.linspace(lo, hi, max(int(math.ceil((hi - lo) * _BINS_PER_DECADE)), 8) + 1)
    lam = 10.0**grid
    cmap = colormaps["viridis"]
    shown = []
    for i, s in enumerate(snapshots):
        cdf = np.concatenate([[0.0], np.cumsum(s.counts)])
        mass = np.diff(np.interp(grid, s.edges, cdf, left=0.0, right=s.total))
        dens = mass / (s.total * np.diff(lam))
        dens[dens <= 0] = np.nan
        shown.append(dens[np.isfinite(dens)])
        color = cmap(i / max(len(snapshots) - 1, 1) * 0.9)
        ax.stairs(dens, lam, color=color, lw=1.5, label=f"step {s.step}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if hi - lo <= 2.0:  # under two decades: label 1-2-5 ticks in plain numbers, no crowded minor labels
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    pos = np.concatenate(shown) if shown else np.array([])
    if pos.size:
        ax.set_ylim(pos.min() / 3.0, pos.max() * 3.0)
    ax.set_xlabel("eigenvalue $\\lambda$ of $W^TW$")
    ax.set_ylabel("density")
    ax.set_title(f"ESD of {layer} over training")
    ax.legend(loc="best", fontsize="small")
    return fig
