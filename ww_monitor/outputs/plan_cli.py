"""``ww-monitor plan CONFIG_OR_CHECKPOINT``: what monitoring a model will cost, before the run.

The model comes from its shapes alone (:mod:`ww_monitor.analysis.shapes`: a transformers config
built on the meta device, or a checkpoint's headers); the settings are those of a monitor built
from the flags, so the selection defaults (size limits, adapters, ...) are the training front
doors' own. Prints :func:`ww_monitor.outputs.plan.format_plan` or, with ``--format json``, the
plan's :meth:`~ww_monitor.outputs.plan.CostPlan.to_dict`. A bad argument exits with status 2
and one line naming it.
"""

from __future__ import annotations

import argparse
import math
import sys

from ..functional.sampled import DEFAULT_SAMPLE_SIZE
from ..monitoring.budget import DEFAULT_MAX_OVERHEAD
from .plan import DEVICES

__all__ = ["add_plan_parser", "run_plan"]

#: Weight dtypes ``--dtype`` can plan for (the snapshot copies the weights in their dtype).
PLAN_DTYPES = ("float32", "bfloat16", "float16", "float64")
EXIT_USER_ERROR = 2

_DESCRIPTION = """\
What monitoring a model will cost per snapshot, before the run, from its shapes alone (no weight is
read, nothing is downloaded): the matrices analysed and skipped (the monitor's selection), bytes
copied per rank, analysis seconds per rank on this machine's CPU (a cost model calibrated here),
the same with wwm.analyze's sampled estimate (--estimate-above), and a schedule that keeps the
monitor within --max-overhead of the training time."""
_EXAMPLE = """\
example: ww-monitor plan configs/llama-2-7b.json --ranks 8 --step-seconds 2"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _share(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1] or 'none', got {text!r}")
    return value


def _one_line_error(prog: str):
    def error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)

    return error


def add_plan_parser(sub, positive_int) -> None:
    """Register ``plan`` on the ``ww-monitor`` subcommands (``positive_int``: the CLI's argument type
    for whole numbers >= 1)."""
    p = sub.add_parser(
        "plan",
        help="what monitoring a model will cost per snapshot (from a config or checkpoint)",
        description=_DESCRIPTION,
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.error = _one_line_error(p.prog)  # one line naming the argument, no usage block
    p.add_argument(
        "path",
        metavar="CONFIG_OR_CHECKPOINT",
        help="transformers config.json (or a folder with one), .safetensors, .pt/.pth/.ckpt/.bin, "
        "or a folder of checkpoint files",
    )
    p.add_argument(
        "--ranks",
        type=positive_int,
        default=1,
        metavar="N",
        help="processes sharing the analysis, as under DDP (default: 1)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the analysis runs; GPU times are not calibrated here and say so (default: cpu)",
    )
    sched = p.add_mutually_exclusive_group()
    sched.add_argument(
        "--every-n-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="the schedule you plan (every_n_train_steps), checked against the budget",
    )
    sched.add_argument(
        "--every-n-epochs",
        type=positive_int,
        default=None,
        metavar="N",
        help="the schedule you plan in epochs (needs --steps-per-epoch to be checked)",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=positive_int,
        default=None,
        metavar="N",
        help="optimizer steps per epoch, to express the schedule in epochs",
    )
    p.add_argument(
        "--step-seconds",
        type=_positive_float,
        default=None,
        metavar="S",
        help="wall time of one training step (default: 1 s, said in the output)",
    )
    p.add_argument(
        "--max-overhead",
        type=_share,
        default=DEFAULT_MAX_OVERHEAD,
        metavar="F",
        help=f"largest share of training time the monitor may cost (default: {DEFAULT_MAX_OVERHEAD}; "
        "'none': no budget)",
    )
    p.add_argument(
        "--estimate-above",
        type=positive_int,
        default=DEFAULT_SAMPLE_SIZE,
        metavar="K",
        help="also price the sampled estimate of matrices whose smaller side exceeds K "
        f"(default: {DEFAULT_SAMPLE_SIZE})",
    )
    p.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="REGEX",
        help="only layers whose name matches (repeatable), as the callback's include=",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="REGEX",
        help="skip layers whose name matches (repeatable), as the callback's exclude=",
    )
    p.add_argument(
        "--dtype",
        choices=PLAN_DTYPES,
        default=None,
        help="plan for weights in this dtype (default: the config's dtype or the stored ones)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="the analysis worker's threads (worker_threads; default: 1)",
    )
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="read pickled checkpoints with weights_only=False; can run code: only for files you trust",
    )


def run_plan(args) -> int:
    import torch

    from ..analysis.results import strict_json_dumps
    from ..analysis.shapes import load_shapes

    # The front doors' own defaults (selection, size limits, adapters) are the plan's: a monitor
    # built from the flags holds them. Constructing it starts nothing.
    from ..core.engine import MonitorEngine

    dtype = getattr(torch, args.dtype) if args.dtype else None
    source, what = load_shapes(args.path, dtype=dtype, weights_only=not args.unsafe_load)
    monitor = MonitorEngine(
        every_n_epochs=args.every_n_epochs,
        every_n_train_steps=args.every_n_steps,
        include=args.include,
        exclude=args.exclude,
        max_overhead=args.max_overhead,
        worker_threads=args.threads,
        alerts=False,
        figures_every_n_snapshots=None,
        # no schedule planned: the plan suggests one (a monitor must say so explicitly)
        ends_only=args.every_n_epochs is None and args.every_n_steps is None,
    )
    plan = monitor.plan(
        source,
        args.ranks,
        device=args.device,
        step_seconds=args.step_seconds,
        steps_per_epoch=args.steps_per_epoch,
        estimate_above=args.estimate_above,
    )
    plan.source = what
    out = strict_json_dumps(plan.to_dict(), indent=2) if args.format == "json" else str(plan)
    sys.stdout.write(out + "\n")
    return 0
