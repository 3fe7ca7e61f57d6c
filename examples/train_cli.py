"""LightningCLI entry point: the WeightWatcherCallback configured from YAML, no code changes.

A small MLP on scikit-learn's bundled digits (no download) behind ``pytorch_lightning.cli.LightningCLI``;
the callback and the logger come from a config file in ``configs/``::

    python examples/train_cli.py fit --config configs/default.yaml
    python examples/train_cli.py fit --config configs/large_model.yaml --trainer.max_epochs=20
    python examples/train_cli.py fit --config configs/early_stopping.yaml
    python examples/train_cli.py fit --config configs/alpha_drift.yaml
    python examples/train_cli.py fit --config configs/default.yaml --print_config   # resolved options
    tensorboard --logdir ww_logs/

Any value can be overridden on the command line, e.g. ``--trainer.max_steps=50`` or
``--trainer.logger.init_args.save_dir=/tmp/ww``. Needs ``pip install "ww-monitor[cli,examples]"``
(jsonargparse for LightningCLI, scikit-learn for the data).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsClassifier(pl.LightningModule):
    """MLP for the 8x8 digits: ``encoder`` (two hidden Linear layers) and a ``head``.

    Args:
        hidden: width of the first hidden layer (the second has half).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
    """

    def __init__(self, hidden: int = 256, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU())
        self.head = nn.Linear(hidden // 2, 10)

    def forward(self, x):
        return self.head(self.encoder(x))

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
        h = self.hparams
        return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1797 8x8 digits, scaled to [0, 1], stratified train/validation split.

    Args:
        batch_size: training batch size.
        val_fraction: share of the samples held out for validation.
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0):
        super().__init__()
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.train_set = self.val_set = None

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        xtr, xva, ytr, yva = train_test_split(x, y, test_size=self.val_fraction, random_state=self.seed, stratify=y)
        self.train_set, self.val_set = TensorDataset(xtr, ytr), TensorDataset(xva, yva)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)


def main(args=None) -> LightningCLI:
    """Run the CLI (``args``: a list of command-line arguments or a dict; default ``sys.argv``)."""
    return LightningCLI(
        DigitsClassifier, DigitsDataModule, seed_everything_default=0, args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
