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
changes them much less than wall time), the minimum over ``--repeats``. The load average is
printed before and after.

Run::

    python benchmarks/bench_cost_model.py            # shapes up to 32000 x 4096 (~4 min on one core)
    python benchmarks/bench_cost_model.py --quick    # shapes up to 2048 x 2048 (~10 s)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import DEFAULT_THREADS, pin_threads  # noqa: E402

if __name__ == "__main__":
    pin_threads(sys.argv[1:])

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from ww_monitor.analysis.analyze import AnalysisConfig, analyze_matrices  # noqa: E402
from ww_monitor.analysis.layers import LayerMatrix  # noqa: E402
from ww_monitor.functional.eigenvalues import choose_method  # noqa: E402
from ww_monitor.monitoring.analysis_job import analyze_snapshot  # noqa: E402
from ww_monitor.monitoring.cost import calibration, matrix_seconds, sampled_seconds  # noqa: E402
from ww_monitor.monitoring.snapshot import take_snapshot  # noqa: E402

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


def _weights(rows: int, cols: int, dtype: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    return (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(getattr(torch, dtype))


def _timed(fn, repeats: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(cpu), min(wall)


def _row(label: str, route: str, predicted: float, cpu: float, wall: float) -> tuple[str, float]:
    err = predicted / cpu - 1
    print(f"{label:<22} {route:<7} {predicted:>10.3f} {cpu:>10.3f} {wall:>9.3f} {err:>+8.1%}", flush=True)
    return label, err


def _header(title: str) -> None:
    print(f"\n{title}")
    print(f"{'shape, dtype':<22} {'route':<7} {'predicted':>10} {'measured':>10} {'wall':>9} {'error':>8}")


def _summary(errors: list[float]) -> None:
    if errors:
        worst = max(errors, key=abs)
        print(f"median |error| {statistics.median(abs(e) for e in errors):.1%}, worst {worst:+.1%} "
              f"({len(errors)} shapes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shapes up to 2048 x 2048 only")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of shapes under 4096 x 4096 (default 3)")
    parser.add_argument("--big-repeats", type=int, default=1, help="repeats of larger shapes (default 1)")
    parser.add_argument("--no-sampled", action="store_true", help="skip the sampled-estimate table")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="intra-op threads (default 1)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads: {torch.get_num_threads()}")
    cal = calibration()
    print(f"calibration: {cal.seconds * 1e3:.0f} ms CPU; gram {cal.gram:.3g} s/(N M^2), eig64 {cal.eig64:.3g}, "
          f"eig32 {cal.eig32:.3g}, cholesky {cal.cholesky:.3g}, ldl {cal.ldl:.3g} s/M^3, "
          f"per matrix {cal.per_matrix * 1e3:.2f} ms, per eigenvalue {cal.per_eigenvalue * 1e6:.2f} us")
    config = AnalysisConfig(keep_eigenvalues=True)  # the monitor's analysis options at its defaults

    def small(rows, cols):
        return rows * cols < 4096 * 4096

    _header("full analysis (the worker's job for one matrix), CPU seconds")
    full_errors = []
    for rows, cols, dtype in FULL:
        if args.quick and rows * cols > QUICK_MAX:
            continue
        w = _weights(rows, cols, dtype)
        m = LayerMatrix("layer", "linear", w)
        route = choose_method(w.dtype, "auto", min(rows, cols))
        cpu, wall = _timed(lambda: analyze_snapshot(take_snapshot([m]), config, histograms=True),
                           args.repeats if small(rows, cols) else args.big_repeats)
        full_errors.append(_row(f"{rows}x{cols} {dtype}", route, matrix_seconds(w.shape, w.dtype, cal=cal), cpu,
                                wall)[1])
    _summary(full_errors)

    if not args.no_sampled:
        _header(f"sampled estimate (estimate_above={ESTIMATE_ABOVE}), CPU seconds")
        sampled_config = AnalysisConfig(keep_eigenvalues=True, estimate_above=ESTIMATE_ABOVE)
        sampled_errors = []
        for rows, cols, dtype in SAMPLED:
            if args.quick and rows * cols > QUICK_MAX:
                continue
            w = _weights(rows, cols, dtype)
            m = LayerMatrix("layer", "linear", w)
            cpu, wall = _timed(lambda: analyze_matrices([m], sampled_config),
                               args.repeats if small(rows, cols) else args.big_repeats)
            sampled_errors.append(_row(f"{rows}x{cols} {dtype}", "sampled", sampled_seconds(w.shape, w.dtype, cal=cal),
                                       cpu, wall)[1])
        _summary(sampled_errors)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
