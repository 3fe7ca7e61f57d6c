"""Rough edges of the front doors: misspelt arguments, empty schedules, steps that go back, a
``Monitor`` never closed, and one layer column name across ``Report`` and ``history``."""

import copy
import gc
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.errors import WWMonitorError

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.filterwarnings("ignore:.*(no logger|not analysed|figures).*:RuntimeWarning")


def _front_doors():
    import ww_monitor.lightning as lightning_pkg
    from ww_monitor.huggingface import WeightWatcherCallback as HFCallback

    return {
        "WeightWatcherCallback": (wwm.WeightWatcherCallback, "every_n_epochs"),
        "WeightWatcherCallback (lightning.pytorch)": (lightning_pkg.WeightWatcherCallback, "every_n_epochs"),
        "huggingface.WeightWatcherCallback": (HFCallback, "every_n_steps"),
        "Monitor": (wwm.Monitor, "every_n_steps"),
        "AlphaDriftEarlyStopping": (wwm.AlphaDriftEarlyStopping, "patience"),
        "AlphaDriftEarlyStopping (lightning.pytorch)": (lightning_pkg.AlphaDriftEarlyStopping, "patience"),
    }


@pytest.mark.parametrize("door", list(_front_doors()))
def test_misspelt_argument_names_the_front_door_and_the_closest_name(door):
    cls, argument = _front_doors()[door]
    owner = door.split(" (")[0]
    with pytest.raises(WWMonitorError) as err:
        cls(**{argument[:-1]: 2})  # every_n_epoch, every_n_step, patienc
    message = str(err.value)
    assert message == f"{owner}: unknown argument `{argument[:-1]}`; did you mean `{argument}`?"
    assert "Engine" not in message and "Mixin" not in message
    with pytest.raises(WWMonitorError, match=rf"^{owner}: unknown argument `blocknig`; did you mean `blocking`\?$"
                       if "AlphaDrift" not in owner else rf"^{owner}: unknown argument `blocknig`; valid arguments: "):
        cls(blocknig=True)


def test_options_passed_on_are_checked_against_the_engine_and_the_front_door():
    from ww_monitor.huggingface import WeightWatcherCallback as HFCallback

    with pytest.raises(WWMonitorError, match=r"^huggingface.WeightWatcherCallback: unknown argument `tensorbord`; "
                                             r"did you mean `tensorboard`\?$"):
        HFCallback(tensorbord=True)
    with pytest.raises(WWMonitorError, match=r"^Monitor: `every_n_epochs` is not an argument here; use "
                                             r"`every_n_steps`\.$"):
        wwm.Monitor(every_n_epochs=1)
    with pytest.raises(WWMonitorError, match=r"`alpha_drift`: AlphaDriftEarlyStopping: unknown argument `flor`; "
                                             r"did you mean `floor`\?"):
        HFCallback(alpha_drift={"flor": 2.0})
    with pytest.raises(WWMonitorError, match=r"^Monitor: takes at most 2 positional argument"):
        wwm.Monitor(None, 5, True)
    # the typed signature is what LightningCLI and help() read; copies still work
    import inspect

    assert "every_n_epochs" in inspect.signature(wwm.WeightWatcherCallback).parameters
    cb = wwm.WeightWatcherCallback(every_n_epochs=2, exclude="head")
    assert copy.deepcopy(cb).every_n_epochs == 2


@pytest.mark.parametrize("make, message", [
    (lambda: wwm.WeightWatcherCallback(every_n_epochs=0), "WeightWatcherCallback: `every_n_epochs=0` is not a schedule"),
    (lambda: wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=0),
     "WeightWatcherCallback: `every_n_train_steps=0` is not a schedule"),
    (lambda: wwm.WeightWatcherCallback(every_n_epochs=None), "WeightWatcherCallback: no snapshot schedule"),
    (lambda: wwm.WeightWatcherCallback(ends_only=True), "WeightWatcherCallback: `ends_only=True` takes only the baseline"),
    (lambda: wwm.Monitor(every_n_steps=0), "Monitor: `every_n_steps=0` is not a schedule"),
    (lambda: wwm.Monitor(every_n_steps=None), "Monitor: no snapshot schedule: `every_n_steps` is None"),
    (lambda: _hf(every_n_epochs=None), "huggingface.WeightWatcherCallback: no snapshot schedule"),
    (lambda: _hf(every_n_epochs=0), "huggingface.WeightWatcherCallback: `every_n_epochs=0` is not a schedule"),
    (lambda: wwm.WeightWatcherCallback(max_pending=0), "WeightWatcherCallback: `max_pending` must be"),
])
def test_empty_schedules_are_rejected(make, message):
    with pytest.raises(WWMonitorError) as err:
        make()
    assert str(err.value).startswith(message)


def _hf(**kwargs):
    from ww_monitor.huggingface import WeightWatcherCallback as HFCallback

    return HFCallback(**kwargs)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))


def train(monitor, model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in steps:
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        monitor.step(model, step)


def test_ends_only_takes_the_baseline_and_the_final_snapshot():
    model = make_model()
    monitor = wwm.Monitor(every_n_steps=None, ends_only=True, blocking=True, figures_every_n_snapshots=None)
    train(monitor, model, range(1, 13))
    monitor.close(model, 12)
    assert monitor.history.steps == [1, 12]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g))
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, ends_only=True, blocking=True, figures_every_n_snapshots=None)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    assert cb.history.steps == [0, trainer.global_step] == [0, 12]


def test_steps_that_go_back_warn_once_and_are_ignored():
    model = make_model()
    seen = []
    monitor = wwm.Monitor(lambda metrics, step: seen.append(step), every_n_steps=5, blocking=True,
                          figures_every_n_snapshots=None)
    train(monitor, model, range(1, 8))
    with pytest.warns(RuntimeWarning, match=r"^Monitor: step 0 is before the previous step 7; .*\(warned once per run\)"):
        train(monitor, model, range(0, 6))  # a per-epoch batch index restarting: 0..5
    assert monitor.history.steps == [1, 5]  # nothing taken at the repeated 5, nor at 0
    monitor.close(model, 7)
    assert monitor.history.steps == [1, 5, 7]


def test_monitor_dropped_without_close_warns_and_writes_the_final_snapshot():
    seen = []
    model = make_model()
    monitor = wwm.Monitor(lambda metrics, step: seen.append(step), every_n_steps=5, blocking=True,
                          figures_every_n_snapshots=None)
    train(monitor, model, range(1, 8))
    assert sorted(set(seen)) == [1, 5]
    history = monitor.history
    with pytest.warns(RuntimeWarning, match=r"^Monitor: not closed when it is garbage-collected; closing it now: "
                                            r"the final snapshot \(step 7\)"):
        del monitor
        gc.collect()
    assert history.steps == [1, 5, 7] and sorted(set(seen)) == [1, 5, 7]


UNCLOSED = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter
    import ww_monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = ww_monitor.Monitor(SummaryWriter(sys.argv[1]), every_n_steps=5, figures_every_n_snapshots=None)
    for step in range(1, 13):
        model(torch.randn(16, 32)).pow(2).mean().backward()
        opt.step(); opt.zero_grad()
        monitor.step(model, step)
    print("done without close")
""")


def test_monitor_not_closed_at_exit_warns_and_flushes_to_tensorboard(tmp_path):
    """A real interpreter exit: background analysis, a SummaryWriter never closed, no close()."""
    res = subprocess.run([sys.executable, "-c", UNCLOSED, str(tmp_path / "tb")], capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr
    assert "done without close" in res.stdout
    assert "Monitor: not closed when the interpreter exits; closing it now: the final snapshot (step 12)" in res.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("ww/alpha/0")]
    assert steps[0] == 1 and steps[-1] == 12  # the baseline and the final snapshot, written at exit


def test_report_and_history_share_the_layer_column():
    model = make_model()
    monitor = wwm.Monitor(every_n_steps=5, blocking=True, figures_every_n_snapshots=None)
    train(monitor, model, range(1, 6))
    monitor.close()
    history = monitor.history.to_pandas()
    report = wwm.analyze(model).to_pandas()
    assert "name" in history.columns and "layer" not in history.columns and "name" in report.columns
    last = history[history.step == 5].merge(report, on="name", suffixes=("_history", "_report"))
    assert list(last.name) == ["0", "2"]
    assert monitor.history.metric("alpha").columns.tolist() == ["0", "2"]
    old = monitor.history.to_pandas(layer_column="layer")  # the name in 0.1.0, kept for old code
    assert list(old.layer) == list(history.name)
    with pytest.raises(WWMonitorError, match="layer_column"):
        monitor.history.to_pandas(layer_column="layers")
