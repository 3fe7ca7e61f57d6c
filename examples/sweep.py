"""Hyperparameter sweep: does a smaller mean alpha go with better held-out accuracy?

Trains the same MLP on scikit-learn's bundled digits data (no download) over a grid of batch
size, learning rate and weight decay, then reports per run the final mean alpha, mean
alpha_weighted (from ``wwm.analyze``, no data needed) and the held-out accuracy, plus the
Spearman rank correlation between them, as a table and a plot.

    python examples/sweep.py                 # full grid, a few minutes on 2 CPU cores
    python examples/sweep.py --quick         # 4 short runs (used by the test suite)
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import ww_monitor as wwm


def data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(xtr, torch.float32), t(ytr, torch.long), t(xte, torch.float32), t(yte, torch.long)


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def fit(batch_size: int, lr: float, weight_decay: float, epochs: int, hidden: int, seed: int, split) -> nn.Module:
    """Train one MLP with SGD (momentum 0.9) on the training part of ``split``; returns it in eval mode."""
    xtr, ytr = split[0], split[1]
    torch.manual_seed(seed)
    model = make_model(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    n = xtr.shape[0]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def train_one(batch_size: int, lr: float, weight_decay: float, epochs: int, hidden: int, seed: int, split) -> dict:
    model = fit(batch_size, lr, weight_decay, epochs, hidden, seed, split)
    xte, yte = split[2], split[3]
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    summary = wwm.analyze(model).summary()
    return {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "test_acc": acc,
            "alpha": summary["alpha"], "alpha_weighted": summary["alpha_weighted"],
            "failed_fits": summary["num_failed_fits"]}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8))
    for ax, key in zip(fig.subplots(1, 2), ("alpha", "alpha_weighted")):
        ax.scatter([r[key] for r in rows], [r["test_acc"] for r in rows], c=np.log10([r["batch_size"] for r in rows]),
                   cmap="viridis", edgecolors="k")
        ax.set_xlabel(f"final mean {key}")
        ax.set_ylabel("held-out accuracy")
        rho = spearmanr([r[key] for r in rows], [r["test_acc"] for r in rows]).statistic
        ax.set_title(f"Spearman rho = {rho:+.2f}")
    fig.suptitle("digits MLP sweep (colour: log10 batch size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 short runs")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="sweep_results", help="folder for the table (CSV) and plot (PNG)")
    args = p.parse_args(argv)

    if args.quick:
        grid = list(itertools.product([32, 256], [0.05], [0.0, 1e-3]))
        epochs, hidden = args.epochs or 5, 128
    else:
        grid = list(itertools.product([16, 64, 256], [0.01, 0.05, 0.2], [0.0, 1e-3]))
        epochs, hidden = args.epochs or 40, 256
    split = data()
    rows, t0 = [], time.perf_counter()
    for bs, lr, wd in grid:
        rows.append(train_one(bs, lr, wd, epochs, hidden, seed=0, split=split))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    header = f"{'batch':>6} {'lr':>6} {'wd':>7} {'test_acc':>9} {'alpha':>7} {'alpha_w':>8}"
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: r["alpha"]):
        lines.append(f"{r['batch_size']:>6} {r['lr']:>6g} {r['weight_decay']:>7g} {r['test_acc']:>9.4f} "
                     f"{r['alpha']:>7.3f} {r['alpha_weighted']:>8.3f}")
    for key in ("alpha", "alpha_weighted"):
        rho, pval = spearmanr([r[key] for r in rows], [r["test_acc"] for r in rows])
        lines.append(f"Spearman(mean {key}, test accuracy) = {rho:+.3f} (p = {pval:.3g}, n = {len(rows)})")
    lines.append(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    with open(out / "sweep.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in r.values()) + "\n" for r in rows)
    plot(rows, out / "sweep.png")
    print(f"table: {out / 'sweep.csv'}  plot: {out / 'sweep.png'}")
    return rows


if __name__ == "__main__":
    main()
