"""``ww-monitor`` command line.

* ``ww-monitor analyze PATH [--format table|csv|json] [--columns LIST] [--sort COLUMN]
  [--worst N] [--plot DIR]``: one row per layer; the table fits the terminal width
  (:mod:`ww_monitor.outputs.table`); with ``--plot`` also PNG figures (alpha per layer, ESD with
  fits of up to ``--max-plots`` layers).
* ``ww-monitor report LOGDIR_OR_CKPT [--out report.html]``: a self-contained HTML report of a
  monitored run (TensorBoard log folder, checkpoint with the callback's history, or model file);
  see :mod:`ww_monitor.outputs.offline_report`.
* ``ww-monitor plan CONFIG_OR_CHECKPOINT [--ranks N] [--device cpu|cuda] ...``: what monitoring a
  model will cost per snapshot, from its shapes alone (:mod:`ww_monitor.outputs.plan_cli`).

While layers are analysed a progress bar is drawn on stderr, only when stderr is a terminal.
Results go to stdout; notes (files written) to stderr. User errors (missing, unreadable,
corrupt, unsafe or unsupported files; bad options) print one line to stderr and exit with
status 2; no traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence

from ..errors import WWMonitorError
from ..functional.fingers import DEFAULT_FINGER_THRESH, DEFAULT_MAX_FINGERS
from .plan_cli import add_plan_parser, run_plan
from .table import KEEP_PRIORITY, check_column, format_table, parse_columns, select_rows, terminal_width

__all__ = ["main"]

EXIT_USER_ERROR = 2
#: ``analyze --plot``: ESD figures for at most this many layers unless ``--max-plots`` says otherwise.
DEFAULT_MAX_PLOTS = 12


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ww-monitor", description="Spectral (ESD) analysis of neural network weights."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="analyse a checkpoint (.ckpt, .pt/.pth/.bin, .safetensors, or a folder)")
    a.add_argument("path", help="checkpoint file or folder of checkpoint files")
    a.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    a.add_argument(
        "--columns",
        metavar="LIST",
        default=None,
        help="table (and CSV) columns: 'all', or a comma-separated list of CSV/JSON column names. "
        "Default: the table fits the terminal width ($COLUMNS), leaving out columns in the order "
        f"{', '.join(reversed(KEEP_PRIORITY[2:]))}",
    )
    a.add_argument(
        "--sort", metavar="COLUMN", default=None, help="order the layers by this column (default: model order)"
    )
    a.add_argument("--descending", action="store_true", help="with --sort: largest first")
    a.add_argument(
        "--worst",
        type=_positive,
        metavar="N",
        default=None,
        help="only the N layers farthest outside alpha in [2, 4] in standard errors of their fit "
        "(reliable fits only), worst first",
    )
    a.add_argument(
        "--include", action="append", default=None, metavar="REGEX", help="only layers whose name matches (repeatable)"
    )
    a.add_argument(
        "--exclude", action="append", default=None, metavar="REGEX", help="skip layers whose name matches (repeatable)"
    )
    a.add_argument(
        "--conv-mode",
        choices=("pooled", "slices"),
        default="pooled",
        help="one ESD per conv layer, or per kernel position",
    )
    a.add_argument("--traps", action="store_true", help="also count correlation traps (slower)")
    # weightwatcher 0.7.7's options, same names (see ww_monitor.analyze)
    a.add_argument(
        "--detX",
        "--ERG",
        dest="detX",
        action="store_true",
        help="det X = 1 tail (SETOL): detX_num, detX_val, ERG_gap columns",
    )
    a.add_argument(
        "--fix-fingers",
        choices=("xmin_peak", "clip_xmax"),
        default=None,
        help="fix power-law fits thrown off by a few outlying eigenvalues",
    )
    a.add_argument(
        "--max-fingers",
        type=_positive,
        default=DEFAULT_MAX_FINGERS,
        metavar="N",
        help=f"with --fix-fingers clip_xmax: most eigenvalues clipped (default: {DEFAULT_MAX_FINGERS})",
    )
    a.add_argument(
        "--finger-thresh",
        type=float,
        default=DEFAULT_FINGER_THRESH,
        metavar="X",
        help=f"with --fix-fingers clip_xmax: alpha must drop by more than X (default: {DEFAULT_FINGER_THRESH})",
    )
    a.add_argument(
        "--fit",
        choices=("PL", "TPL", "E_TPL"),
        default="PL",
        help="power law (default), truncated power law (adds Lambda), or TPL on the xmin_peak tail",
    )
    a.add_argument(
        "--randomize",
        action="store_true",
        help="compare with the ESD of the shuffled weights (rand_distance, ...); slower",
    )
    a.add_argument(
        "--peft",
        choices=("peft_only", "with_base", "auto"),
        default=None,
        help="LoRA adapters: only their updates, all layers plus updates and merged weights, or "
        "(auto) the base weights plus the updates",
    )
    a.add_argument(
        "--base-model",
        metavar="PATH",
        default=None,
        help="analyse the difference W - W_base to this checkpoint (a fine-tuning delta)",
    )
    a.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load pickled checkpoints with weights_only=False; can run code: only for files you trust",
    )
    a.add_argument(
        "--plot",
        metavar="DIR",
        default=None,
        help="also write PNG figures into DIR: alpha per layer and the ESD with fits of each layer",
    )
    a.add_argument(
        "--max-plots",
        type=_non_negative,
        default=DEFAULT_MAX_PLOTS,
        metavar="N",
        help=f"with --plot: ESD figures for at most N layers, spread over the depth "
        f"(default: {DEFAULT_MAX_PLOTS}; 0: none)",
    )

    r = sub.add_parser("report", help="HTML report of a monitored run (TensorBoard log folder or checkpoint)")
    r.add_argument(
        "path",
        metavar="LOGDIR_OR_CKPT",
        help="TensorBoard log folder or event file, .ckpt with WeightWatcherCallback state, or model file",
    )
    r.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    r.add_argument(
        "--esd-layers",
        action="append",
        default=None,
        metavar="REGEX",
        help="layers shown in the ESD section (repeatable; default: spread over the depth)",
    )
    r.add_argument(
        "--max-esd-layers",
        type=_non_negative,
        default=4,
        metavar="N",
        help="most layers in the ESD section (default: 4)",
    )
    r.add_argument(
        "--max-snapshots",
        type=_non_negative,
        default=8,
        metavar="N",
        help="most snapshots (columns) per ESD evolution heatmap (default: 8; 0: all)",
    )
    r.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load pickled checkpoints with weights_only=False; can run code: only for files you trust",
    )
    add_plan_parser(sub, _positive)
    return parser


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def format_csv(report, rows: list[dict] | None = None, columns: list[str] | None = None) -> str:
    """Every column (or ``columns``) of ``rows`` (default: every analysed layer, model order)."""
    from ..analysis.results import LAYER_COLUMNS

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or list(LAYER_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows if rows is not None else report.to_dicts():
        row = dict(row, aliases=";".join(row["aliases"]))  # tied weights: the other names of the tensor
        writer.writerow(row)
    return buf.getvalue()


def format_json(report, rows: list[dict] | None = None) -> str:
    """``Report.to_json`` with ``rows`` as its layers; the summary is always over every layer."""
    if rows is None:
        return report.to_json(indent=2)
    from ..analysis.results import strict_json_dumps

    payload = {"layers": rows, "skipped": [s.to_dict() for s in report.skipped], "summary": report.summary()}
    return strict_json_dumps(payload, indent=2)


def _show_progress() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def run_analysis(source, *, progress: bool | None = None, weights_only: bool = True, **options):
    """``wwm.analyze(source, **options)``, with a per-layer progress bar on stderr when
    ``progress`` (default: stderr is a terminal)."""
    from ..analysis.analyze import analyze

    if progress is None:
        progress = _show_progress()
    if not progress:
        return analyze(source, weights_only=weights_only, **options)
    from tqdm import tqdm

    with tqdm(desc="analysing", unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return analyze(source, weights_only=weights_only, progress=advance, **options)


def _analyze(args) -> int:
    columns = parse_columns(args.columns)  # option errors before a long analysis
    if args.sort is not None:
        check_column(args.sort, "--sort")
    elif args.descending:
        raise WWMonitorError("--descending orders the rows of --sort COLUMN; give --sort too")
    if args.format == "json" and columns not in (None, ["all"]):
        raise WWMonitorError("--columns selects columns of the table and the CSV; --format json keeps every field")
    if args.plot is not None and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        raise WWMonitorError(f"{args.plot}: exists and is not a folder (--plot wants a folder)")
    if os.path.isdir(args.path):
        from ..analysis.loading import checkpoint_files

        for note in checkpoint_files(args.path)[1]:
            print(f"ww-monitor: note: {note}", file=sys.stderr)
    report = run_analysis(
        args.path,
        include=args.include,
        exclude=args.exclude,
        conv_mode=args.conv_mode,
        traps=args.traps,
        weights_only=not args.unsafe_load,
        detX=args.detX,
        fix_fingers=args.fix_fingers,
        max_fingers=args.max_fingers,
        finger_thresh=args.finger_thresh,
        fit=args.fit,
        randomize=args.randomize,
        peft=args.peft or False,
        base_model=args.base_model,
    )
    if not report.layers and not report.skipped:
        raise WWMonitorError(f"{args.path}: no weight matrices found")
    if args.format == "table":
        out = format_table(
            report,
            width=terminal_width(),
            columns=columns,
            sort=args.sort,
            descending=args.descending,
            worst=args.worst,
        )
    else:  # csv and json: every row the options choose, never cut to a width
        rows = None
        if args.sort is not None or args.worst is not None:
            rows = select_rows(report.to_dicts(), sort=args.sort, descending=args.descending, worst=args.worst)[0]
        if args.format == "csv":
            out = format_csv(report, rows, None if columns in (None, ["all"]) else columns)
        else:
            out = format_json(report, rows)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    if args.plot is not None:
        from .offline_report import write_figures

        files = write_figures(report, args.plot, max_esd=args.max_plots)
        print(f"ww-monitor: wrote {len(files)} figure(s) to {args.plot}", file=sys.stderr)
    return 0


def _report(args) -> int:
    from .offline_report import write_report

    weights_only = not args.unsafe_load
    path = write_report(
        args.path,
        args.out,
        weights_only=weights_only,
        esd_layers=args.esd_layers,
        max_esd_layers=args.max_esd_layers,
        max_esd_snapshots=args.max_snapshots,
        analyze_fn=lambda state: run_analysis(state, weights_only=weights_only),
    )
    print(f"ww-monitor: report written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "report":
            return _report(args)
        if args.command == "plan":
            return run_plan(args)
    except WWMonitorError as err:
        print(f"ww-monitor: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ww-monitor: interrupted", file=sys.stderr)
        return 130
    return 1  # pragma: no cover - argparse guarantees a known command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
