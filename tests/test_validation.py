"""Constructor validation, selection messages, skip accounting and cost guards of the callback."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor as wwm
from ww_monitor.errors import WWMonitorError
from ww_monitor.monitoring.alerts import AlertConfig

pl = pytest.importorskip("pytorch_lightning")


@pytest.mark.parametrize("kwargs, name", [
    (dict(floor="2"), "floor"), (dict(floor=math.nan), "floor"), (dict(floor=math.inf), "floor"),
    (dict(max_rise=-1.0), "max_rise"), (dict(min_delta="0.1"), "min_delta"), (dict(patience=True), "patience"),
    (dict(patience=0), "patience"), (dict(min_snapshots=1.5), "min_snapshots"), (dict(verbose="yes"), "verbose"),
    (dict(monitor="alpha"), "monitor"),
])
def test_alpha_drift_early_stopping_rejects_bad_arguments(kwargs, name):
    with pytest.raises(WWMonitorError, match=f"AlphaDriftEarlyStopping: `{name}`"):
        wwm.AlphaDriftEarlyStopping(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(alpha_low="2"), "alpha_low"), (dict(alpha_high=math.nan), "alpha_high"),
    (dict(rank_loss_fraction=0.0), "rank_loss_fraction"), (dict(alpha_high_warmup=-1), "alpha_high_warmup"),
    (dict(alpha_min_evals=2.5), "alpha_min_evals"), (dict(phase_regression_steps=0), "phase_regression_steps"),
    (dict(max_traps=None), "max_traps"), (dict(enabled=["alpha_lo"]), "enabled"),
    (dict(actions={"alpha_low": ["shout"]}), "actions\\['alpha_low'\\]"), (dict(actions=["warn"]), "actions"),
])
def test_alert_config_rejects_bad_arguments_with_wwmonitor_error(kwargs, name):
    with pytest.raises(WWMonitorError, match=f"AlertConfig: `{name}`"):
        AlertConfig(**kwargs)


def test_alert_config_accepts_a_single_name_for_enabled_and_actions():
    c = AlertConfig(enabled="rank_collapse", actions={"rank_collapse": "stop"})
    assert c.enabled == ("rank_collapse",) and c.actions_for("rank_collapse") == ("stop",)


@pytest.mark.parametrize("kwargs, name", [
    (dict(figures_min_run_seconds=-1), "figures_min_run_seconds"), (dict(drain_timeout=math.nan), "drain_timeout"),
    (dict(every_n_epochs=True), "every_n_epochs"), (dict(max_pending="2"), "max_pending"),
])
def test_callback_rejects_bad_arguments(kwargs, name):
    with pytest.raises(WWMonitorError, match=f"`{name}`"):
        wwm.WeightWatcherCallback(**kwargs)


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60000, 8)  # N=60000 > max_n=50000
        self.body = nn.Linear(8, 32)
        self.head = nn.Linear(32, 2)  # 2 eigenvalues < min_evals=8

    def forward(self, idx):
        return self.head(torch.relu(self.body(self.emb(idx))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, cb, callbacks=(), **kw):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 60000, (32,), generator=g), torch.randint(0, 2, (32,), generator=g)),
                      batch_size=8)
    kw.setdefault("max_epochs", 2)
    kw.setdefault("logger", False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[cb, *callbacks], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), data)
    return trainer, [str(w.message) for w in caught]


def test_callback_reports_layers_left_out_by_the_size_limits(tmp_path):
    cb = wwm.WeightWatcherCallback(blocking=True)
    _fit(tmp_path, cb)
    record = cb.history[-1]
    assert record.layers == ("body",)
    reasons = dict(record.skipped)
    assert "max_n=50000" in reasons["emb"] and "min_evals=8" in reasons["head"]
    assert record.summary["num_skipped"] == 2


def test_selection_matching_nothing_lists_the_available_layers(tmp_path):
    cb = wwm.WeightWatcherCallback(include="^decoder", blocking=True)
    _, messages = _fit(tmp_path, cb)
    (msg,) = [m for m in messages if "no weight matrix matches the selection" in m]
    assert "include=['^decoder']" in msg and "emb, body, head" in msg


def test_every_layer_too_small_is_said_so(tmp_path):
    cb = wwm.WeightWatcherCallback(min_evals=100, max_n=None, blocking=True)
    _, messages = _fit(tmp_path, cb)
    (msg,) = [m for m in messages if "no layer can be analysed" in m]
    assert "min_evals=100" in msg and "no weight matrix matches" not in msg


def test_misspelt_monitor_key_warns_once(tmp_path):
    cb = wwm.WeightWatcherCallback(blocking=True, every_n_train_steps=1)
    stopper = wwm.AlphaDriftEarlyStopping(monitor="ww/summary/alpah")
    _, messages = _fit(tmp_path, cb, callbacks=[stopper])
    missing = [m for m in messages if "monitor='ww/summary/alpah' is not among" in m]
    assert len(missing) == 1 and "did you mean 'ww/summary/alpha'" in missing[0]
    assert len(cb.history) > 3


def test_fast_dev_run_takes_no_snapshot_but_checks_the_selection(tmp_path):
    cb = wwm.WeightWatcherCallback(include="^decoder")
    _, messages = _fit(tmp_path, cb, fast_dev_run=True)
    assert len(cb.history) == 0 and cb.stats["snapshots_taken"] == 0
    assert any("no weight matrix matches the selection" in m for m in messages)
    assert cb.stats["train_thread_seconds"] < 0.5


def test_no_figures_without_a_logger_that_stores_them(tmp_path, monkeypatch):
    """A CSV-only run never starts the renderer, even with figures due at every snapshot."""
    import ww_monitor.monitoring.subprocess_worker

    def no_renderer(*args, **kwargs):
        raise AssertionError("figure renderer started")

    monkeypatch.setattr(ww_monitor.monitoring.subprocess_worker, "SubprocessWorker", no_renderer)
    # on_lag="wait": a 30 ms run can end its first epoch before the baseline is analysed
    cb = wwm.WeightWatcherCallback(figures_every_n_snapshots=1, figures_min_run_seconds=0, on_lag="wait")
    _, messages = _fit(tmp_path, cb, logger=pl.loggers.CSVLogger(str(tmp_path)))
    assert len(cb.history) == 3 and not any("figure" in m for m in messages)


def test_figures_wait_for_runs_long_enough(tmp_path, monkeypatch):
    import ww_monitor.monitoring.subprocess_worker

    def no_renderer(*args, **kwargs):
        raise AssertionError("figure renderer started")

    monkeypatch.setattr(ww_monitor.monitoring.subprocess_worker, "SubprocessWorker", no_renderer)
    cb = wwm.WeightWatcherCallback(figures_every_n_snapshots=1, on_lag="wait")  # default figures_min_run_seconds=60
    _fit(tmp_path, cb, logger=pl.loggers.TensorBoardLogger(str(tmp_path)))
    assert len(cb.history) == 3


def test_renderer_subprocess_closes_its_pipes_and_keeps_its_stderr():
    """The figure renderer's pipes are closed (no ``ResourceWarning: unclosed file``) and what the
    child writes to stderr (library warnings) does not reach the user's terminal."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import gc, warnings
        from ww_monitor.monitoring.subprocess_worker import SubprocessWorker
        w = SubprocessWorker(num_threads=1, nice=0)
        w.submit("job", 0, warnings.warn, ("CHILD-WARNING",))
        assert w.wait(60)
        print("result", w.poll()[0].error)
        w.close(5)
        del w
        gc.collect()
    """)
    res = subprocess.run([sys.executable, "-X", "dev", "-W", "always::ResourceWarning", "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "result None" in res.stdout
    assert "unclosed" not in res.stderr and "CHILD-WARNING" not in res.stderr


def test_callback_figures_run_leaves_no_renderer(tmp_path):
    cb = wwm.WeightWatcherCallback(figures_every_n_snapshots=1, figures_min_run_seconds=0, max_figure_layers=1,
                                   figures_timeout=300, on_lag="wait")  # every snapshot, however short the run
    _fit(tmp_path, cb, logger=pl.loggers.TensorBoardLogger(str(tmp_path)))
    assert not cb._figures.started and len(cb.history) == 3


def test_a_busy_last_step_is_not_reported_as_skipped(tmp_path, monkeypatch):
    """The last step's snapshot is due while the previous one is still analysed: the final
    snapshot takes it, so it is neither warned about nor counted as skipped."""
    import importlib
    import time

    analyze_mod = importlib.import_module("ww_monitor.analysis.analyze")
    real = analyze_mod.analyze_matrices

    def slow(matrices, config):
        time.sleep(0.5)
        return real(matrices, config)

    monkeypatch.setattr(analyze_mod, "analyze_matrices", slow)
    cb = wwm.WeightWatcherCallback()
    _, messages = _fit(tmp_path, cb, max_steps=1)
    assert cb.history.steps == [0, 1]
    assert cb.stats["snapshots_skipped"] == 0 and not any("skipped the snapshot" in m for m in messages)
