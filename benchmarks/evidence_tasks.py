"""Tasks, models, the training module and the ground-truth probe of ``bench_evidence.py``.

Extends ``signal_models.py`` (its digits loaders and ``Classifier``) with what the evidence
benchmark needs: corrupted / shrunk / permuted training sets, an order-dependent token task for
a small transformer, learning-rate schedules (cosine, step, a too-steep warm-up, a one-off
spike), and :class:`Probe`, which logs everything the ground truths are computed from *without*
ww_monitor: the loss of every step, validation loss/accuracy per epoch, the exact numerical
rank of every weight matrix (``torch.linalg.matrix_rank``), dead ReLU units and activation
scales on a fixed probe batch, and the accuracy on a held-back earlier task.

Everything is seeded: one seed fixes the data split, the label corruption, the initialisation
and the batch order.
"""

from __future__ import annotations

import itertools
import math

import pytorch_lightning as pl
import signal_models as SM
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Digits: 8x8 images, 10 classes (scikit-learn's bundled copy, no download).
DIGITS_IN, DIGITS_CLASSES = 64, 10
#: Order task: sequences of ``SEQ_LEN`` tokens from a vocabulary of ``VOCAB``; the first
#: ``ORDER_CLASSES`` ids are markers. Two distinct markers sit at two random positions; the
#: class is the marker that comes first. Mean-pooled token embeddings cannot tell which came
#: first, so the encoder's attention (with learned positions) has to solve it.
SEQ_LEN, VOCAB, ORDER_CLASSES = 16, 64, 4
ORDER_TRAIN, ORDER_VAL = 2048, 512
#: Samples of the training set the probe runs on (dead units, activation scales).
PROBE_SAMPLES = 256
VAL_BATCH = 1024
#: A direction of a weight matrix counts as lost when its singular value is below this fraction
#: of the matrix's largest singular value *at initialisation*: it then carries less than a
#: thousandth of the signal the layer started with (a relative-to-now tolerance would miss a
#: layer that decays to zero as a whole, which is what excessive weight decay does).
LOST_RTOL = 1e-3


# --------------------------------------------------------------------------- data
def _loader(x, y, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def corrupt_labels(y: torch.Tensor, fraction: float, classes: int, seed: int) -> torch.Tensor:
    """A copy of ``y`` with ``fraction`` of the entries replaced by a uniformly drawn *other* class."""
    g = torch.Generator().manual_seed(5000 + seed)
    y = y.clone()
    idx = torch.randperm(len(y), generator=g)[: int(round(fraction * len(y)))]
    y[idx] = (y[idx] + torch.randint(1, classes, (len(idx),), generator=g)) % classes
    return y


def pixel_permutation(seed: int) -> torch.Tensor:
    return torch.randperm(DIGITS_IN, generator=torch.Generator().manual_seed(7000 + seed))


def digits_task(seed: int, batch_size: int = 64, train_size: int | None = None, label_noise: float = 0.0,
                permuted: bool = False):
    """(train loader, val tensors) of digits; labels of the *training* set corrupted with
    ``label_noise``, pixels permuted with a fixed seeded permutation when ``permuted``."""
    tr, va = SM.digits(seed, batch_size=batch_size, train_size=train_size)
    x, y = tr.dataset.tensors
    xv, yv = va.dataset.tensors
    if permuted:
        p = pixel_permutation(seed)
        x, xv = x[:, p], xv[:, p]
    if label_noise:
        y = corrupt_labels(y, label_noise, DIGITS_CLASSES, seed)
    return _loader(x, y, batch_size, seed), (xv, yv)


def order_sequences(n: int, seed: int, swap: bool = False):
    """``n`` sequences of the order task; ``swap``: the class is the marker that comes *second*
    (the same inputs, a conflicting rule: the second stage of the forgetting case)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(ORDER_CLASSES, VOCAB, (n, SEQ_LEN), generator=g)
    marks = torch.stack([torch.randperm(ORDER_CLASSES, generator=g)[:2] for _ in range(n)])
    pos = torch.stack([torch.randperm(SEQ_LEN, generator=g)[:2] for _ in range(n)])
    rows = torch.arange(n)
    x[rows, pos[:, 0]], x[rows, pos[:, 1]] = marks[:, 0], marks[:, 1]
    first = (pos[:, 0] < pos[:, 1]) != swap
    return x, torch.where(first, marks[:, 0], marks[:, 1])


def order_task(seed: int, batch_size: int = 64, train_size: int | None = None, label_noise: float = 0.0,
               swap: bool = False):
    x, y = order_sequences(ORDER_TRAIN, 3000 + seed, swap)
    xv, yv = order_sequences(ORDER_VAL, 4000 + seed, swap)
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    if label_noise:
        y = corrupt_labels(y, label_noise, ORDER_CLASSES, seed)
    return _loader(x, y, batch_size, seed), (xv, yv)


# --------------------------------------------------------------------------- models
def mlp(width: int = 256, depth: int = 3, init_scale: float = 1.0) -> nn.Sequential:
    """64 -> width (ReLU) x depth -> 10. ``init_scale`` multiplies every default-initialised
    weight (the vanishing / exploding initialisation cases)."""
    layers: list[nn.Module] = []
    fan_in = DIGITS_IN
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    net = nn.Sequential(*layers, nn.Linear(fan_in, DIGITS_CLASSES))
    _scale_weights(net, init_scale)
    return net


class OrderTransformer(nn.Module):
    """Token + learned position embeddings, ``depth`` pre-LN (GPT-style) ``nn.TransformerEncoderLayer``
    (4 heads, ReLU feed-forward of 2x width, no dropout), mean pooling, linear head.
    ``init_std``: every weight matrix drawn from N(0, init_std^2) (GPT-2 uses 0.02) instead of
    PyTorch's defaults."""

    def __init__(self, width: int = 64, depth: int = 2, init_scale: float = 1.0, init_std: float | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(SEQ_LEN, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, ORDER_CLASSES)
        if init_std is not None:
            with torch.no_grad():
                for p in self.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, init_std)
        _scale_weights(self, init_scale)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def _scale_weights(net: nn.Module, scale: float) -> None:
    if scale != 1.0:
        with torch.no_grad():
            for _name, p in net.named_parameters():
                if p.dim() >= 2:
                    p.mul_(scale)


def relu_inputs(net: nn.Module) -> list[str]:
    """Names of the modules whose outputs feed a ReLU (the units the dead-unit probe counts)."""
    if isinstance(net, nn.Sequential):
        mods = list(net.named_children())
        return [n for (n, m), (_, nxt) in itertools.pairwise(mods) if isinstance(m, nn.Linear) and isinstance(nxt, nn.ReLU)]
    return [n for n, m in net.named_modules() if n.endswith("linear1")]


# --------------------------------------------------------------------------- training
def lr_factor(schedule: str, step: int, total: int, ramp_to: float = 1.0, spike: tuple | None = None) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (of ``total``).

    ``constant``; ``cosine`` (to 0); ``step`` (x0.1 at half and at three quarters of training);
    ``ramp`` (linear from 1 to ``ramp_to`` over the run: a warm-up whose peak is too high).
    ``spike = (start, steps, factor)`` multiplies it by ``factor`` for ``steps`` steps."""
    t = min(step / max(total, 1), 1.0)
    f = {"constant": 1.0, "cosine": 0.5 * (1.0 + math.cos(math.pi * t)),
         "step": 0.1 ** ((t >= 0.5) + (t >= 0.75)), "ramp": 1.0 + (ramp_to - 1.0) * t}[schedule]
    if spike is not None and spike[0] <= step < spike[0] + spike[1]:
        f *= spike[2]
    return f


class TaskModule(SM.Classifier):
    """``signal_models.Classifier`` (it logs ``val/loss`` and ``val/acc`` per epoch) with SGD
    (momentum 0.9) or AdamW and a per-step schedule (:func:`lr_factor`)."""

    def __init__(self, net: nn.Module, lr: float, optimizer: str = "sgd", weight_decay: float = 0.0,
                 schedule: str = "constant", total_steps: int = 1, ramp_to: float = 1.0, spike: tuple | None = None):
        super().__init__(net, lr, optimizer, weight_decay)
        self.schedule, self.total_steps, self.ramp_to, self.spike = schedule, total_steps, ramp_to, spike

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(self.schedule, s, self.total_steps, self.ramp_to, self.spike))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------- ground-truth probe
def weight_matrices(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every 2-D weight the monitor analyses by default, attention in-projections split into
    q, k, v (as the monitor does), so ranks are comparable layer by layer."""
    out = {}
    for name, mod in net.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            for part, w in zip("qkv", mod.in_proj_weight.chunk(3)):
                out[f"{name}.{part}"] = w
            out[f"{name}.out_proj"] = mod.out_proj.weight
        elif isinstance(mod, (nn.Linear, nn.Embedding)) and ".out_proj" not in f".{name}":
            out[name] = mod.weight
    return out


class Probe(pl.Callback):
    """Logs the series the ground truths are computed from. Read-only: forward passes under
    ``no_grad`` on fixed tensors (the models have no dropout or batch norm), no RNG drawn.

    ``loss``: ``[step, training loss]`` after every optimizer step. ``epochs``: one record per
    probe (at train start, step 0, and after every epoch's validation): step, epoch,
    ``val_loss``/``val_acc``; per weight matrix (exact SVD, float64) ``min_dim``, ``rank`` (the
    numerical rank at float32 precision) and ``lost`` (singular values below :data:`LOST_RTOL`
    of the matrix's largest one at initialisation); ``dead`` per ReLU layer (fraction of units never positive on the probe
    batch), ``act_std`` and ``in_std`` (:func:`activations`), and ``old_acc`` (accuracy on ``old_task``, when given)."""

    def __init__(self, probe_x: torch.Tensor, old_task: tuple | None = None):
        self.probe_x, self.old_task = probe_x, old_task
        self.loss: list[list[float]] = []
        self.epochs: list[dict] = []
        self.s0_max: dict[str, float] = {}  # each matrix's largest singular value at initialisation

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module, epoch=-1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss.append([int(trainer.global_step), float(loss.detach())])

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation (Lightning >= 2)
        self._record(trainer, pl_module, epoch=trainer.current_epoch)

    @torch.no_grad()
    def _record(self, trainer, pl_module, epoch: int) -> None:
        net = pl_module.net
        cm = trainer.callback_metrics
        rec = {"step": int(trainer.global_step), "epoch": epoch,
               "val_loss": float(cm["val/loss"]) if epoch >= 0 and "val/loss" in cm else math.nan,
               "val_acc": float(cm["val/acc"]) if epoch >= 0 and "val/acc" in cm else math.nan}
        mats = weight_matrices(net)
        rec["min_dim"] = {n: min(w.shape) for n, w in mats.items()}
        rec["rank"], rec["lost"] = {}, {}
        for n, w in mats.items():
            if not torch.isfinite(w).all():
                rec["rank"][n] = rec["lost"][n] = -1  # a diverged layer has no spectrum
                continue
            s = torch.linalg.svdvals(w.detach().double())
            self.s0_max.setdefault(n, float(s[0]))  # the first probe is at initialisation
            # numerical rank at the weights' precision (numpy's matrix_rank rule, float32 eps)
            rec["rank"][n] = int((s > s[0] * max(w.shape) * torch.finfo(torch.float32).eps).sum())
            rec["lost"][n] = int((s < LOST_RTOL * self.s0_max[n]).sum())
        rec.update(activations(net, self.probe_x))
        if self.old_task is not None:
            x, y = self.old_task
            rec["old_acc"] = float((net(x).argmax(-1) == y).float().mean())
        self.epochs.append(rec)


@torch.no_grad()
def activations(net: nn.Module, probe_x: torch.Tensor) -> dict:
    """``dead`` per ReLU layer, the :func:`signal` of the last ReLU layer's output (``act_std``) and
    of the input features (``in_std``; token + position embeddings for the transformer) on ``probe_x``."""
    seen: dict[str, torch.Tensor] = {}
    names = relu_inputs(net)
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in names]
    try:
        net(probe_x)
    finally:
        for h in hooks:
            h.remove()
    feats = net.embed(probe_x) + net.pos if isinstance(net, OrderTransformer) else probe_x
    # A unit is dead when its input to the ReLU is <= 0 on every probe sample (and token);
    # non-finite activations (a diverged run) say nothing about it: NaN.
    dead = {n: float((z.reshape(-1, z.shape[-1]) > 0).sum(0).eq(0).float().mean()) if torch.isfinite(z).all()
            else math.nan for n, z in seen.items()}
    return {"in_std": signal(feats), "dead": dead, "act_std": signal(torch.relu(seen[names[-1]]))}


def signal(z: torch.Tensor) -> float:
    """The input-dependent part of a layer's output: RMS over units of each unit's standard
    deviation across the probe samples (and tokens). A constant, bias-driven output is no signal."""
    z = z.reshape(-1, z.shape[-1]).double()
    return float(z.var(0, unbiased=False).mean().sqrt())


def shadow_alpha_drift(**kwargs):
    """``AlphaDriftEarlyStopping`` that decides exactly as the real one (its own ``_check`` on
    the monitor's values) but does not end the run: training continues so the ground truth can
    be measured. The monitor is read-only, so the run up to ``stopped_step`` is the one the
    real callback would have stopped there."""
    from ww_monitor import AlphaDriftEarlyStopping

    class ShadowAlphaDriftEarlyStopping(AlphaDriftEarlyStopping):
        def _apply(self, trainer, reduce: bool) -> None:
            pass  # the decision is kept in stopped_step / stopped_reason; trainer.should_stop untouched

    return ShadowAlphaDriftEarlyStopping(**kwargs)
