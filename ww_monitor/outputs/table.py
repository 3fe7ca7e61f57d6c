"""The text table of ``ww-monitor analyze``: rows chosen and ordered, columns fitted to a width.

Column headers are the CSV/JSON names (``Report.to_dicts()`` keys, in their order). The default
columns are :data:`TABLE_COLUMNS` plus the option columns (:data:`OPTION_COLUMNS`) any layer has.
Given a ``width`` (the terminal's, see :func:`terminal_width`), columns that do not fit are left
out, lowest priority first (:data:`KEEP_PRIORITY`), and a note under the table names them; if the
layer names alone are too wide, they are shortened in the middle (``model.layers.1…proj``) and the
note says so. Every other line (skipped layers, summary, notes) is wrapped to the width.

Rows: :func:`select_rows` sorts by any column (``--sort``) or keeps the ``worst`` layers by how
many standard errors of its fit alpha lies outside [2, 4] (the ranking of the TensorBoard and
report figures, :func:`ww_monitor.outputs.worst_layers.worst_layers`).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence

from ..errors import WWMonitorError
from .display_names import display_name_map

__all__ = [
    "TABLE_COLUMNS",
    "OPTION_COLUMNS",
    "KEEP_PRIORITY",
    "table_columns",
    "check_column",
    "parse_columns",
    "select_rows",
    "format_table",
    "terminal_width",
]

#: Columns of the default table: a subset of the CSV/JSON columns, under the same names and in the
#: same order, so one vocabulary serves every format.
TABLE_COLUMNS = (
    "name",
    "kind",
    "N",
    "M",
    "num_evals",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "rank_loss",
    "alpha",
    "D",
    "num_pl_spikes",
    "alpha_weighted",
    "reliable",
    "num_spikes",
    "phase",
)
#: Columns of the options (``--detX``, ``--fit TPL``, ...), shown when any layer has them.
OPTION_COLUMNS = ("detX_num", "ERG_gap", "num_fingers", "Lambda", "rand_distance", "ww_softrank")
#: Which columns stay when the table is too wide, most important first; the last ones are left
#: out first. The layer, its alpha and how much that alpha rests on (tail size, reliable), its
#: phase, then what the user asked for with an option, then size and norm context.
KEEP_PRIORITY = (
    "name",
    "alpha",
    "num_pl_spikes",
    "reliable",
    "phase",
    *OPTION_COLUMNS,
    "num_evals",
    "kind",
    "alpha_weighted",
    "rank_loss",
    "N",
    "M",
    "log_spectral_norm",
    "stable_rank",
    "num_spikes",
    "D",
    "log_norm",
)
#: Columns never left out: without them a row says nothing.
_ALWAYS = ("name", "alpha")
#: Spaces between columns.
COLUMN_GAP = 2
#: A layer name is never shortened below this many characters (then the line is left long).
MIN_NAME_WIDTH = 12
_ELLIPSIS = "…"


def terminal_width() -> int | None:
    """The width to fit: ``$COLUMNS`` when set, else the terminal's when stdout is one, else None
    (output to a file or a pipe is not cut)."""
    if os.environ.get("COLUMNS", "").strip() or _stdout_is_terminal():
        return shutil.get_terminal_size().columns
    return None


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def table_columns(dicts) -> list[str]:
    """Default columns for these rows: :data:`TABLE_COLUMNS`, then the option columns any row has,
    all ordered as in :data:`ww_monitor.analysis.results.LAYER_COLUMNS` (the CSV/JSON order)."""
    from ..analysis.results import LAYER_COLUMNS

    wanted = set(TABLE_COLUMNS) | {k for k in OPTION_COLUMNS if any(d.get(k) is not None for d in dicts)}
    return [c for c in LAYER_COLUMNS if c in wanted]


def check_column(name: str, what: str) -> str:
    """``name`` if it is a CSV/JSON column, else a :class:`WWMonitorError` with the closest one."""
    import difflib

    from ..analysis.results import LAYER_COLUMNS

    if name not in LAYER_COLUMNS:
        close = difflib.get_close_matches(name, LAYER_COLUMNS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"columns: {', '.join(LAYER_COLUMNS)}"
        raise WWMonitorError(f"{what}: no column {name!r}; {hint}")
    return name


def parse_columns(text: str | None) -> list[str] | None:
    """``--columns``: None (default columns, fitted), ``"all"`` (every default column, not
    fitted: returned as ``["all"]``) or a comma-separated list of CSV/JSON column names (shown as
    given, ``name`` first)."""
    if text is None:
        return None
    if text.strip() == "all":
        return ["all"]
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise WWMonitorError("--columns: give 'all' or a comma-separated list of columns, e.g. name,alpha,phase")
    names = [check_column(c, "--columns") for c in names]
    return (["name"] if "name" not in names else []) + list(dict.fromkeys(names))


def _sort_value(column: str, value):
    """Sort key of one cell: missing and NaN values last; phases in the order of training."""
    from ..analysis.phases import Phase

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0)
    if column == "phase":
        return (0, list(Phase).index(Phase(value)))
    return (0, value)


def select_rows(
    dicts: list[dict], *, sort: str | None = None, descending: bool = False, worst: int | None = None
) -> tuple[list[dict], str]:
    """The rows to show, in order, and a note saying how they were chosen ("" for all, model order).

    ``worst``: the layers farthest outside the alpha band, worst first (layers inside it are not
    listed); ``sort``: then (or else) ordered by that column, missing values last."""
    note = ""
    rows = list(dicts)
    if worst is not None:
        from .worst_layers import ALPHA_GOOD_BAND, worst_layers

        ranked = worst_layers(
            [d["name"] for d in rows],
            [d["alpha"] for d in rows],
            tails=[d["num_pl_spikes"] for d in rows],
            reliable=[d["reliable"] for d in rows],
            count=worst,
        )
        by_name = {d["name"]: d for d in rows}
        lo, hi = ALPHA_GOOD_BAND
        note = (
            f"the {len(ranked)} of {len(rows)} layers farthest outside alpha in [{lo:g}, {hi:g}] in standard "
            f"errors of their fit, worst first; reliable fits only"
            f"{' (no other is outside the band)' if len(ranked) < min(worst, len(rows)) else ''}"
        )
        rows = [by_name[o.name] for o in ranked]
    if sort is not None:
        check_column(sort, "--sort")
        missing = [d for d in rows if _sort_value(sort, d.get(sort))[0]]
        present = sorted(
            (d for d in rows if not _sort_value(sort, d.get(sort))[0]),
            key=lambda d: _sort_value(sort, d.get(sort)),
            reverse=descending,
        )
        rows = present + missing  # stable: ties keep the model (or worst-first) order
        note = (note + "; " if note else "") + f"sorted by {sort}{' (descending)' if descending else ''}"
    return rows, note


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _line_width(widths: Sequence[int]) -> int:
    return sum(widths) + COLUMN_GAP * (len(widths) - 1)


def _fit(columns: list[str], cells: dict[str, list[str]], width: int) -> tuple[list[str], list[str]]:
    """(columns kept in display order, columns left out) so that a row fits ``width``."""
    widths = {c: max(len(s) for s in cells[c]) for c in columns}
    kept = list(columns)
    for c in reversed([c for c in KEEP_PRIORITY if c in columns] + [c for c in columns if c not in KEEP_PRIORITY]):
        if _line_width([widths[k] for k in kept]) <= width:
            break
        if c not in _ALWAYS:
            kept.remove(c)
    return kept, [c for c in columns if c not in kept]


def _shorten(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters (its start and its end stay)."""
    if len(text) <= width:
        return text
    head = (width - len(_ELLIPSIS)) // 2  # the end keeps the extra character: it names the matrix
    tail = width - len(_ELLIPSIS) - head
    return text[:head] + _ELLIPSIS + text[len(text) - tail :]


def _wrap(text: str, width: int | None, indent: str = "") -> list[str]:
    if width is None:
        return [text]
    return textwrap.wrap(text, width=width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def format_table(
    report,
    *,
    width: int | None = None,
    columns: list[str] | None = None,
    sort: str | None = None,
    descending: bool = False,
    worst: int | None = None,
) -> str:
    """Fixed-width text table, one row per analysed layer (model order unless ``sort``/``worst``),
    then skipped layers and the summary; every line at most ``width`` characters (None: no limit).
    ``columns``: :func:`parse_columns`' result (None: the default columns, fitted to ``width``)."""
    dicts, note = select_rows(report.to_dicts(), sort=sort, descending=descending, worst=worst)
    default = table_columns(report.to_dicts())
    shown = default if columns is None or columns == ["all"] else columns
    cells: dict[str, list[str]] = {c: [c] for c in shown}
    # Displayed names leave out the wrapper prefix (``model.model.``...): one rule for every view.
    every = [d["name"] for d in dicts] + [a for d in dicts for a in d["aliases"]] + [s.name for s in report.skipped]
    short = display_name_map(every)
    for layer in dicts:
        name = short[layer["name"]]
        if layer["aliases"]:  # a tied weight, analysed once: name its other owners too
            name += f" (= {', '.join(short[a] for a in layer['aliases'])})"
        for c in shown:
            cells[c].append(name if c == "name" else _fmt(layer.get(c)))
    notes = [note] if note else []
    if any(short[n] != n for n in every):
        notes.append("layer names without their wrapper prefix (model., module., ...); --format csv has them whole")
    if width is not None and columns is None:
        shown, dropped = _fit(shown, cells, width)
        if dropped:
            notes.append(f"left out to fit {width} columns: {', '.join(dropped)} (--columns all shows them)")
        others = _line_width([max(len(s) for s in cells[c]) for c in shown if c != "name"] + [0])
        room = width - others
        longest = max(len(s) for s in cells["name"])
        if longest > room >= MIN_NAME_WIDTH:
            cells["name"] = [_shorten(s, room) for s in cells["name"]]
            notes.append(
                f"layer names longer than {room} characters are shortened in the middle ({_ELLIPSIS}); "
                "--format csv has them whole"
            )
    widths = [max(len(s) for s in cells[c]) for c in shown]
    lines = [
        (" " * COLUMN_GAP).join(cells[c][i].ljust(w) for c, w in zip(shown, widths)).rstrip()
        for i in range(len(dicts) + 1)
    ]
    for text in notes:
        lines.extend(_wrap(f"({text})", width))
    if report.skipped:
        lines.append("")
        lines.append(f"skipped {len(report.skipped)} layer(s):")
        for s in report.skipped:
            lines.extend(_wrap(f"  {short[s.name]} {list(s.shape)}: {s.reason}", width, indent="    "))
    summary = report.summary()
    lines.append("")
    lines.extend(_wrap("summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()), width, indent="  "))
    return "\n".join(lines)
