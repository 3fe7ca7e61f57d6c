"""Does spectral balancing help at CPU scale? Baseline vs TempBalance vs AlphaDecay, several seeds.

Two small tasks where per-layer balance could matter:

* ``digits-cnn``: a 4-layer CNN (+ BatchNorm) on scikit-learn's 8x8 digits (bundled, no
  download), trained on 400 images, tested on the other 1397.
* ``teacher-student``: a fixed random "teacher" MLP (32-64-64-4, tanh) labels Gaussian inputs
  with the argmax of its 4 outputs; a deeper "student" MLP (32-128-128-128-128-4, ReLU) learns
  them from 400 samples (few, so it can over-fit) and is tested on 4000 fresh ones.

Every run uses the same optimizer (SGD, momentum 0.9, weight decay 5e-4, cosine learning-rate
schedule per step) and the same seeds; only the callback differs: none, ``TempBalance()`` (the
paper's settings: lr factors in [0.5, 1.5], Hill alpha, every epoch) or ``AlphaDecay(...)``
(weight-decay factors in [0.666, 3], Hill alpha; updated every epoch instead of the paper's
500 steps, since these runs are only a few hundred steps long). The table gives held-out
accuracy (mean and standard deviation over the seeds) and the mean final Hill alpha of the
balanced layers; the figure (``--plot``, default ``balancing.png``) shows accuracy per seed and
the final per-layer alphas::

    python examples/balancing.py                 # 2 tasks x 3 methods x 5 seeds, a few minutes
    python examples/balancing.py --seeds 10 --epochs 60 --plot out.png
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor
from ww_monitor.balancing import hill_alpha
from ww_monitor.balancing.groups import find_units

METHODS = ("baseline", "TempBalance", "AlphaDecay")
TASKS = ("digits-cnn", "teacher-student")
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.05, 0.9, 5e-4, 32
CLASSES = 4  # teacher-student classes


def digits_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, train_size=400, random_state=seed, stratify=y)
    return (xtr, ytr), (xte, yte)


def digits_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))


def teacher_student_data(seed: int, n_train: int = 400, n_test: int = 4000):
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1))
        x = torch.randn(n_train + n_test, 32, generator=g)
        y = teacher(x).argmax(-1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def student_model() -> nn.Module:
    sizes = [32, 128, 128, 128, 128, CLASSES]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, total_steps: int):
        super().__init__()
        self.net, self.total_steps = net, total_steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_callback(method: str):
    if method == "TempBalance":
        return [ww_monitor.TempBalance(log_factors=False)]
    if method == "AlphaDecay":
        return [ww_monitor.AlphaDecay(every_n_epochs=1, every_n_train_steps=None, log_factors=False)]
    return []


def final_alphas(net: nn.Module) -> dict[str, float]:
    """Hill alpha (median xmin) of every balanced layer, as the callbacks see it."""
    out = {}
    with torch.no_grad():
        for unit in find_units(net):
            evals = np.concatenate([torch.linalg.svdvals(m.weight.double()).square().reshape(-1).numpy() * m.eig_scale
                                    for m in unit.matrices])
            out[unit.name] = hill_alpha(evals) if evals.size >= 50 else math.nan
    return out


def run(task: str, method: str, seed: int, epochs: int) -> dict:
    (xtr, ytr), (xte, yte) = digits_data(seed) if task == "digits-cnn" else teacher_student_data(seed)
    torch.manual_seed(seed)
    net = digits_model() if task == "digits-cnn" else student_model()
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=BATCH, shuffle=True, generator=g)
    model = Classifier(net, epochs * len(loader))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=make_callback(method), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, loader)
    net.eval()
    with torch.no_grad():
        acc = float((net(xte).argmax(-1) == yte).float().mean())
    return {"task": task, "method": method, "seed": seed, "acc": acc, "alphas": final_alphas(net)}


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for task in TASKS:
        for method in METHODS:
            sel = [r for r in rows if r["task"] == task and r["method"] == method]
            if not sel:
                continue
            accs = np.array([r["acc"] for r in sel])
            inner = [list(r["alphas"].values())[1:-1] for r in sel]  # the balanced layers (not first/last)
            mean_alpha = float(np.nanmean([a for row in inner for a in row]))
            table.append({"task": task, "method": method, "n": len(sel), "acc_mean": float(accs.mean()),
                          "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "alpha_mean": mean_alpha})
    return table


def print_table(table: list[dict]) -> None:
    print(f"{'task':<16} {'method':<12} {'seeds':>5}  {'test acc (mean +- std)':>24}  {'mean alpha':>10}")
    for t in table:
        print(f"{t['task']:<16} {t['method']:<12} {t['n']:>5}  {100 * t['acc_mean']:>15.2f} +- {100 * t['acc_std']:5.2f}"
              f"  {t['alpha_mean']:>10.3f}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig = Figure(figsize=(5.5 * len(tasks), 7), constrained_layout=True)
    axes = fig.subplots(2, len(tasks), squeeze=False)
    colors = {"baseline": "tab:gray", "TempBalance": "tab:blue", "AlphaDecay": "tab:orange"}
    for j, task in enumerate(tasks):
        ax = axes[0, j]
        for i, method in enumerate(METHODS):
            accs = [100 * r["acc"] for r in rows if r["task"] == task and r["method"] == method]
            ax.scatter(np.full(len(accs), i) + np.linspace(-0.12, 0.12, len(accs)), accs, color=colors[method], s=18)
            if accs:
                ax.errorbar(i, np.mean(accs), yerr=np.std(accs, ddof=1) if len(accs) > 1 else 0, fmt="_k",
                            markersize=22, capsize=4)
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(f"{task}: held-out accuracy per seed")
        ax.set_ylabel("test accuracy (%)")
        ax = axes[1, j]
        for method in METHODS:
            sel = [r for r in rows if r["task"] == task and r["method"] == method]
            if not sel:
                continue
            names = [n for n, a in sel[0]["alphas"].items() if math.isfinite(a)]  # >= 50 eigenvalues
            mean = np.nanmean([[r["alphas"][n] for n in names] for r in sel], axis=0)
            ax.plot(range(len(names)), mean, "o-", color=colors[method], label=method)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(f"{task}: final Hill alpha per layer (seed mean)")
        ax.set_ylabel("alpha")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--plot", default="balancing.png", help="figure path ('' for none)")
    args = parser.parse_args(argv)
    rows, t0 = [], time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning")  # data-loader worker hints
        for task in args.tasks:
            for seed in range(args.seeds):
                for method in METHODS:
                    rows.append(run(task, method, seed, args.epochs))
    print(f"{len(rows)} runs, {args.epochs} epochs each, in {time.perf_counter() - t0:.0f} s\n")
    table = summarise(rows)
    print_table(table)
    if args.plot:
        plot(rows, args.plot)
        print(f"\nfigure: {args.plot}")
    return table


if __name__ == "__main__":
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and leaves the other cores free
    main()
