"""The phase of every layer over training: a layer x snapshot map with its own colours and key.

The phases (:mod:`ww_monitor.analysis.phases`, ``docs/phases.md``) describe the *shape* of a
layer's ESD, in the order training moves through them. Their colours run from purple (random-like,
nothing learned) through teal and green to yellow (heavy-tailed): hues the alpha figures do not use,
so a heavy-tailed cell is never read as the alpha heatmap's red ("alpha < 2"). The key says which
phases are healthy after training, and why a layer outside the alpha band can still be
heavy-tailed: the phase asks for a power-law tail with alpha <= 6 reaching past twice the
Marchenko-Pastur edge (or no MP bulk at all), a wider range than the band [2, 4]. Matplotlib's object-oriented API only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..analysis.phases import HEAVY_TAILED_MAX_ALPHA, UNDETERMINED, Phase
from .display_names import display_names
from .figure_layout import (
    LABEL_FONT,
    TITLE_FONT,
    block_separators,
    figure_and_axes,
    heatmap_size,
    label_rows,
    label_steps,
    wrap_title,
)

__all__ = ["plot_phase_heatmap", "PHASE_COLORS", "PHASE_MEANING"]

#: Fixed colour per phase, ordered as training moves through them (purple = nothing learned ->
#: yellow = heavy-tailed; near-black = collapsed), so maps of different runs read the same. No red,
#: blue or light grey: those mean "below / above / inside the alpha band" in the alpha figures.
PHASE_COLORS = {
    Phase.RANDOM_LIKE: "#3f007d",
    Phase.BLEEDING_OUT: "#807dba",
    Phase.BULK_PLUS_SPIKES: "#1b7837",
    Phase.BULK_DECAY: "#7fbc41",
    Phase.HEAVY_TAILED: "#fdd835",
    Phase.RANK_COLLAPSE: "#1a1a1a",
}
#: What each phase says about a layer, shown in the key (Martin & Mahoney 2021: well-trained
#: layers end bulk-decay or heavy-tailed).
PHASE_MEANING = {
    Phase.RANDOM_LIKE: "nothing learned yet",
    Phase.BLEEDING_OUT: "starting to learn",
    Phase.BULK_PLUS_SPIKES: "a few learned directions",
    Phase.BULK_DECAY: "trained (healthy)",
    Phase.HEAVY_TAILED: f"trained (healthy; tail alpha <= {HEAVY_TAILED_MAX_ALPHA:g})",
    Phase.RANK_COLLAPSE: "lost rank (a problem)",
}
#: Cells of a layer not analysed at that snapshot.
_MISSING_COLOR = "#ffffff"
#: Cells of a layer analysed without a phase (too few eigenvalues: undetermined); a light tan,
#: distinct from the alpha band's grey.
_UNDETERMINED_COLOR = "#e3d3b4"


def plot_phase_heatmap(
    layer_names: Sequence[str],
    steps: Sequence[int],
    phases: Sequence[Sequence],
    ax=None,
) -> Figure:
    """Phase of each layer (rows, blocks separated by lines) at each snapshot (columns).

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
    shown = display_names(layer_names)
    cmap = ListedColormap([_MISSING_COLOR] + [PHASE_COLORS[p] for p in order] + [_UNDETERMINED_COLOR])
    size = heatmap_size(len(layer_names), len(steps), shown)
    fig, ax = figure_and_axes(ax, (size[0] + 1.5, size[1]))  # the key is wider than a colour bar
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=undetermined + 0.5, aspect="auto", interpolation="nearest")
    label_rows(ax, layer_names, shown)
    block_separators(ax, shown)
    label_steps(ax, list(steps))
    title = [
        "phase per layer: the shape of its ESD (docs/phases.md)",
        f"heavy-tailed = a power-law tail with alpha <= {HEAVY_TAILED_MAX_ALPHA:g} reaching past 2x the random "
        "(Marchenko-Pastur) edge, or no random bulk at all; wider than the alpha band [2, 4], so layers "
        f"outside the band can be heavy-tailed (a tail with alpha > {HEAVY_TAILED_MAX_ALPHA:g} makes it bulk-decay)",
    ]
    ax.set_title(wrap_title(title, fig.get_figwidth() * 0.75), fontsize=TITLE_FONT)
    handles = [
        Patch(facecolor=PHASE_COLORS[p], edgecolor="black", label=f"{p.value}: {PHASE_MEANING[p]}") for p in order
    ]
    if (codes == 0).any():
        handles.append(Patch(facecolor=_MISSING_COLOR, edgecolor="black", label="not analysed"))
    if (codes == undetermined).any():
        handles.append(
            Patch(facecolor=_UNDETERMINED_COLOR, edgecolor="black", label=f"{UNDETERMINED} (too few eigenvalues)")
        )
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=LABEL_FONT,
        title="phase, in training order",
        title_fontsize=LABEL_FONT,
        frameon=False,
    )
    return fig
