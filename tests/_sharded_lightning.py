"""Lightning's ModelParallelStrategy on CPU (2 processes, gloo), FSDP2 applied in ``configure_model``,
watched by the Lightning ``WeightWatcherCallback`` (run by tests/test_sharded.py as
``python _sharded_lightning.py OUT``; Lightning launches rank 1 itself).

A second callback, after it, copies the full weights into an unsharded replica at the same hooks
and drives a ``ww_monitor.Monitor`` on it; each rank writes both histories to OUT/lightning.rank<r>.json.
The Lightning ``TempBalance`` (its own alphas, gathered) and ``AlphaDecay`` (the monitor's) balance the
training; a last callback records the lr and weight decay of every group each optimizer step runs with.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytorch_lightning as pl
from _sharded_runs import VOCAB, apply_fsdp2, build, dump_history
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import ModelParallelStrategy

import ww_monitor
from ww_monitor.monitoring.distributed import strip_wrapper_names

LR, WD = 0.05, 1e-3


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = build("fsdp2")

    def configure_model(self):
        apply_fsdp2(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        tokens = tokens.T  # (T, B)
        return nn.functional.cross_entropy(self.net(tokens).reshape(-1, VOCAB), tokens.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, weight_decay=WD)


class Replica(pl.Callback):
    """An unsharded copy, its weights taken from the sharded model wherever the monitor snapshots."""

    def __init__(self, options):
        self.replica = build("fsdp2")
        self.monitor = ww_monitor.Monitor(None, every_n_steps=1, **options)

    def _sync(self, pl_module):
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in pl_module.net.state_dict().items()}
        self.replica.load_state_dict(state)

    def on_train_start(self, trainer, pl_module):
        self._sync(pl_module)
        self.monitor.step(self.replica, trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.monitor.step(self.replica, trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self.monitor.close(self.replica, trainer.global_step)


class Probe(pl.Callback):
    """After the balancers: the groups (lr, weight decay, parameter names) of every optimizer step."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        names = {id(p): strip_wrapper_names(n) for n, p in pl_module.named_parameters()}
        trainer.optimizers[0].register_step_pre_hook(lambda o, a, k: self.seen.append(
            (trainer.global_step, [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
                                   for g in o.param_groups])))


def balancers_report(tb, ad, probe, pl_module) -> dict:
    names = {id(p): strip_wrapper_names(n) for n, p in pl_module.named_parameters()}
    return {"lr": tb.history.state_dict(), "wd": ad.history.state_dict(), "seen": probe.seen,
            "units": {u.name: sorted(names[id(p)] for p in u.params) for u in tb._find_units(pl_module)},
            "owned": {"lr": tb._source.last_owned, "wd": getattr(ad._source, "last_owned", [])},
            "failures": tb.stats["failures"] + ad.stats["failures"]}


if __name__ == "__main__":
    out = sys.argv[1]
    options = dict(blocking=True, figures_every_n_snapshots=None, peft="with_base", alerts=False, max_overhead=None)
    callback = ww_monitor.WeightWatcherCallback(every_n_epochs=1, **options)
    replica = Replica(options)
    tb = ww_monitor.TempBalance(every_n_epochs=None, every_n_train_steps=2, min_evals=8, use_monitor=False)
    ad = ww_monitor.AlphaDecay(every_n_train_steps=2, min_evals=8)  # after the monitor: reuses its analysis
    probe = Probe()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, VOCAB, (16, 6), generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=1, logger=TensorBoardLogger(out, name="tb", version=0), callbacks=[callback, replica, tb, ad, probe],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    model = Net()
    trainer.fit(model, DataLoader(data, batch_size=4))
    placements = sorted({str(getattr(p, "placements", "plain")) for p in model.parameters()})
    with open(os.path.join(out, f"lightning.rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"world": trainer.world_size, "global_step": trainer.global_step, "placements": placements,
                   "sharded": dump_history(callback.history), "plain": dump_history(replica.monitor.history),
                   "here": callback.stats["layers_analysed_here"],
                   "balancers": balancers_report(tb, ad, probe, model)}, f)
