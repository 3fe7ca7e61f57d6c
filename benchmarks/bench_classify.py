"""Cost of the MP fit + phase classification next to the rest of a layer's analysis.

    python benchmarks/bench_classify.py                 # 1024 x 1024 float32 layer
    python benchmarks/bench_classify.py --n 4096 --m 1024 --repeats 9

Side by side in one process, alternating so that machine load hits both alike:

* ``analysis``: ``analyze_matrices`` for the layer with the RMT step switched off (eigensolve,
  norm metrics, rank, power-law fit);
* ``+rmt``: the same with the RMT step on (MP fit, spikes, phase);
* ``mp+phase``: ``fit_marchenko_pastur`` + ``phase_from_spectrum`` alone on the same ESD.

Reports the minimum over repeats (the least disturbed run) and the ratio
``mp+phase / analysis`` (target < 25%). Correlation traps are opt-in and cost one more
eigensolve by design; their time is printed for information.
"""

from __future__ import annotations

import argparse
import importlib
import time

import numpy as np
import torch

from ww_monitor.analysis import synthetic
from ww_monitor.analysis.layers import LayerMatrix
from ww_monitor.analysis.phases import phase_from_spectrum
from ww_monitor.functional.correlation_traps import count_correlation_traps
from ww_monitor.functional.marchenko_pastur import fit_marchenko_pastur

A = importlib.import_module("ww_monitor.analysis.analyze")  # the package re-exports the function by that name


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MP fit + phase cost relative to a layer's analysis")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    w = torch.from_numpy(synthetic.heavy_tailed(args.n, args.m, mu=2.5, seed=0))
    layer = LayerMatrix("layer", "linear", w)
    config = A.AnalysisConfig()
    real_rmt = A._rmt_diagnostics

    def analysis_only():
        A._rmt_diagnostics = lambda *a, **k: None
        try:
            return A.analyze_matrices([layer], config)
        finally:
            A._rmt_diagnostics = real_rmt

    def analysis_full():
        return A.analyze_matrices([layer], config)

    (res,), _ = analysis_full()  # warm-up, and the ESD for the direct measurement
    evals = res.eigenvalues

    def mp_and_phase():
        mp = fit_marchenko_pastur(evals, layer.N, layer.M)
        from ww_monitor.functional.power_law import PowerLawFit

        fit = PowerLawFit(res.alpha, res.xmin, res.xmax, res.D, res.sigma, res.num_pl_spikes, ok=res.fit_ok)
        return phase_from_spectrum(evals, layer.N, layer.M, rank_loss=res.rank_loss, power_law=fit, mp=mp)

    times = {"analysis": [], "+rmt": [], "mp+phase": [], "traps": []}
    for _ in range(args.repeats):
        times["analysis"].append(_timed(analysis_only))
        times["+rmt"].append(_timed(analysis_full))
        times["mp+phase"].append(_timed(mp_and_phase))
        times["traps"].append(_timed(lambda: count_correlation_traps(w, seed=0)))
    best = {k: min(v) for k, v in times.items()}
    med = {k: float(np.median(v)) for k, v in times.items()}

    print(f"layer {args.n} x {args.m} float32, torch threads {torch.get_num_threads()}, {args.repeats} repeats")
    for key in times:
        print(f"  {key:9s} min {best[key] * 1e3:8.1f} ms   median {med[key] * 1e3:8.1f} ms")
    ratio = best["mp+phase"] / best["analysis"]
    ratio_diff = (best["+rmt"] - best["analysis"]) / best["analysis"]
    print(f"MP fit + phase / analysis time: {ratio:.1%} (direct), {ratio_diff:.1%} (difference of totals);"
          f" target < 25%")
    print(f"correlation traps (opt-in) / analysis time: {best['traps'] / best['analysis']:.0%}")
    print(f"phase: {res.phase.value}")
    return 0 if ratio < 0.25 else 1


if __name__ == "__main__":
    raise SystemExit(main())
