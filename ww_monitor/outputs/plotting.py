"""Figures: one layer's ESD with its fits, alpha per layer, and the phase of every layer over time.

Matplotlib's object-oriented API only: figures are :class:`matplotlib.figure.Figure` objects
created directly (never through ``pyplot``), so nothing here touches global state, picks a
backend or keeps figures alive in a registry. Each function draws into ``ax`` when given
(and returns its figure) or into a new figure otherwise; save with ``fig.savefig(path)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..functional.marchenko_pastur import mp_density, mp_edges
from ..analysis.phases import UNDETERMINED, Phase

__all__ = ["plot_esd", "plot_alpha_per_layer", "plot_phase_heatmap", "plot_alpha_heatmap", "PHASE_COLORS",
           "heatmap_size", "alpha_color_range", "worst_layers"]

#: Fixed colour per phase (ordered as training moves through them: cool = random, warm = heavy
#: tailed, grey = collapsed), so heatmaps of different runs read the same.
PHASE_COLORS = {
    Phase.RANDOM_LIKE: "#4c72b0",
    Phase.BLEEDING_OUT: "#64b5cd",
    Phase.BULK_PLUS_SPIKES: "#55a868",
    Phase.BULK_DECAY: "#ccb974",
    Phase.HEAVY_TAILED: "#c44e52",
    Phase.RANK_COLLAPSE: "#595959",
}
#: Cells of the heatmap without a phase (layer not analysed at that snapshot).
_MISSING_COLOR = "#ffffff"
#: Cells of a layer analysed without a phase (too few eigenvalues: undetermined).
_UNDETERMINED_COLOR = "#dddddd"
#: Colour of the bars of layers whose fit is not reliable (too few eigenvalues or tail points).
_UNRELIABLE_COLOR = "#bbbbbb"
#: The band of alpha that 80-90% of well-trained layers fall into (Martin & Mahoney 2021).
ALPHA_GOOD_BAND = (2.0, 4.0)
# Histogram bins per decade of eigenvalue: enough to see the MP shape for M ~ 100-10,000.
_BINS_PER_DECADE = 12
_CURVE_POINTS = 400
# Factor of head-room above and below the histogram's densities on the log y axis.
_Y_MARGIN = 5.0


#: Heatmaps: inches per layer row and per snapshot column, and the figure's limits, so 200
#: layers still fit one image a browser shows (24 in at 100 dpi = 2,400 px).
_ROW_INCHES = 0.22
_COL_INCHES = 0.45
_MIN_HEIGHT, _MAX_HEIGHT = 3.0, 24.0
_MIN_WIDTH, _MAX_WIDTH = 5.0, 16.0
#: At most this many row labels on a heatmap; beyond it every k-th layer is labelled.
_MAX_ROW_LABELS = 60
#: Colour range of the alpha heatmap: at least the band and its neighbours [1.5, 6] (so a run
#: inside the band is not stretched across the whole scale), at most [1, 10] (one alpha of 40
#: must not squash the band into one colour); values beyond are drawn in the end colours and
#: counted in the title.
ALPHA_COLOR_FLOOR = (1.5, 6.0)
ALPHA_COLOR_CEILING = (1.0, 10.0)


def heatmap_size(num_rows: int, num_cols: int) -> tuple[float, float]:
    """Figure size (inches) of a layer x snapshot heatmap."""
    width = min(_MAX_WIDTH, max(_MIN_WIDTH, _COL_INCHES * num_cols + 5.0))
    height = min(_MAX_HEIGHT, max(_MIN_HEIGHT, _ROW_INCHES * num_rows + 1.5))
    return width, height


def _label_rows(ax, layer_names: Sequence[str]) -> None:
    every = max(1, math.ceil(len(layer_names) / _MAX_ROW_LABELS))
    idx = np.arange(0, len(layer_names), every)
    ax.set_yticks(idx, [layer_names[i] for i in idx], fontsize="small")


def _label_steps(ax, steps: Sequence[int]) -> None:
    every = max(1, math.ceil(len(steps) / _MAX_ROW_LABELS))
    idx = np.arange(0, len(steps), every)
    ax.set_xticks(idx, [str(steps[i]) for i in idx], rotation=90, fontsize="small")


def alpha_color_range(values) -> tuple[float, float]:
    """Colour limits of an alpha heatmap: the 2nd-98th percentile of the finite values, widened
    to :data:`ALPHA_COLOR_FLOOR` and clipped to :data:`ALPHA_COLOR_CEILING`."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = ALPHA_COLOR_FLOOR
    if v.size:
        lo = min(lo, float(np.percentile(v, 2)))
        hi = max(hi, float(np.percentile(v, 98)))
    return max(ALPHA_COLOR_CEILING[0], lo), min(ALPHA_COLOR_CEILING[1], hi)


def worst_layers(layer_names: Sequence[str], alphas: Sequence[float], count: int = 3) -> list[tuple[str, float]]:
    """The ``count`` layers farthest outside :data:`ALPHA_GOOD_BAND` (largest distance to the band
    first; layers inside the band are not listed)."""
    lo, hi = ALPHA_GOOD_BAND
    scored = []
    for name, a in zip(layer_names, alphas):
        if a is None or not math.isfinite(a):
            continue
        dist = lo - a if a < lo else a - hi if a > hi else 0.0
        if dist > 0:
            scored.append((dist, name, float(a)))
    scored.sort(key=lambda t: -t[0])
    return [(name, a) for _, name, a in scored[:count]]


def _band_colormap(vmin: float, vmax: float):
    """Reds below the band, light greys inside it, blues above: a step at each band edge, so a
    cell's side of the band reads at a glance."""
    from matplotlib.colors import LinearSegmentedColormap

    lo, hi = ALPHA_GOOD_BAND
    span = vmax - vmin
    p_lo = min(max((lo - vmin) / span, 0.001), 0.998)
    p_hi = min(max((hi - vmin) / span, p_lo + 0.001), 0.999)
    nodes = [(0.0, "#67001f"), (p_lo, "#f4a582"), (p_lo, "#e6e6e6"), (p_hi, "#c4c4c4"), (p_hi, "#92c5de"),
             (1.0, "#053061")]
    cmap = LinearSegmentedColormap.from_list("ww_alpha_band", nodes)
    return cmap.with_extremes(bad=_MISSING_COLOR)


def plot_alpha_heatmap(
    layer_names: Sequence[str], steps: Sequence[int], alphas, reliable=None, ax=None,
) -> Figure:
    """Alpha of each layer (rows, model order) at each snapshot (columns).

    Colours by side of :data:`ALPHA_GOOD_BAND` (inside light grey, below red: very heavy tails,
    often over-fitted; above blue: random-like, under-trained), limits from
    :func:`alpha_color_range` (values outside drawn in the end colours and counted in the title);
    NaN cells (not analysed or failed fit) white; layers whose fit is not reliable at that snapshot
    (``reliable[i, j]`` false) marked with a dot. The title names the layers farthest outside the
    band at the last snapshot.
    """
    values = np.asarray(alphas, dtype=np.float64)
    if values.shape != (len(layer_names), len(steps)):
        raise ValueError(f"alphas has shape {values.shape}, expected ({len(layer_names)}, {len(steps)})")
    vmin, vmax = alpha_color_range(values)
    fig, ax = _figure_and_axes(ax, heatmap_size(len(layer_names), len(steps)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap=_band_colormap(vmin, vmax), vmin=vmin, vmax=vmax,
                   aspect="auto", interpolation="nearest")
    if reliable is not None:
        unreliable = ~np.asarray(reliable, dtype=bool) & np.isfinite(values)
        rows, cols = np.nonzero(unreliable)
        if rows.size:
            ax.plot(cols, rows, linestyle="none", marker=".", color="black", markersize=3,
                    label="fit not reliable (too few eigenvalues or tail points)")
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.08), fontsize="small", frameon=False)
    _label_rows(ax, list(layer_names))
    _label_steps(ax, list(steps))
    ax.set_xlabel("training step")
    finite = values[np.isfinite(values)]
    outside = int(((finite < vmin) | (finite > vmax)).sum())
    lines = [f"alpha per layer (band {ALPHA_GOOD_BAND[0]:g}-{ALPHA_GOOD_BAND[1]:g}: light grey)"]
    worst = worst_layers(layer_names, values[:, -1].tolist(), count=2) if len(steps) else []
    if worst:
        lines.append("worst at the last snapshot: " + ", ".join(f"{n} ({a:.2f})" for n, a in worst))
    if outside:
        lines.append(f"{outside} cell(s) beyond the colour range [{vmin:.3g}, {vmax:.3g}]")
    title = "\n".join(lines)
    ax.set_title(title, fontsize="small")
    fig.colorbar(im, ax=ax, label="alpha", extend="both", shrink=0.6)
    return fig


def _figure_and_axes(ax, figsize):
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(x)


def plot_esd(result, ax=None) -> Figure:
    """Histogram of a layer's ESD on log-log axes with the MP density and the power-law fit.

    ``result`` is a :class:`~ww_monitor.analysis.results.LayerResult` analysed with
    ``keep_eigenvalues=True``. Drawn: the density-normalised histogram of the positive
    eigenvalues (log-spaced bins), the Marchenko-Pastur density for ``mp_sigma`` with its
    edge ``lambda_plus`` (dashed), and the fitted power law ``rho ~ lambda^-alpha`` above
    ``xmin`` scaled to the share of eigenvalues in the tail (dotted line at ``xmin``).
    """
    fig, ax = _figure_and_axes(ax, (6.0, 4.0))
    ev = getattr(result, "eigenvalues", None)
    if ev is None:
        raise ValueError(f"layer {result.name!r} has no eigenvalues; analyse with keep_eigenvalues=True")
    ev = np.asarray(ev, dtype=np.float64)
    pos = ev[np.isfinite(ev) & (ev > 0)]
    if pos.size == 0:
        ax.text(0.5, 0.5, "no positive eigenvalues", transform=ax.transAxes, ha="center")
        ax.set_title(result.name)
        return fig
    lo, hi = pos.min(), pos.max()
    if hi <= lo:  # a single distinct value: widen so the bin has a width
        lo, hi = lo / 2.0, hi * 2.0
    decades = max(math.log10(hi / lo), 1.0)
    bins = np.geomspace(lo, hi, int(math.ceil(decades * _BINS_PER_DECADE)) + 1)
    # Density relative to *all* eigenvalues, so curves scaled by tail shares line up.
    counts, edges = np.histogram(pos, bins=bins)
    dens = counts / (ev.size * np.diff(edges))
    ax.bar(edges[:-1], dens, width=np.diff(edges), align="edge", color="#9db4d3", edgecolor="none",
           label="ESD", alpha=0.8)

    q = result.N / result.M if result.M else math.nan
    if _finite(result.mp_sigma) and _finite(q) and result.mp_sigma > 0:
        lam_m, lam_p = mp_edges(q, result.mp_sigma, result.N)
        grid = np.geomspace(max(lam_m, lo / 10.0), lam_p, _CURVE_POINTS)
        ax.plot(grid, mp_density(grid, q, result.mp_sigma, result.N), color="#dd8452", lw=2,
                label=f"MP, $\\sigma$={result.mp_sigma:.3g}")
    if _finite(result.lambda_plus):
        ax.axvline(result.lambda_plus, color="#dd8452", ls="--", lw=1, label="$\\lambda_+$")
    if _finite(result.alpha) and _finite(result.xmin) and result.xmin > 0:
        share = np.count_nonzero(ev >= result.xmin) / ev.size
        grid = np.geomspace(result.xmin, hi, _CURVE_POINTS)
        pl = share * (result.alpha - 1.0) / result.xmin * (grid / result.xmin) ** (-result.alpha)
        ax.plot(grid, pl, color="#c44e52", lw=2, label=f"power law, $\\alpha$={result.alpha:.2f}")
        ax.axvline(result.xmin, color="#c44e52", ls=":", lw=1, label="$x_{min}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # The MP density falls to zero at its edges; keep the axis on the histogram's range.
    shown = dens[dens > 0]
    ax.set_ylim(shown.min() / _Y_MARGIN, shown.max() * _Y_MARGIN)
    ax.set_xlabel("eigenvalue $\\lambda$ of $W^TW$")
    ax.set_ylabel("density")
    ax.set_title(f"{result.name}: {_counts(result)}", fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    return fig


def _counts(result) -> str:
    """How much a layer's fit rests on, for titles and labels."""
    n, tail = getattr(result, "num_evals", 0), getattr(result, "num_pl_spikes", 0)
    flag = "" if getattr(result, "reliable", True) else ", unreliable"
    return f"{n} eigenvalues, {tail} in the tail{flag}"


def plot_alpha_per_layer(layers: Sequence, ax=None) -> Figure:
    """Power-law alpha of each layer (in order) as bars, with the [2, 4] band shaded.

    ``layers`` is a sequence of :class:`~ww_monitor.analysis.results.LayerResult`; layers whose fit
    failed (NaN alpha) keep their slot and are marked with an ``x`` on the axis. Layers whose
    fit is not reliable are drawn hatched in grey, and every tick label carries the eigenvalue
    count and tail count (``n/tail``) the fit rests on.
    """
    layers = list(layers)
    fig, ax = _figure_and_axes(ax, (max(4.0, 0.35 * len(layers) + 2.0), 4.0))
    x = np.arange(len(layers))
    alphas = np.array([l.alpha if _finite(l.alpha) else np.nan for l in layers], dtype=np.float64)
    ok = np.isfinite(alphas)
    sure = ok & np.array([bool(getattr(l, "reliable", True)) for l in layers], dtype=bool)
    ax.axhspan(*ALPHA_GOOD_BAND, color="#55a868", alpha=0.15, label="$\\alpha \\in [2, 4]$")
    ax.bar(x[sure], alphas[sure], color="#4c72b0", label="$\\alpha$")
    if (ok & ~sure).any():
        ax.bar(x[ok & ~sure], alphas[ok & ~sure], color=_UNRELIABLE_COLOR, hatch="//", edgecolor="#777777",
               label="$\\alpha$ (unreliable: few eigenvalues)")
    if (~ok).any():
        ax.plot(x[~ok], np.zeros((~ok).sum()), "x", color="#c44e52", label="fit failed")
    ax.set_xticks(x, [f"{l.name} ({l.num_evals}/{l.num_pl_spikes})" for l in layers], rotation=90, fontsize="small")
    ax.set_xlabel("layer (eigenvalues / tail eigenvalues)")
    ax.set_ylabel("$\\alpha$")
    ax.set_title("power-law $\\alpha$ per layer")
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_phase_heatmap(
    layer_names: list[str], steps: list[int], phases: list[list[Phase | None]], ax=None,
) -> Figure:
    """Phase of each layer (rows) at each snapshot (columns), one fixed colour per phase.

    ``phases[i][j]`` is the :class:`~ww_monitor.analysis.phases.Phase` (or its string value,
    ``"undetermined"`` when analysed with too few eigenvalues for a phase, or None when not
    analysed) of ``layer_names[i]`` at training step ``steps[j]``.
    """
    if len(phases) != len(layer_names):
        raise ValueError(f"phases has {len(phases)} rows for {len(layer_names)} layer names")
    for i, row in enumerate(phases):
        if len(row) != len(steps):
            raise ValueError(f"row {i} of phases has {len(row)} entries for {len(steps)} steps")
    order = list(Phase)
    undetermined = len(order) + 1
    codes = np.zeros((len(layer_names), len(steps)), dtype=np.int64)  # 0 = missing
    for i, row in enumerate(phases):
        for j, p in enumerate(row):
            if p is not None:
                codes[i, j] = undetermined if p == UNDETERMINED else order.index(Phase(p)) + 1
    cmap = ListedColormap([_MISSING_COLOR] + [PHASE_COLORS[p] for p in order] + [_UNDETERMINED_COLOR])
    fig, ax = _figure_and_axes(ax, heatmap_size(len(layer_names), len(steps)))
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=undetermined + 0.5, aspect="auto", interpolation="nearest")
    _label_steps(ax, list(steps))
    _label_rows(ax, list(layer_names))
    ax.set_xlabel("training step")
    ax.set_title("phase per layer")
    handles = [Patch(facecolor=PHASE_COLORS[p], edgecolor="black", label=p.value) for p in order]
    if (codes == 0).any():
        handles.append(Patch(facecolor=_MISSING_COLOR, edgecolor="black", label="not analysed"))
    if (codes == undetermined).any():
        handles.append(Patch(facecolor=_UNDETERMINED_COLOR, edgecolor="black",
                             label=f"{UNDETERMINED} (too few eigenvalues)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig
