"""The cost model's predictions against measured analysis times, per shape, on this CPU.

For each weight shape (Gaussian entries, the state of a layer at initialisation) the script
times the job the monitor's worker runs for one snapshot of that one matrix
(:func:`ww_monitor.monitoring.analysis_job.analyze_snapshot`: eigenvalues, every fit, the ESD
histogram; what ``wwm.analyze`` does for one matrix, plus the histogram) on one thread, and
compares it with :func:`ww_monitor.monitoring.cost.matrix_seconds` (the estimate that the monitor
logs and ``ww-monitor plan`` prints). A second table does the same for the sampled estimate of
large matrices (``estimate_above=``, :func:`ww_monitor.monitoring.cost.sampled_seconds`).
Each row: the route the eigensolver takes, predicted and measured CPU seconds (and wall seconds,
which a busy machine inflates), and the relative error ``predicted / measured - 1``; then the
median and worst absolute error of each table.

Times are CPU seconds of the process (``time.process_time``; one thread, so a noisy neighbour
changes them much less than wall time), the least of ``--repeats`` runs, averaged over
``--seeds`` matrices per shape (the mixed route's rank certificate fails on some random square
matrices and not on others; the model predicts the mean). The load average is printed before
and after.

Run::

    python benchmarks/bench_cost_model.py            # shapes up to 32000 x 4096 (~5 min on one core)
    python benchmarks/bench_cost_model.py --quick    # shapes up to 2048 x 2048 (~10 s)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import DEFAULT_THREADS, pin_threads

if __name__ == "__main__":
    pin_threads(sys.argv[1:])

import argparse
import statistics
import time

import torch

from ww_monitor.analysis.analyze import AnalysisConfig, analyze_matrices
from ww_monitor.analysis.layers import LayerMatrix
from ww_monitor.functional.eigenvalues import choose_method
from ww_monitor.monitoring.analysis_job import analyze_snapshot
from ww_monitor.monitoring.cost import calibration, matrix_seconds, sampled_seconds
from ww_monitor.monitoring.snapshot import take_snapshot

#: (rows, cols, dtype) of the full analysis: attention/FFN/embedding shapes of BERT-base and
#: Llama-2-7B (4096 x 4096, 4096 x 11008 and its transpose, 32000 x 4096) and smaller ones.
FULL = [
    (256, 256, "float32"), (512, 512, "float32"), (768, 768, "float32"), (3072, 768, "float32"),
    (1024, 1024, "float32"), (1024, 4096, "float32"), (4096, 1024, "float32"), (2048, 2048, "float32"),
    (4096, 4096, "float32"), (4096, 11008, "float32"), (11008, 4096, "float32"), (32000, 4096, "float32"),
    (4096, 4096, "float16"), (4096, 11008, "bfloat16"), (1024, 1024, "float64"), (2048, 1024, "float64"),
]
#: (rows, cols, dtype) of the sampled estimate (``estimate_above=ESTIMATE_ABOVE``).
SAMPLED = [(2048, 2048, "float32"), (4096, 4096, "float32"), (4096, 11008, "float32"), (11008, 4096, "float32"),
           (32000, 4096, "float32")]
QUICK_MAX = 2048 * 2048
ESTIMATE_ABOVE = 1024


def _weights(rows: int, cols: int, dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + rows * 7 + cols)
    return (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(getattr(torch, dtype))


def _cpu_seconds(fn, repeats: int) -> tuple[float, float]:
    """(least CPU seconds, least wall seconds) over ``repeats`` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(cpu), min(wall)


def _table(title: str, cases, job, predict, route, args) -> list[float]:
    """Time ``job(matrix)`` for each (rows, cols, dtype) and compare with ``predict(shape, dtype)``.

    Shapes under 4096 x 4096 are measured on ``--seeds`` different matrices (the mixed route's
    rank certificate fails on some square ones and not on others: the model predicts the mean),
    each the least of ``--repeats`` runs; larger ones once.
    """
    print(f"\n{title}")
    print(f"{'shape, dtype':<22} {'route':<7} {'predicted':>10} {'measured':>10} {'wall':>9} {'error':>8}")
    errors = []
    for rows, cols, dtype in cases:
        if args.quick and rows * cols > QUICK_MAX:
            continue
        small = rows * cols < 4096 * 4096
        runs = [_cpu_seconds(lambda: job(LayerMatrix("layer", "linear", _weights(rows, cols, dtype, seed))),
                             args.repeats if small else 1) for seed in range(args.seeds if small else 1)]
        cpu, wall = statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
        dt = getattr(torch, dtype)
        predicted = predict((rows, cols), dt)
        err = predicted / cpu - 1
        errors.append(err)
        print(f"{f'{rows}x{cols} {dtype}':<22} {route(dt, min(rows, cols)):<7} {predicted:>10.3f} {cpu:>10.3f} "
              f"{wall:>9.3f} {err:>+8.1%}", flush=True)
    if errors:
        worst = max(errors, key=abs)
        print(f"median |error| {statistics.median(abs(e) for e in errors):.1%}, worst {worst:+.1%} "
              f"({len(errors)} shapes)")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shapes up to 2048 x 2048 only")
    parser.add_argument("--repeats", type=int, default=3, help="runs per matrix under 4096 x 4096 (default 3)")
    parser.add_argument("--seeds", type=int, default=3, help="matrices per shape under 4096 x 4096 (default 3)")
    parser.add_argument("--no-sampled", action="store_true", help="skip the sampled-estimate table")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="intra-op threads (default 1)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads: {torch.get_num_threads()}")
    cal = calibration()
    print(f"calibration: {cal.seconds * 1e3:.0f} ms CPU; gram {cal.gram:.3g} s/(N M^2), upcast {cal.upcast:.3g} "
          f"s/(N M), eig64 {cal.eig64:.3g}, eig32 {cal.eig32:.3g}, cholesky {cal.cholesky:.3g}, ldl {cal.ldl:.3g} "
          f"s/M^3, per matrix {cal.per_matrix * 1e3:.2f} ms, per eigenvalue {cal.per_eigenvalue * 1e6:.2f} us")
    config = AnalysisConfig(keep_eigenvalues=True)  # the monitor's analysis options at its defaults
    _table("full analysis (the worker's job for one matrix), CPU seconds", FULL,
           lambda m: analyze_snapshot(take_snapshot([m]), config, histograms=True),
           lambda shape, dt: matrix_seconds(shape, dt, cal=cal), lambda dt, m: choose_method(dt, "auto", m), args)
    if not args.no_sampled:
        sampled = AnalysisConfig(keep_eigenvalues=True, estimate_above=ESTIMATE_ABOVE)
        _table(f"sampled estimate (estimate_above={ESTIMATE_ABOVE}), CPU seconds", SAMPLED,
               lambda m: analyze_matrices([m], sampled), lambda shape, dt: sampled_seconds(shape, dt, cal=cal),
               lambda dt, m: "sampled", args)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
