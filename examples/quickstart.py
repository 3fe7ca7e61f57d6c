"""Quickstart: watch the weight spectra of a small MLP while it learns scikit-learn's digits.

Runs on CPU in a few seconds (no download: the 8x8 digits ship with scikit-learn)::

    python examples/quickstart.py                   # logs to ww_logs/
    python examples/quickstart.py --logdir /tmp/ww --epochs 10
    tensorboard --logdir ww_logs/

In TensorBoard: Scalars ``ww/alpha/<layer>``, ``ww/summary/alpha`` ...; Histograms
``ww/esd/<layer>`` (the ESD of log10 eigenvalues at every snapshot); Images ``ww/plots/...``;
Custom Scalars groups the per-layer curves of each metric; Text ``ww/layers``.

Use ``--lightning`` to run with ``import lightning.pytorch`` instead of ``pytorch_lightning``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_loaders(batch_size: int = 64, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(xva, yva), batch_size=256)
    return train, val


def make_model(pl):
    class DigitsMLP(pl.LightningModule):
        def __init__(self, hidden: int = 256, lr: float = 0.05):
            super().__init__()
            self.fc1 = nn.Linear(64, hidden)
            self.fc2 = nn.Linear(hidden, hidden // 2)
            self.out = nn.Linear(hidden // 2, 10)
            self.lr = lr

        def forward(self, x):
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val/loss", nn.functional.cross_entropy(logits, y))
            self.log("val/acc", (logits.argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return DigitsMLP()


def print_table(history, val_acc: float | None) -> None:
    df = history.to_pandas()
    last = df[df["step"] == df["step"].max()]
    first = df[df["step"] == df["step"].min()].set_index("name")
    cols = ["name", "kind", "N", "M", "num_evals", "num_pl_spikes", "reliable", "alpha", "alpha_weighted",
            "log_spectral_norm", "stable_rank", "rank_loss", "phase"]
    print(f"\nPer-layer summary at step {int(last['step'].iloc[0])} (snapshot {len(history)} of {len(history)};"
          f" alpha at the baseline in brackets):")
    header = f"{'layer':<8}{'kind':<8}{'N x M':>10}{'evals/tail':>12}{'alpha':>17}{'alpha_w':>9}{'log_spec':>10}" \
             f"{'st_rank':>9}{'rk_loss':>8}  phase"
    print(header)
    print("-" * len(header))
    for _, row in last[cols].iterrows():
        a0 = first.loc[row["name"], "alpha"] if row["name"] in first.index else math.nan
        nm = f"{int(row['N'])}x{int(row['M'])}"
        counts = f"{int(row['num_evals'])}/{int(row['num_pl_spikes'])}"
        mark = " " if row["reliable"] else "*"  # * : too few eigenvalues for a trusted fit
        phase = row["phase"] if isinstance(row["phase"], str) else "undetermined"
        print(f"{row['name']:<8}{row['kind']:<8}{nm:>10}{counts:>12}{row['alpha']:>8.2f}{mark}({a0:>5.2f})"
              f"{row['alpha_weighted']:>9.2f}{row['log_spectral_norm']:>10.2f}{row['stable_rank']:>9.1f}"
              f"{int(row['rank_loss']):>8}  {phase}")
    mean = history[-1].summary
    used = int(mean.get("num_layers", 0) - mean.get("num_unreliable", 0))
    print("\n* unreliable fit (fewer than 50 eigenvalues or 10 in the tail): no phase, left out of the means.")
    print(f"mean alpha {mean.get('alpha', math.nan):.2f}, mean alpha_weighted {mean.get('alpha_weighted', math.nan):.2f}"
          f" (over the {used} reliable layers)"
          + (f", validation accuracy {val_acc:.3f}" if val_acc is not None else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description="WeightWatcherCallback quickstart on scikit-learn's digits")
    parser.add_argument("--logdir", default="ww_logs/", help="TensorBoard log folder (default: ww_logs/)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lightning", action="store_true", help="use lightning.pytorch instead of pytorch_lightning")
    args = parser.parse_args()

    if args.lightning:
        pl = importlib.import_module("lightning.pytorch")
        from ww_monitor.lightning import WeightWatcherCallback
    else:
        pl = importlib.import_module("pytorch_lightning")
        from ww_monitor import WeightWatcherCallback

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    # figures_min_run_seconds=0: this demo is shorter than the default 60 s after which figures are
    # drawn, and it is here to show them; figures_timeout: wait for them even on a busy machine.
    ww = WeightWatcherCallback(every_n_epochs=1, figures_every_n_snapshots=4, max_figure_layers=2,
                               figures_min_run_seconds=0, figures_timeout=300)
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="digits")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[ww],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
    )
    t0 = time.perf_counter()
    trainer.fit(make_model(pl), train, val)
    elapsed = time.perf_counter() - t0
    acc = trainer.callback_metrics.get("val/acc")
    print_table(ww.history, float(acc) if acc is not None else None)
    print(f"\n{len(ww.history)} snapshots in {elapsed:.1f} s of training ({ww.stats['snapshots_skipped']} skipped, "
          f"{ww.stats['snapshots_deferred']} deferred by the cost budget).")
    # --logdir at the logger's root, not at version_N: TensorBoard names each run by its path below
    # --logdir, so this run shows as "digits/version_0" (pointing at the run itself shows it as ".").
    run_name = os.path.relpath(logger.log_dir, logger.save_dir)
    print(f"Look at it with (run {run_name!r}):\n    tensorboard --logdir {os.path.abspath(logger.save_dir)}")
    from ww_monitor.outputs.offline_report import write_report

    report = write_report(logger.log_dir, os.path.join(logger.log_dir, "report.html"))
    print(f"Offline HTML report (alpha over training, phases, ESDs, alerts):\n    {os.path.abspath(report)}")


if __name__ == "__main__":
    main()
