"""``ww-monitor`` command line: ``ww-monitor analyze PATH [--format table|csv|json]``.

User errors (missing, unreadable, corrupt, unsafe or unsupported files; bad options) print one
line to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from typing import Sequence

from .errors import WWMonitorError

__all__ = ["main"]

EXIT_USER_ERROR = 2

_TABLE_COLUMNS = (
    ("name", "layer"), ("kind", "kind"), ("N", "N"), ("M", "M"), ("alpha", "alpha"),
    ("alpha_weighted", "alpha_w"), ("D", "D"), ("num_pl_spikes", "n_tail"), ("log_norm", "log_norm"),
    ("log_spectral_norm", "log_spec"), ("stable_rank", "stable_rank"), ("rank_loss", "rank_loss"),
    ("num_spikes", "spikes"), ("phase", "phase"),
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ww-monitor", description="Spectral (ESD) analysis of neural network weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="analyse a checkpoint (.ckpt, .pt/.pth/.bin, .safetensors, or a folder)")
    a.add_argument("path", help="checkpoint file or folder of checkpoint files")
    a.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    a.add_argument("--include", action="append", default=None, metavar="REGEX", help="only layers whose name matches (repeatable)")
    a.add_argument("--exclude", action="append", default=None, metavar="REGEX", help="skip layers whose name matches (repeatable)")
    a.add_argument("--conv-mode", choices=("pooled", "slices"), default="pooled", help="one ESD per conv layer, or per kernel position")
    a.add_argument("--traps", action="store_true", help="also count correlation traps (slower)")
    a.add_argument("--unsafe-load", action="store_true",
                   help="load pickled checkpoints with weights_only=False; can run code: only for files you trust")
    return parser


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(report) -> str:
    """Fixed-width text table, one row per analysed layer, then skipped layers and the summary."""
    rows = [[header for _, header in _TABLE_COLUMNS]]
    for layer in report.to_dicts():
        rows.append([_fmt(layer[key]) for key, _ in _TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    if report.skipped:
        lines.append("")
        lines.append(f"skipped {len(report.skipped)} layer(s):")
        lines.extend(f"  {s.name} {list(s.shape)}: {s.reason}" for s in report.skipped)
    summary = report.summary()
    lines.append("")
    lines.append("summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return "\n".join(lines)


def format_csv(report) -> str:
    from .results import LAYER_COLUMNS

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LAYER_COLUMNS))
    writer.writeheader()
    for row in report.to_dicts():
        writer.writerow(row)
    return buf.getvalue()


def _analyze(args) -> int:
    from .analyze import analyze

    report = analyze(
        args.path, include=args.include, exclude=args.exclude, conv_mode=args.conv_mode,
        traps=args.traps, weights_only=not args.unsafe_load,
    )
    if not report.layers and not report.skipped:
        raise WWMonitorError(f"{args.path}: no weight matrices found")
    if args.format == "json":
        out = report.to_json(indent=2)
    elif args.format == "csv":
        out = format_csv(report)
    else:
        out = format_table(report)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
    except WWMonitorError as err:
        print(f"ww-monitor: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ww-monitor: interrupted", file=sys.stderr)
        return 130
    return 1  # pragma: no cover - argparse guarantees a known command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
