"""Figures: one layer's ESD with its fits; alpha per layer and the phase of every layer over time.

:func:`plot_esd` lives here; the layer figures in :mod:`.alpha_figures` (alpha bars and heatmap)
and :mod:`.phase_map` (phase heatmap), re-exported here, with their shared layout in
:mod:`.figure_layout`.

Matplotlib's object-oriented API only: figures are :class:`matplotlib.figure.Figure` objects
created directly (never through ``pyplot``), so nothing here touches global state, picks a
backend or keeps figures alive in a registry. Each function draws into ``ax`` when given
(and returns its figure) or into a new figure otherwise; save with ``fig.savefig(path)``.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from ..functional.marchenko_pastur import mp_density, mp_edges
from .alpha_figures import (
    ALPHA_COLOR_CEILING,
    ALPHA_COLOR_FLOOR,
    alpha_color_range,
    plot_alpha_heatmap,
    plot_alpha_per_layer,
)
from .figure_layout import figure_and_axes as _figure_and_axes
from .figure_layout import heatmap_size
from .phase_map import PHASE_COLORS, plot_phase_heatmap
from .worst_layers import ALPHA_GOOD_BAND, worst_layers

__all__ = [
    "plot_esd",
    "plot_alpha_per_layer",
    "plot_phase_heatmap",
    "plot_alpha_heatmap",
    "PHASE_COLORS",
    "heatmap_size",
    "alpha_color_range",
    "worst_layers",
    "ALPHA_GOOD_BAND",
    "ALPHA_COLOR_FLOOR",
    "ALPHA_COLOR_CEILING",
]

# Histogram bins per decade of eigenvalue: enough to see the MP shape for M ~ 100-10,000.
_BINS_PER_DECADE = 12
_CURVE_POINTS = 400
# Factor of head-room above and below the histogram's densities on the log y axis.
_Y_MARGIN = 5.0


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(x)


def plot_esd(result, ax=None, name: str | None = None) -> Figure:
    """Histogram of a layer's ESD on log-log axes with the MP density and the power-law fit.

    ``result`` is a :class:`~ww_monitor.analysis.results.LayerResult` analysed with
    ``keep_eigenvalues=True``. Drawn: the density-normalised histogram of the positive
    eigenvalues (log-spaced bins), the Marchenko-Pastur density for ``mp_sigma`` with its
    edge ``lambda_plus`` (dashed), and the fitted power law ``rho ~ lambda^-alpha`` above
    ``xmin`` scaled to the share of eigenvalues in the tail (dotted line at ``xmin``). ``name``:
    the layer's displayed name in the title (default: its full name). The key sits beside the axes.
    """
    fig, ax = _figure_and_axes(ax, (7.8, 4.0))
    name = name or result.name
    ev = getattr(result, "eigenvalues", None)
    if ev is None:
        raise ValueError(f"layer {result.name!r} has no eigenvalues; analyse with keep_eigenvalues=True")
    ev = np.asarray(ev, dtype=np.float64)
    pos = ev[np.isfinite(ev) & (ev > 0)]
    if pos.size == 0:
        ax.text(0.5, 0.5, "no positive eigenvalues", transform=ax.transAxes, ha="center")
        ax.set_title(name)
        return fig
    lo, hi = pos.min(), pos.max()
    if hi <= lo:  # a single distinct value: widen so the bin has a width
        lo, hi = lo / 2.0, hi * 2.0
    decades = max(math.log10(hi / lo), 1.0)
    bins = np.geomspace(lo, hi, int(math.ceil(decades * _BINS_PER_DECADE)) + 1)
    # Density relative to *all* eigenvalues, so curves scaled by tail shares line up.
    counts, edges = np.histogram(pos, bins=bins)
    dens = counts / (ev.size * np.diff(edges))
    ax.bar(
        edges[:-1], dens, width=np.diff(edges), align="edge", color="#9db4d3", edgecolor="none", label="ESD", alpha=0.8
    )

    q = result.N / result.M if result.M else math.nan
    if _finite(result.mp_sigma) and _finite(q) and result.mp_sigma > 0:
        lam_m, lam_p = mp_edges(q, result.mp_sigma, result.N)
        grid = np.geomspace(max(lam_m, lo / 10.0), lam_p, _CURVE_POINTS)
        ax.plot(
            grid,
            mp_density(grid, q, result.mp_sigma, result.N),
            color="#dd8452",
            lw=2,
            label=f"MP, $\\sigma$={result.mp_sigma:.3g}",
        )
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
    ax.set_title(f"{name}: {_counts(result)}", fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def _counts(result) -> str:
    """How much a layer's fit rests on, for titles and labels."""
    n, tail = getattr(result, "num_evals", 0), getattr(result, "num_pl_spikes", 0)
    flag = "" if getattr(result, "reliable", True) else ", unreliable"
    return f"{n} eigenvalues, {tail} in the tail{flag}"
