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

__all__ = ["plot_esd", "plot_alpha_per_layer", "plot_phase_heatmap", "PHASE_COLORS"]

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
    fig, ax = _figure_and_axes(ax, (max(4.0, 0.5 * len(steps) + 4.0), max(3.0, 0.3 * len(layer_names) + 1.5)))
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=undetermined + 0.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(steps)), [str(s) for s in steps], rotation=90, fontsize="small")
    ax.set_yticks(np.arange(len(layer_names)), layer_names, fontsize="small")
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
