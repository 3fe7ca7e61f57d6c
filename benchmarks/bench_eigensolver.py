"""Eigensolver strategies for the ESD, side by side in one process.

Why ``method="auto"`` picks Gram + ``eigvalsh`` for float32/bf16/fp16 weights: for every shape
below this times, on the same float32 weights (the float64 upcast is included in every variant):

* ``svdvals``        ``torch.linalg.svdvals(W.double())`` squared (what weightwatcher computes)
* ``gram+eigvalsh``  ``torch.linalg.eigvalsh(W^T W)`` with W oriented so W^T W is the small side

each both *batched* (one call on a stack of same-shape matrices, as
:func:`ww_monitor.functional.eigenvalues.batched_eigenvalues` does) and *looped* (one call per
matrix). Repeats are interleaved (every repeat runs every variant, in a rotating order) and the
medians are reported, so a noisy neighbour slows all variants alike. It also prints how far the
Gram eigenvalues are from the SVD ones, relative to lambda_max, to show the precision cost.

A second table compares the CPU routes ``batched_eigenvalues`` can take: torch's LAPACK vs SciPy's
(both float64, the reason for ``CPU_BACKEND = "scipy"``) and the mixed-precision ``"auto"`` route
(float32 eigensolve of the exact Gram for M >= 512) with its error relative to lambda_max.
A third table times SciPy's eigenvalues-only ``?syevd`` with the wrapper's default workspace
(2M + 1: unblocked tridiagonal reduction) against LAPACK's queried optimum (blocked), the reason
the CPU route passes ``lwork``. A fourth times the pieces of the mixed-precision route per matrix
(float64 Gram, float32 and float64 solves, the Cholesky rank certificate, the LDL^T rank count
that replaces a float64 re-solve when the certificate fails) and how often the certificate is
needed and fails on random matrices of each shape: the numbers behind
``ww_monitor.functional.gram.CERTIFICATE_BREAK_EVEN``.

Threads: ``--threads`` (default 1) is applied to torch, MKL, OpenBLAS and OpenMP before torch
is imported, as in ``bench_analyze.py``; ``--threads 0`` keeps the library defaults. On
oversubscribed or steal-heavy VMs multi-threaded LAPACK can be 10x slower than one thread.
Times are CPU seconds (``time.process_time``, stable on a noisy machine with one thread) and
wall seconds.

Run::

    python benchmarks/bench_eigensolver.py            # all shapes, 5 repeats, 1 thread
    python benchmarks/bench_eigensolver.py --quick    # no 30522x768, 3 repeats
    python benchmarks/bench_eigensolver.py --threads 0
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

import numpy as np
import torch

# (label, batch size, rows, cols): rows x cols is the stored (out, in) weight; batch = how many
# matrices of that shape one model layer group has.
CASES = [
    ("attention q/k/v/o 768x768", 4, 768, 768),
    ("ffn 3072x768", 2, 3072, 768),
    ("conv 3x3 slices 512x512x9", 9, 512, 512),
    ("4096x1024", 1, 4096, 1024),
    ("small 128x64", 16, 128, 64),
    ("embedding 30522x768", 1, 30522, 768),
]
QUICK_SKIP = {"embedding 30522x768"}


def _oriented(w: torch.Tensor) -> torch.Tensor:
    # W^T W must be the min(rows, cols)-sized side.
    return w.transpose(-1, -2) if w.shape[-2] < w.shape[-1] else w


def svd_batched(stack):
    return torch.linalg.svdvals(stack.to(torch.float64)).square()


def svd_looped(stack):
    return [torch.linalg.svdvals(w.to(torch.float64)).square() for w in stack]


def gram_batched(stack):
    w = _oriented(stack).to(torch.float64)
    return torch.linalg.eigvalsh(w.transpose(-1, -2) @ w)


def gram_looped(stack):
    out = []
    for w in stack:
        w = _oriented(w).to(torch.float64)
        out.append(torch.linalg.eigvalsh(w.T @ w))
    return out


def ww_monitor_solver(stack):
    from ww_monitor.functional import batched_eigenvalues

    return batched_eigenvalues([stack])


def ww_monitor_float64(stack):
    """The CPU route's exact float64 path (SciPy dsyrk + dsyevd; "auto" below M = 512)."""
    from ww_monitor.functional import batched_eigenvalues

    return batched_eigenvalues([stack], method="gram")


VARIANTS = {
    "svdvals batched": svd_batched,
    "svdvals looped": svd_looped,
    "gram+eigvalsh batched": gram_batched,
    "gram+eigvalsh looped": gram_looped,
    "ww_monitor": ww_monitor_solver,
    "ww_monitor float64": ww_monitor_float64,
}


def time_case(stack: torch.Tensor, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median CPU and wall seconds per variant."""
    names = list(VARIANTS)
    for name in names:  # warm-up: first-call allocations and LAPACK workspace queries
        VARIANTS[name](stack)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            VARIANTS[name](stack)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return ({n: statistics.median(v) for n, v in cpu.items()}, {n: statistics.median(v) for n, v in wall.items()})


def gram_error(stack: torch.Tensor) -> float:
    """max |lambda_gram - lambda_svd| / lambda_max over the stack."""
    a = torch.sort(gram_batched(stack), dim=-1).values
    b = torch.sort(svd_batched(stack), dim=-1).values
    return float(((a - b).abs().amax(dim=-1) / b.amax(dim=-1)).max())


def syevd_workspace(stack: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median CPU seconds of ``?syevd`` (eigenvalues only) on one Gram: default vs queried lwork."""
    from scipy.linalg import blas, lapack

    w = _oriented(stack[0]).to(torch.float64).numpy()
    gram = blas.dsyrk(1.0, w.T, trans=0, lower=1)
    out: dict[str, list[float]] = {}
    for prefix, g in (("d", gram), ("s", gram.astype(np.float32))):
        solver = getattr(lapack, f"{prefix}syevd")
        lwork = int(getattr(lapack, f"{prefix}syevd_lwork")(g.shape[0], compute_v=0, lower=1)[0])
        for label, kwargs in (("default", {}), ("queried", {"lwork": lwork})):
            times = out.setdefault(f"{prefix} {label}", [])
            for _ in range(repeats):
                a = g.copy()
                c0 = time.process_time()
                solver(a, compute_v=0, lower=1, overwrite_a=1, **kwargs)
                times.append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in out.items()}


def route_pieces(rows: int, cols: int, draws: int, repeats: int, gen: torch.Generator) -> dict[str, float]:
    """Median CPU seconds of each mixed-route piece on one matrix, and its certificate rates.

    ``draws`` random matrices (Kaiming-uniform like an untrained layer) give the fraction whose
    float32 spectrum comes within its error bound of the rank tolerance (certificate needed) and
    the fraction whose certificate fails (an eigenvalue at or below the tolerance).
    """
    import importlib

    from ww_monitor.functional.spectral_metrics import rank_tolerance

    gram = importlib.import_module("ww_monitor.functional.gram")
    n, m = max(rows, cols), min(rows, cols)
    bound = 1.0 / cols**0.5
    needed = failed = 0
    for _ in range(draws):
        w = (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound
        g = gram.gram64(w)
        ev, delta = gram._float32_eigenvalues(g)
        tol = rank_tolerance(float(ev[-1]), n, m, torch.float32)
        if ev[0] <= tol + delta:
            needed += 1
            failed += not gram._certify(g, tol + gram.gram_noise_floor(float(ev[-1]), m))
    w = (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound
    g = gram.gram64(w)
    pieces = {
        "gram64": lambda: gram.gram64(w),
        "float32 solve": lambda: gram._float32_eigenvalues(g),
        "float64 solve": lambda: gram._dsyevd(g.copy(order="F")),
        "cholesky": lambda: gram._certify(g.copy(order="F"), 0.0),
        "ldl count": lambda: gram._count_at_or_below(g.copy(order="F"), 0.0),
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for r in range(repeats):
        for name in list(pieces)[r % len(pieces):] + list(pieces)[: r % len(pieces)]:
            c0 = time.process_time()
            pieces[name]()
            times[name].append(time.process_time() - c0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["needed"], out["failed"] = needed / draws, failed / draws
    return out


#: (label, rows, cols) of the mixed route's table: square and tall shapes at and above MIXED_MIN_M.
ROUTE_CASES = [("conv slice 512x512", 512, 512), ("768x768", 768, 768), ("fc 1000x512", 1000, 512),
               ("ffn 3072x768", 3072, 768)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the embedding shape, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="torch/BLAS/LAPACK threads (0: library defaults)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    gen = torch.Generator().manual_seed(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {repeats} interleaved repeats; "
          "CPU seconds (process_time) per batch, medians; wall-clock ratios in the last column\n")
    print("| shape | batch | svdvals batched | svdvals looped | gram batched | gram looped "
          "| svd/gram (batched) | svd/gram (looped) | looped/batched (gram) | gram error / lambda_max "
          "| svd/gram batched, wall | ww_monitor solver | svd batched / ww_monitor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    routes = []
    for label, batch, rows, cols in CASES:
        if args.quick and label in QUICK_SKIP:
            continue
        reps = 1 if rows * cols > 10_000_000 and not args.repeats else repeats
        stack = torch.randn(batch, rows, cols, generator=gen) / cols**0.5  # float32, like real weights
        t, w = time_case(stack, reps)
        err = gram_error(stack[:1])
        print(
            f"| {label} | {batch} | {t['svdvals batched']:.3f} | {t['svdvals looped']:.3f} "
            f"| {t['gram+eigvalsh batched']:.3f} | {t['gram+eigvalsh looped']:.3f} "
            f"| {t['svdvals batched'] / t['gram+eigvalsh batched']:.2f}x "
            f"| {t['svdvals looped'] / t['gram+eigvalsh looped']:.2f}x "
            f"| {t['gram+eigvalsh looped'] / t['gram+eigvalsh batched']:.2f}x | {err:.1e} "
            f"| {w['svdvals batched'] / w['gram+eigvalsh batched']:.2f}x | {t['ww_monitor']:.3f} "
            f"| {t['svdvals batched'] / t['ww_monitor']:.2f}x |",
            flush=True,
        )
        auto = np.sort(ww_monitor_solver(stack[:1])[0])
        exact = np.sort(ww_monitor_float64(stack[:1])[0])
        routes.append((label, t["gram+eigvalsh looped"], t["ww_monitor float64"], t["ww_monitor"],
                       float(np.abs(auto - exact).max() / exact.max())))
    print("\nCPU routes, CPU seconds per batch: torch's LAPACK (MKL in the wheels) vs SciPy's (OpenBLAS), "
          "float64, and ww_monitor's 'auto' (float32 eigensolve of the exact Gram for M >= 512):\n")
    print("| shape | torch gram+eigvalsh | SciPy float64 | torch / SciPy | auto | float64 / auto "
          "| auto error / lambda_max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, torch_t, f64, auto_t, err in routes:
        print(f"| {label} | {torch_t:.3f} | {f64:.3f} | {torch_t / f64:.2f}x | {auto_t:.3f} | {f64 / auto_t:.2f}x "
              f"| {err:.1e} |")
    print("\nSciPy ?syevd, eigenvalues only, one Gram of each shape: the wrapper's default workspace vs "
          "LAPACK's queried optimum (CPU seconds, medians):\n")
    print("| shape | M | dsyevd default | dsyevd queried | speed-up | ssyevd default | ssyevd queried | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, _batch, rows, cols in CASES:
        if args.quick and label in QUICK_SKIP:
            continue
        stack = torch.randn(1, rows, cols, generator=gen) / cols**0.5
        t = syevd_workspace(stack, repeats)
        print(f"| {label} | {min(rows, cols)} | {t['d default']:.4f} | {t['d queried']:.4f} "
              f"| {t['d default'] / t['d queried']:.2f}x | {t['s default']:.4f} | {t['s queried']:.4f} "
              f"| {t['s default'] / t['s queried']:.2f}x |", flush=True)
    draws = 8 if args.quick else 32
    print(f"\nMixed-precision route, pieces per matrix (CPU ms, medians; the copies of the Gram the "
          f"solvers overwrite included) and, over {draws} random (Kaiming-uniform) matrices, how often the "
          "rank certificate is needed / fails. float32 route = gram + float32 + p_needed * cholesky "
          "+ p_failed * (gram + ldl count); float64 route = gram + float64:\n")
    print("| shape | gram64 | float32 solve | float64 solve | cholesky | ldl count | certificate needed "
          "| certificate failed | float32 route | float64 route |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, rows, cols in ROUTE_CASES:
        t = {k: v * 1e3 if k not in ("needed", "failed") else v
             for k, v in route_pieces(rows, cols, draws, repeats, gen).items()}
        mixed = t["gram64"] + t["float32 solve"] + t["needed"] * t["cholesky"] + t["failed"] * (t["gram64"] + t["ldl count"])
        print(f"| {label} | {t['gram64']:.2f} | {t['float32 solve']:.2f} | {t['float64 solve']:.2f} "
              f"| {t['cholesky']:.2f} | {t['ldl count']:.2f} | {t['needed']:.0%} | {t['failed']:.0%} "
              f"| {mixed:.2f} | {t['gram64'] + t['float64 solve']:.2f} |", flush=True)
    print("\nsvd/gram > 1: the Gram route is faster. looped/batched > 1: batching helps. The 'gram' "
          "variants are the plain W^T W + eigvalsh; 'ww_monitor solver' is batched_eigenvalues() "
          "(lower-triangle product, UPLO='U', sorted numpy output; ww_monitor/functional/eigenvalues.py).")


if __name__ == "__main__":
    main()
