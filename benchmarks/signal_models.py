"""Model families, data and injected faults of ``bench_signals.py`` (small enough for 2 CPU cores).

Four families train well on CPU in seconds, each on its own task:

* ``mlp``: the quickstart's MLP (64-256-128-10) on scikit-learn's 8x8 digits;
* ``cnn``: two 3x3 convolutions and two linear layers on the same digits as 1x8x8 images;
* ``lstm``: a one-layer LSTM reading 20 steps of 8-d noise whose class is set by the sign
  pattern of two fixed projections of the sequence mean (4 classes);
* ``transformer``: token embedding (vocabulary 256, width 64), one transformer encoder layer
  and a linear head; the class of a 16-token sequence is the one marker token (of 4) hidden
  at a random position among random tokens.

Faults are Lightning callbacks that act at the end of training epoch ``onset_epoch - 1``,
i.e. right after the snapshot of that epoch end is due; the first snapshot that can see the
fault is the one of epoch ``onset_epoch``'s end (snapshot index ``onset_epoch + 1``, the
baseline at train start being index 0).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FAMILIES = ("mlp", "cnn", "lstm", "transformer")


# --------------------------------------------------------------------------- data
def _split(x, y, seed: int, batch_size: int, test_fraction: float = 0.2, train_size: int | None = None):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    if train_size is not None:
        train = train[:train_size]
    tr = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True,
                    generator=torch.Generator().manual_seed(seed))
    va = DataLoader(TensorDataset(x[test], y[test]), batch_size=512)
    return tr, va


def digits(seed: int, images: bool = False, batch_size: int = 64, train_size: int | None = None):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if images:
        x = x.view(-1, 1, 8, 8)
    return _split(x, torch.tensor(y, dtype=torch.long), seed, batch_size, train_size=train_size)


def sequences(seed: int, n: int = 2048, steps: int = 20, dim: int = 8):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, steps, dim, generator=g)
    proj = torch.randn(dim, 2, generator=torch.Generator().manual_seed(7))
    s = x.mean(1) @ proj
    y = (s[:, 0] > 0).long() * 2 + (s[:, 1] > 0).long()
    return _split(x, y, seed, 64)


def tokens(seed: int, n: int = 2048, length: int = 16, vocab: int = 256, classes: int = 4):
    """Token ids ``classes..vocab-1`` at random, plus one marker token (id = the class) at a
    random position: the model has to find the marker."""
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randint(classes, vocab, (n, length), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x[torch.arange(n), torch.randint(0, length, (n,), generator=g)] = y
    return _split(x, y, seed, 64)


# --------------------------------------------------------------------------- models
class Classifier(pl.LightningModule):
    """Cross-entropy training with SGD (momentum 0.9) or Adam; logs val/acc."""

    def __init__(self, net: nn.Module, lr: float, optimizer: str = "sgd", weight_decay: float = 0.0):
        super().__init__()
        self.net, self.lr, self.optimizer_name, self.weight_decay = net, lr, optimizer, weight_decay

    def forward(self, x):
        return self.net(x)

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
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


class LastStep(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 64, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def family(name: str, seed: int):
    """(LightningModule, train loader, val loader, epochs) of a healthy run of ``name``."""
    torch.manual_seed(seed)
    if name == "mlp":
        net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
        return Classifier(net, lr=0.05), *digits(seed), 10
    if name == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
        return Classifier(net, lr=0.02), *digits(seed, images=True), 10
    if name == "lstm":
        return Classifier(LastStep(), lr=0.003, optimizer="adam"), *sequences(seed), 10
    if name == "transformer":
        return Classifier(TinyTransformer(), lr=0.003, optimizer="adam"), *tokens(seed), 10
    raise ValueError(f"unknown family {name!r}; families are {FAMILIES}")


# --------------------------------------------------------------------------- faults
class Fault(pl.Callback):
    """Acts once at the end of training epoch ``onset_epoch - 1`` (and, if ``keep``, after every
    later optimizer step)."""

    def __init__(self, onset_epoch: int):
        self.onset_epoch = onset_epoch
        self.active = False

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.onset_epoch - 1 and not self.active:
            self.active = True
            with torch.no_grad():
                self.inject(trainer, pl_module)

    def inject(self, trainer, pl_module):  # pragma: no cover - overridden
        raise NotImplementedError


class StrongWeightDecay(Fault):
    """Strong decoupled weight decay on ``layer`` from the onset: after every optimizer step its
    weight is multiplied by ``1 - lr * weight_decay`` (as AdamW does). Directions no gradient
    sustains shrink geometrically to zero: rank collapse."""

    def __init__(self, onset_epoch: int, layer: str, weight_decay: float = 4.0):
        super().__init__(onset_epoch)
        self.layer, self.weight_decay = layer, weight_decay

    def inject(self, trainer, pl_module):
        pass  # acts from the next optimizer step on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            with torch.no_grad():
                pl_module.get_submodule(self.layer).weight.mul_(1.0 - lr * self.weight_decay)


class NonFinite(Fault):
    """Write NaN into one weight of ``layer``."""

    def __init__(self, onset_epoch: int, layer: str):
        super().__init__(onset_epoch)
        self.layer = layer

    def inject(self, trainer, pl_module):
        pl_module.get_submodule(self.layer).weight[0, 0] = math.nan


class DivergingLR(Fault):
    """Multiply the learning rate by ``factor``: training diverges."""

    def __init__(self, onset_epoch: int, factor: float = 1000.0):
        super().__init__(onset_epoch)
        self.factor = factor

    def inject(self, trainer, pl_module):
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= self.factor


class DeadUnits(Fault):
    """Kill ``fraction`` of ``layer``'s output units: their weight rows are zeroed and stay zero
    (re-zeroed after every optimizer step, as units whose ReLU never fires again)."""

    def __init__(self, onset_epoch: int, layer: str, fraction: float = 0.5):
        super().__init__(onset_epoch)
        self.layer, self.fraction = layer, fraction
        self.rows = None

    def inject(self, trainer, pl_module):
        w = pl_module.get_submodule(self.layer).weight
        self.rows = torch.arange(int(self.fraction * w.shape[0]))
        w[self.rows] = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rows is not None:
            with torch.no_grad():
                pl_module.get_submodule(self.layer).weight[self.rows] = 0.0


def bottleneck(seed: int):
    """The rank-collapse example's MLP: 64 -ReLU-> 128 -> 128 (linear) -> 10. Weight decay
    shrinks every direction of the middle layer outside the head's 10-d row space to zero."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Linear(128, 10))
    return Classifier(net, lr=0.05), *digits(seed)


def overfit(seed: int, train_size: int = 32, batch_size: int = 4, lr: float = 0.1):
    """The MLP on ``train_size`` digits in batches of ``batch_size``, no regularisation."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    return Classifier(net, lr=lr), *digits(seed, train_size=train_size, batch_size=batch_size)
