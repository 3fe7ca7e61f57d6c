"""Rank collapse caught during training: too much weight decay on a linear bottleneck.

The same MLP (64 -> 128 -ReLU-> 128 -> 10, the last two layers linear) is trained twice on
scikit-learn's digits: once normally, once with strong weight decay. The bottleneck layer only
receives gradients in the <= 10-dimensional span of the classifier's rows; weight decay shrinks
every other direction geometrically until it is numerically zero (Martin & Mahoney: explicit
regularization too strong -> rank collapse). ``WeightWatcherCallback`` raises a
``rank_collapse`` alert naming the layer for the first run only.

    python examples/rank_collapse.py            # ~20 s on 2 CPU cores
    python examples/rank_collapse.py --epochs 4 # shorter (the test suite uses this)
"""

from __future__ import annotations

import argparse
import tempfile

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ww_monitor import WeightWatcherCallback
from ww_monitor.monitoring.alerts import AlertConfig


class Bottleneck(pl.LightningModule):
    def __init__(self, weight_decay: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Linear(128, 10))
        self.weight_decay = weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=self.weight_decay)


def loader() -> DataLoader:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def run(weight_decay: float, epochs: int, logdir: str) -> list:
    """Train once; returns the alerts that fired (the ``on_alert`` hook collects them)."""
    torch.manual_seed(0)
    fired = []
    ww = WeightWatcherCallback(
        every_n_epochs=1, blocking=True, figures_every_n_snapshots=None,
        alerts=AlertConfig(actions={"rank_collapse": ("log", "tensorboard", "callback")}),
        on_alert=fired.append,
    )
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[ww], logger=pl.loggers.TensorBoardLogger(logdir),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Bottleneck(weight_decay), loader())
    return [a for a in fired if not a.resolved]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--logdir", default=None, help="TensorBoard folder (default: a temporary one)")
    args = p.parse_args(argv)
    logdir = args.logdir or tempfile.mkdtemp(prefix="ww_rank_collapse_")
    out = {}
    for label, wd in (("normal (weight_decay=0)", 0.0), ("strong weight decay (0.05)", 0.05)):
        alerts = run(wd, args.epochs, logdir)
        collapse = [a for a in alerts if a.rule == "rank_collapse"]
        out[label] = collapse
        print(f"{label}: {len(collapse)} rank-collapse alert(s)")
        for a in collapse:
            print(f"  step {a.step}: {a.message}")
    print(f"TensorBoard: tensorboard --logdir {logdir}  (Text tab: ww/alerts)")
    return out


if __name__ == "__main__":
    main()
