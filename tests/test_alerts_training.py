"""Alerts and alpha-drift early stopping on real CPU training (issue 5 acceptance)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor as wwm
from ww_monitor.monitoring.alerts import AlertConfig, AlertError, WWMonitorAlert

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import rank_collapse


def test_strong_weight_decay_raises_rank_collapse_alert_and_normal_training_does_not(tmp_path):
    normal = rank_collapse.run(0.0, epochs=6, logdir=str(tmp_path))
    decayed = rank_collapse.run(0.05, epochs=6, logdir=str(tmp_path))
    assert [a for a in normal if a.rule == "rank_collapse"] == []
    collapsed = [a for a in decayed if a.rule == "rank_collapse"]
    assert "net.2" in {a.layer for a in collapsed}
    # net.2 stays collapsed for the rest of the run: one alert, not one per snapshot.
    assert [x.layer for x in collapsed].count("net.2") == 1
    a = next(a for a in collapsed if a.layer == "net.2")
    assert a.value > a.threshold == 0.1 and "net.2" in a.message and a.step > 0


class MLP(pl.LightningModule):
    def __init__(self, poison_at: int | None = None, lr: float = 0.05):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(32, 64), nn.Linear(64, 48), nn.Linear(48, 10)
        self.aux = nn.Linear(48, 48)  # an auxiliary head off the loss path, so NaN stays in one layer
        self.poison_at, self.lr = poison_at, lr

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        if self.poison_at is not None and self.global_step == self.poison_at:
            with torch.no_grad():
                self.aux.weight[0, 0] = float("nan")  # a layer goes non-finite mid-training
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g)),
                      batch_size=32)


def trainer(callbacks, epochs=4, **kw):
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


class DecayedMLP(MLP):
    def __init__(self, weight_decay: float):
        super().__init__(lr=0.1)
        self.weight_decay = weight_decay

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 3.0])
def test_weight_decay_that_erases_the_layers_raises_shrinking(weight_decay):
    """lr x weight decay = 0.3: every step keeps 70% of the weights (8 steps an epoch), so the
    largest eigenvalues fall ~2.5 decades an epoch; without weight decay nothing shrinks."""
    fired = []
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None,
                                   on_alert=fired.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WWMonitorAlert)
        trainer([ww], epochs=3).fit(DecayedMLP(weight_decay), loader())
    shrinking = [a for a in fired if a.rule == "shrinking" and not a.resolved]
    if weight_decay == 0:
        assert shrinking == []
        return
    assert {"fc1", "fc2"} <= {a.layer for a in shrinking}
    assert all(a.value > a.threshold == 3.0 and a.step > 0 for a in shrinking)
    # The decay is the finding; no alpha advice on the same layers ("over-trained?" would mislead).
    assert not [a for a in fired if a.rule.startswith("alpha") and a.layer in {"fc1", "fc2"}]


def test_non_finite_layer_alerts_and_training_continues():
    fired = []
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, on_alert=fired.append)
    t = trainer([ww], epochs=4)
    with pytest.warns(WWMonitorAlert, match="NaN/Inf"):
        t.fit(MLP(poison_at=10), loader())
    assert t.current_epoch == 4  # ran to the end
    nf = [a for a in fired if a.rule == "non_finite"]
    assert len(nf) == 1 and nf[0].layer == "aux"  # stays NaN for 3 snapshots: one alert (deduplicated)
    assert ww.alert_tracker.num_fired == len(ww.alerts_fired)


def test_non_finite_layer_can_stop_or_raise_when_asked():
    stop = AlertConfig(actions={"non_finite": ("log", "stop")})
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, alerts=stop)
    t = trainer([ww], epochs=6)
    t.fit(MLP(poison_at=10), loader())
    assert t.current_epoch < 6 and t.should_stop

    raise_cfg = AlertConfig(actions={"non_finite": ("raise",)})
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, alerts=raise_cfg)
    with pytest.raises(AlertError, match="aux has NaN/Inf"):
        trainer([ww], epochs=6).fit(MLP(poison_at=10), loader())


def test_alerts_can_be_disabled():
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, alerts=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WWMonitorAlert)
        trainer([ww], epochs=2).fit(MLP(poison_at=3), loader())
    assert ww.alert_tracker is None and ww.alerts_fired == []
    with pytest.raises(wwm.WWMonitorError, match="alerts"):
        wwm.WeightWatcherCallback(alerts="yes")


@pytest.mark.parametrize(
    "kwargs, criterion",
    [
        # Random-init alpha is far below 100: the floor stops at the first comparable snapshot.
        (dict(floor=100.0), "floor"),
        # Every change is below 1e9: "converged" after `patience` snapshots.
        (dict(floor=None, min_delta=1e9, patience=2), "converged"),
        # SGD at lr=0.5 grows the weights, so log_norm rises above its best (lowest) value.
        (dict(monitor="ww/summary/log_norm", floor=None, max_rise=1e-6), "above its best"),
    ],
)
def test_alpha_drift_early_stopping_modes(kwargs, criterion):
    # Every layer here has < 50 eigenvalues (unreliable fits, left out of the summary by default since
    # issue 10): average them anyway, so the modes have a value to act on.
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, alerts=False,
                                   summary_include_unreliable=True)
    # warmup=False: these modes are checked from the first snapshot (the warm-up has its own tests).
    stopper = wwm.AlphaDriftEarlyStopping(min_snapshots=1, warmup=False, **kwargs)
    t = trainer([ww, stopper], epochs=30)
    t.fit(MLP(lr=0.5), loader())
    assert t.current_epoch < 30, "did not stop"
    assert criterion in stopper.stopped_reason
    assert stopper.stopped_step in ww.history.steps


def test_alpha_drift_validation_and_state():
    with pytest.raises(wwm.WWMonitorError, match="monitor"):
        wwm.AlphaDriftEarlyStopping(monitor="val_loss")
    with pytest.raises(wwm.WWMonitorError, match="at least one"):
        wwm.AlphaDriftEarlyStopping(floor=None)
    s = wwm.AlphaDriftEarlyStopping(floor=None, min_delta=0.1)
    s.seen_steps = [0, 5]
    s.rule.update(3.0)
    u = wwm.AlphaDriftEarlyStopping(floor=None, min_delta=0.1)
    u.load_state_dict(s.state_dict())
    assert u.seen_steps == [0, 5] and u.rule.previous == 3.0


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import pytorch_lightning as pl
    import ww_monitor

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 48), nn.Linear(48, 10)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.c(torch.relu(self.b(torch.relu(self.a(x))))), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(128, 32, generator=g), torch.randint(0, 10, (128,), generator=g))
        ww = ww_monitor.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None,
                                              alerts=False, summary_include_unreliable=True)
        stop = ww_monitor.AlphaDriftEarlyStopping(floor=100.0, min_snapshots=2, warmup=False)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=20, logger=False,
                             callbacks=[ww, stop], enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(Net(), DataLoader(data, batch_size=16))
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"epoch": trainer.current_epoch, "reason": stop.stopped_reason}, f)
    """
)


@pytest.mark.timeout(240)
def test_alpha_drift_stops_all_ddp_ranks_together(tmp_path):
    script = tmp_path / "ddp_stop.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=220,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epoch"] == ranks[1]["epoch"] < 20
    assert all("below the floor" in r["reason"] for r in ranks)
