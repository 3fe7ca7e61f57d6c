"""Alpha of every layer: a bar per layer (one snapshot) and a layer x snapshot heatmap.

Both share one colour code for the band :data:`~.worst_layers.ALPHA_GOOD_BAND`: red below 2
(very heavy tails, often over-fitted), grey inside [2, 4], blue above 4 (random-like,
under-trained), and one row per layer in model order with its displayed name
(:mod:`.figure_layout`), so 44 or 200 layers stay legible. Their titles name the worst layers by
the one ranking of :mod:`.worst_layers`. Matplotlib's object-oriented API only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .display_names import display_names
from .figure_layout import (
    LABEL_FONT,
    TITLE_FONT,
    block_separators,
    figure_and_axes,
    heatmap_size,
    label_rows,
    label_steps,
    label_width,
    rows_height,
    wrap_title,
)
from .worst_layers import ALPHA_GOOD_BAND, WORST_LISTED, worst_layers

__all__ = [
    "plot_alpha_per_layer",
    "plot_alpha_heatmap",
    "alpha_color_range",
    "worst_title",
    "ALPHA_COLOR_FLOOR",
    "ALPHA_COLOR_CEILING",
    "BAND_COLORS",
]

#: Colour range of the alpha heatmap: at least the band and its neighbours [1.5, 6] (so a run
#: inside the band is not stretched across the whole scale), at most [1, 10] (one alpha of 40
#: must not squash the band into one colour); values beyond are drawn in the end colours and
#: counted in the title.
ALPHA_COLOR_FLOOR = (1.5, 6.0)
ALPHA_COLOR_CEILING = (1.0, 10.0)
#: Bar colours by side of the band (the heatmap's colours at the band edges).
BAND_COLORS = {"below": "#d6604d", "inside": "#bababa", "above": "#4393c3"}
#: Bars of layers whose fit is not reliable: white, hatched, grey edge.
_UNRELIABLE_EDGE = "#777777"
#: Cells of the heatmap without a value (layer not analysed at that snapshot, or failed fit).
_MISSING_COLOR = "#ffffff"
#: Width of the alpha bar chart (inches) besides its labels.
_BARS_WIDTH = 6.5


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


def _band_colormap(vmin: float, vmax: float):
    """Reds below the band, light greys inside it, blues above: a step at each band edge, so a
    cell's side of the band reads at a glance."""
    from matplotlib.colors import LinearSegmentedColormap

    lo, hi = ALPHA_GOOD_BAND
    span = vmax - vmin
    p_lo = min(max((lo - vmin) / span, 0.001), 0.998)
    p_hi = min(max((hi - vmin) / span, p_lo + 0.001), 0.999)
    nodes = [
        (0.0, "#67001f"),
        (p_lo, "#f4a582"),
        (p_lo, "#e6e6e6"),
        (p_hi, "#c4c4c4"),
        (p_hi, "#92c5de"),
        (1.0, "#053061"),
    ]
    cmap = LinearSegmentedColormap.from_list("ww_alpha_band", nodes)
    return cmap.with_extremes(bad=_MISSING_COLOR)


def worst_title(names: Sequence[str], shown: Sequence[str], step, alphas, tails=None, reliable=None) -> str | None:
    """The "worst at step ..." line of the alpha figures (None when every reliable layer is in the band)."""
    display = dict(zip(names, shown))
    worst = worst_layers(names, alphas, tails, reliable, count=WORST_LISTED)
    if not worst:
        return None
    ranked = "standard errors outside the band" if tails is not None else "distance to the band"
    return f"worst at step {step} (by {ranked}): " + ", ".join(
        f"{display[o.name]} {o.alpha:.2f}" + (f" (tail {o.tail})" if o.tail is not None else "") for o in worst
    )


def plot_alpha_heatmap(
    layer_names: Sequence[str],
    steps: Sequence[int],
    alphas,
    reliable=None,
    ax=None,
    tails=None,
) -> Figure:
    """Alpha of each layer (rows, model order, blocks separated by lines) at each snapshot (columns).

    Colours by side of :data:`ALPHA_GOOD_BAND` (inside light grey, below red: very heavy tails,
    often over-fitted; above blue: random-like, under-trained), limits from
    :func:`alpha_color_range` (values outside drawn in the end colours and counted in the title);
    NaN cells (not analysed or failed fit) white; layers whose fit is not reliable at that snapshot
    (``reliable[i, j]`` false) marked with a dot. The title names the worst layers at the last
    snapshot (:func:`~.worst_layers.worst_layers`; ``tails``: their tail sizes at that snapshot).
    """
    values = np.asarray(alphas, dtype=np.float64)
    if values.shape != (len(layer_names), len(steps)):
        raise ValueError(f"alphas has shape {values.shape}, expected ({len(layer_names)}, {len(steps)})")
    shown = display_names(layer_names)
    vmin, vmax = alpha_color_range(values)
    fig, ax = figure_and_axes(ax, heatmap_size(len(layer_names), len(steps), shown))
    im = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=_band_colormap(vmin, vmax),
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    lines = [
        f"alpha per layer: grey inside the band [{ALPHA_GOOD_BAND[0]:g}, {ALPHA_GOOD_BAND[1]:g}], red below, blue above"
    ]
    last_reliable = None
    if reliable is not None:
        rel = np.asarray(reliable, dtype=bool)
        last_reliable = rel[:, -1] if len(steps) else None
        rows, cols = np.nonzero(~rel & np.isfinite(values))
        if rows.size:
            ax.plot(cols, rows, linestyle="none", marker=".", color="black", markersize=3)
            lines.append("dot: fit not reliable (too few eigenvalues or tail points)")
    label_rows(ax, layer_names, shown)
    block_separators(ax, shown)
    label_steps(ax, list(steps))
    finite = values[np.isfinite(values)]
    outside = int(((finite < vmin) | (finite > vmax)).sum())
    if len(steps):
        worst = worst_title(list(layer_names), shown, steps[-1], values[:, -1].tolist(), tails, last_reliable)
        if worst:
            lines.append(worst)
    if outside:
        lines.append(f"{outside} cell(s) beyond the colour range [{vmin:.3g}, {vmax:.3g}]")
    ax.set_title(wrap_title(lines, fig.get_figwidth()), fontsize=TITLE_FONT)
    cbar = fig.colorbar(im, ax=ax, extend="both", shrink=min(0.6, 6.0 / fig.get_figheight()), aspect=25)
    cbar.set_label("alpha", fontsize=LABEL_FONT)
    cbar.ax.tick_params(labelsize=LABEL_FONT)
    return fig


def plot_alpha_per_layer(layers: Sequence, ax=None, step=None) -> Figure:
    """Power-law alpha of each layer as a horizontal bar, one row per layer in model order.

    ``layers`` are :class:`~ww_monitor.analysis.results.LayerResult`. Bars are coloured by side of
    the band (:data:`BAND_COLORS`: red < 2, grey in [2, 4], blue > 4), the band is shaded; fits
    that are not reliable are white and hatched; each bar is annotated with its alpha and the
    eigenvalue / tail counts the fit rests on; a failed fit keeps its row, marked "fit failed".
    Alphas beyond the axis (10) end in a ``>`` at the edge with their value written. The colour key
    sits beside the axes, never on the bars.
    """
    layers = list(layers)
    names = [l.name for l in layers]
    shown = display_names(names)
    figsize = (label_width(shown) + _BARS_WIDTH, rows_height(len(layers)))
    fig, ax = figure_and_axes(ax, figsize)
    y = np.arange(len(layers))
    alphas = np.array([l.alpha if _finite(l.alpha) else np.nan for l in layers], dtype=np.float64)
    ok = np.isfinite(alphas)
    sure = ok & np.array([bool(getattr(l, "reliable", True)) for l in layers], dtype=bool)
    top = ALPHA_COLOR_CEILING[1]
    xmax = min(top, max(6.0, float(np.nanmax(alphas)) * 1.05 if ok.any() else 6.0))
    lo, hi = ALPHA_GOOD_BAND
    ax.axvspan(lo, hi, color="#55a868", alpha=0.12, zorder=0)
    colors = [
        BAND_COLORS["below"] if a < lo else BAND_COLORS["above"] if a > hi else BAND_COLORS["inside"]
        for a in np.nan_to_num(alphas)
    ]
    width = np.minimum(np.nan_to_num(alphas), xmax)
    ax.barh(y[sure], width[sure], color=[colors[i] for i in np.nonzero(sure)[0]], height=0.75, zorder=2)
    unsure = ok & ~sure
    if unsure.any():
        ax.barh(y[unsure], width[unsure], color="white", hatch="///", edgecolor=_UNRELIABLE_EDGE, height=0.75, zorder=2)
    font = label_rows(ax, names, shown)
    for i, l in enumerate(layers):
        counts = f"({l.num_evals}/{l.num_pl_spikes})"
        if not ok[i]:
            text, x = f"fit failed {counts}", 0.05
        else:
            text, x = f"{alphas[i]:.2f} {counts}", width[i] + 0.08
            if alphas[i] > xmax:
                ax.plot([xmax], [i], marker=">", color="black", markersize=font * 0.8, zorder=3)
                x += 0.25
        ax.text(x, i, text, va="center", ha="left", fontsize=font, zorder=4, clip_on=False)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top, like the heatmap
    ax.set_xlim(0.0, xmax * 1.45)  # room for the annotations right of the longest bar
    block_separators(ax, shown, color="#999999")
    ax.tick_params(axis="x", labelsize=LABEL_FONT)
    ax.set_xlabel("power-law alpha (annotation: alpha (eigenvalues/tail eigenvalues))", fontsize=LABEL_FONT + 1)
    title = "power-law alpha per layer" + (f" at step {step}" if step is not None else "")
    worst = worst_title(
        names,
        shown,
        step if step is not None else "this snapshot",
        alphas.tolist(),
        [l.num_pl_spikes for l in layers],
        sure.tolist(),
    )
    ax.set_title(wrap_title([title] + ([worst] if worst else []), figsize[0]), fontsize=TITLE_FONT)
    handles = [
        Patch(facecolor=BAND_COLORS["below"], label=f"alpha < {lo:g}"),
        Patch(facecolor=BAND_COLORS["inside"], label=f"alpha in [{lo:g}, {hi:g}] (shaded band)"),
        Patch(facecolor=BAND_COLORS["above"], label=f"alpha > {hi:g}"),
        Patch(facecolor="white", hatch="///", edgecolor=_UNRELIABLE_EDGE, label="fit not reliable"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=LABEL_FONT, frameon=False)
    return fig


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(x)
