"""Sizes, fonts and labels shared by the layer figures, so they stay legible from 5 to 200 layers.

One row per layer: a figure's height follows the layer count at :data:`ROW_INCHES` per row
(up to :data:`MAX_HEIGHT`), and every row is labelled with its displayed name
(:mod:`.display_names`) at :data:`LABEL_FONT` points, or smaller down to :data:`MIN_LABEL_FONT`
when the rows are capped; only beyond that every k-th row is labelled. Transformer blocks are
separated by lines (:func:`block_separators`). Matplotlib's object-oriented API only.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .display_names import display_names
from .layer_groups import block_of

__all__ = [
    "ROW_INCHES",
    "LABEL_FONT",
    "MIN_LABEL_FONT",
    "TITLE_FONT",
    "MAX_HEIGHT",
    "figure_and_axes",
    "rows_height",
    "heatmap_size",
    "label_rows",
    "label_steps",
    "block_separators",
    "wrap_title",
    "label_width",
]

#: Height of one layer row (inches): 11.5 pt, room for an 8 pt label.
ROW_INCHES = 0.16
#: Font size of row labels (points) and the smallest one used before labels are thinned out.
LABEL_FONT = 8.0
MIN_LABEL_FONT = 6.5
#: Line height of a label as a multiple of its font size (so labels never touch).
_LINE = 1.3
#: Title font size (points).
TITLE_FONT = 9.0
#: Figure height limits (inches): 30 in at 100 dpi = 3,000 px still holds 200 labelled rows.
MIN_HEIGHT, MAX_HEIGHT = 3.0, 30.0
#: Inches around the rows: title lines, the step axis with its label, margins.
_MARGIN_INCHES = 1.9
#: Width of one snapshot column of a heatmap, and the width limits (inches).
COL_INCHES = 0.45
MIN_WIDTH, MAX_WIDTH = 6.0, 18.0
#: Average character width as a share of the font size (DejaVu Sans), to size label columns.
_CHAR_WIDTH = 0.6
#: At most this many step ticks on a snapshot axis.
MAX_STEP_LABELS = 30


def figure_and_axes(ax, figsize):
    """``ax``'s figure and ``ax``, or a new constrained-layout figure of ``figsize`` and its axes."""
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax


def rows_height(num_rows: int) -> float:
    """Figure height (inches) for ``num_rows`` layer rows plus the margins."""
    return min(MAX_HEIGHT, max(MIN_HEIGHT, ROW_INCHES * num_rows + _MARGIN_INCHES))


def label_width(names: Sequence[str], font: float = LABEL_FONT) -> float:
    """Inches the longest of ``names`` takes at ``font`` points."""
    longest = max((len(n) for n in names), default=0)
    return longest * font * _CHAR_WIDTH / 72.0


def heatmap_size(num_rows: int, num_cols: int, names: Sequence[str] = ()) -> tuple[float, float]:
    """Figure size (inches) of a layer x snapshot heatmap: room for the labels, the columns and a
    colour bar or legend."""
    width = label_width(names) + COL_INCHES * num_cols + 3.0
    return min(MAX_WIDTH, max(MIN_WIDTH, width)), rows_height(num_rows)


def _row_pitch_points(ax, num_rows: int) -> float:
    """Points per row, from the figure's height (the axes get all of it but the margins)."""
    height = ax.figure.get_figheight() - _MARGIN_INCHES
    return max(height, 0.5) * 72.0 / max(num_rows, 1)


def label_rows(ax, layer_names: Sequence[str], shown: Sequence[str] | None = None) -> float:
    """Label the rows of ``ax`` (row i at y = i) with the displayed names; returns the font size.

    Every row gets a label at up to :data:`LABEL_FONT` points, as large as the row pitch allows;
    when even :data:`MIN_LABEL_FONT` does not fit, every k-th row is labelled at that size."""
    shown = list(shown) if shown is not None else display_names(layer_names)
    pitch = _row_pitch_points(ax, len(shown))
    font = min(LABEL_FONT, pitch / _LINE)
    every = 1
    if font < MIN_LABEL_FONT:
        font = MIN_LABEL_FONT
        every = math.ceil(MIN_LABEL_FONT * _LINE / pitch)
    idx = np.arange(0, len(shown), every)
    ax.set_yticks(idx, [shown[i] for i in idx], fontsize=font)
    return font


def label_steps(ax, steps: Sequence[int]) -> None:
    """Columns of ``ax`` are snapshots: label them with their training step (thinned out to at most
    :data:`MAX_STEP_LABELS`)."""
    every = max(1, math.ceil(len(steps) / MAX_STEP_LABELS))
    idx = np.arange(0, len(steps), every)
    ax.set_xticks(idx, [str(steps[int(i)]) for i in idx], rotation=90, fontsize=LABEL_FONT)
    ax.set_xlabel("snapshot (training step)", fontsize=LABEL_FONT + 1)


def block_separators(ax, layer_names: Sequence[str], color: str = "black") -> int:
    """Horizontal lines between consecutive rows of different blocks
    (:func:`~ww_monitor.outputs.layer_groups.block_of`); returns how many were drawn."""
    blocks = [block_of(n) for n in layer_names]
    drawn = 0
    for i in range(1, len(blocks)):
        if blocks[i] != blocks[i - 1]:
            ax.axhline(i - 0.5, color=color, lw=0.8, zorder=3)
            drawn += 1
    return drawn


def wrap_title(lines: Sequence[str], width_inches: float, font: float = TITLE_FONT) -> str:
    """Title lines wrapped to fit ``width_inches`` at ``font`` points."""
    chars = max(20, int(width_inches * 72.0 / (font * _CHAR_WIDTH)))
    return "\n".join(textwrap.fill(line, chars) for line in lines)
