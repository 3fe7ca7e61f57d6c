"""Error of the sampled alpha estimate (``analyze(..., estimate_above=...)``) against the full fit.

For each matrix: the full fit (exact eigendecomposition, ``wwm.fit_power_law``) and the sampled
estimate (:func:`ww_monitor.functional.sampled.submatrix_eigenvalues`, pooled fit) for a few
submatrix sizes, over several sampling seeds; prints one table of the relative alpha error
(median and worst over seeds) and the CPU time of each.

Matrices:

* synthetic, of known alpha (:mod:`ww_monitor.analysis.synthetic`): a pure power-law ESD
  (``power_law_spectrum``, alpha 2 / 3 / 4) and i.i.d. Student-t entries (mu 2 / 3);
* trained: the hidden layers of an MLP trained on scikit-learn's bundled digits (no download),
  ``--hidden`` wide, with Adam at a high learning rate for ``--epochs`` epochs.

Run::

    python benchmarks/bench_estimate.py                # M = 2048 (MLP 2048 wide), sizes 512 and 1024, 3 seeds
    python benchmarks/bench_estimate.py --quick        # M = 1024 (MLP 1024 wide), size 512, 2 seeds
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
from torch import nn

from ww_monitor import synthetic
from ww_monitor.functional.eigenvalues import eigenvalues
from ww_monitor.functional.power_law import fit_power_law
from ww_monitor.functional.sampled import DEFAULT_SAMPLES, submatrix_eigenvalues


def synthetic_matrices(m: int) -> list[tuple[str, torch.Tensor]]:
    n = 2 * m
    out = []
    for alpha in (2.0, 3.0, 4.0):
        out.append((f"power-law ESD alpha={alpha:g} ({n}x{m})",
                    synthetic.power_law_spectrum(n, m, alpha=alpha, seed=1)))
    for mu in (2.0, 3.0):
        out.append((f"Student-t entries mu={mu:g} ({n}x{m})", synthetic.heavy_tailed(n, m, mu=mu, seed=1)))
    return [(name, torch.from_numpy(w)) for name, w in out]


def trained_matrices(hidden: int, epochs: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Hidden-layer weights of an MLP trained on the digits data (8x8 images, 10 classes)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    acc = float((model(x).argmax(1) == y).float().mean())
    return [(f"digits MLP {name} ({hidden}x{hidden}, {epochs} ep, train acc {acc:.2f})", mod.weight.detach().clone())
            for name, mod in (("layer 2", model[2]), ("layer 4", model[4]))]


def measure(w: torch.Tensor, sizes, seeds: int, samples: int):
    c = time.process_time()
    full = fit_power_law(eigenvalues(w))
    t_full = time.process_time() - c
    rows = []
    for size in sizes:
        if size >= min(w.shape):
            rows.append(None)  # the "sample" would be the whole matrix
            continue
        errs, times = [], []
        for seed in range(seeds):
            c = time.process_time()
            ev, _, _ = submatrix_eigenvalues(w, size=size, samples=samples, seed=seed)
            est = fit_power_law(ev)
            times.append(time.process_time() - c)
            errs.append((est.alpha - full.alpha) / full.alpha)
        rows.append((size, statistics.median(errs), max(errs, key=abs), statistics.median(times)))
    return full, t_full, rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--m", type=int, default=None, help="smaller side of the synthetic matrices")
    ap.add_argument("--hidden", type=int, default=None, help="width of the trained MLP")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    m = args.m or (1024 if args.quick else 2048)
    hidden = args.hidden or (1024 if args.quick else 2048)
    epochs = args.epochs or (3 if args.quick else 10)
    seeds = args.seeds or (2 if args.quick else 3)
    sizes = (512,) if args.quick else (512, 1024)
    mats = synthetic_matrices(m) + trained_matrices(hidden, epochs)
    print(f"{args.samples} samples per estimate, {seeds} seeds; relative alpha error (estimate - full) / full\n")
    print("| matrix | full alpha (tail) | " + " | ".join(f"size {s}: median / worst error, CPU s" for s in sizes)
          + " | full CPU s |")
    print("|---|---:|" + "---:|" * len(sizes) + "---:|")
    for name, w in mats:
        full, t_full, rows = measure(w, sizes, seeds, args.samples)
        cells = " | ".join("-" if r is None else f"{r[1]:+.1%} / {r[2]:+.1%}, {r[3]:.2f}" for r in rows)
        print(f"| {name} | {full.alpha:.2f} ({full.num_pl_spikes}) | {cells} | {t_full:.2f} |", flush=True)


if __name__ == "__main__":
    main()
