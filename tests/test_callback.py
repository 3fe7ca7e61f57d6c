"""WeightWatcherCallback with a real pytorch_lightning Trainer on CPU.

The helpers at the top are shared with the other ``test_callback_*`` files and ``test_ddp``.
"""

import csv
import importlib
import inspect
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor
from ww_monitor.errors import WWMonitorError

pl = pytest.importorskip("pytorch_lightning")

# Runs without a logger only check callback.history; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:.*the trainer has no logger:RuntimeWarning")

# Conv (pooled 3x3 kernel: 9 slices of 16x3 -> 27 eigenvalues), two Linears, and a head too small
# to analyse (4 eigenvalues < min_evals=8): it must show up as skipped, not vanish.
EXPECTED_LAYERS = ["conv", "fc1", "fc2"]
BATCHES = 4


class ClassifierSteps:
    """The steps of the test classifiers (mixed into a LightningModule of either package).
    ``fail_at_step`` makes ``training_step`` raise at that global step."""

    fail_at_step: int | None = None

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def make_module_class(plmod):
    class Tiny(ClassifierSteps, plmod.LightningModule):
        def __init__(self, validation: bool = False, fail_at_step: int | None = None):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.fc1 = nn.Linear(16 * 6 * 6, 64)
            self.fc2 = nn.Linear(64, 32)
            self.head = nn.Linear(32, 4)
            self.fail_at_step = fail_at_step
            if not validation:
                self.validation_step = None  # type: ignore[assignment]

        def forward(self, x):
            x = torch.relu(self.conv(x)).flatten(1)
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    return Tiny


def make_data(n=BATCHES * 16, batch_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer_kwargs(tmp_path, **kw):
    base = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), log_every_n_steps=1, num_sanity_val_steps=0,
                enable_checkpointing=False)
    base.update(kw)
    return base


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def plotting_available():
    try:
        importlib.import_module("ww_monitor.outputs.plotting")
    except ImportError:
        return False
    return True


def check_tensorboard(logdir, steps, layers, figures_at=None, max_esd=3):
    """Every layer's scalars and ESD histogram at every snapshot step, summary, layout, text."""
    acc = read_events(logdir)
    tags = acc.Tags()
    for layer in layers:
        for metric in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "rank_loss",
                       "num_spikes"):
            assert scalar_steps(acc, f"ww/{metric}/{layer}") == steps, (metric, layer)
        hist = acc.Histograms(f"ww/esd/{layer}")
        assert [h.step for h in hist] == steps
        assert all(h.histogram_value.num > 0 for h in hist)
    for metric in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "num_layers"):
        assert scalar_steps(acc, f"ww/summary/{metric}") == steps
    assert [e.value for e in acc.Scalars("ww/summary/num_layers")] == [len(layers)] * len(steps)
    assert [e.value for e in acc.Scalars("ww/summary/num_skipped")] == [1] * len(steps)  # the head
    assert not any("head" in t for t in tags["scalars"] if t.startswith("ww/alpha/"))
    assert "custom_scalars__config__" in tags["tensors"]
    assert [e.step for e in acc.Tensors("ww/layers/text_summary")] == steps
    if figures_at is not None:
        assert [e.step for e in acc.Images("ww/plots/alpha_per_layer")] == figures_at
        esd_tags = [t for t in tags["images"] if t.startswith("ww/plots/esd/")]
        # ESD figures go to the worst layers of each figure snapshot, so a layer's tag may skip some.
        per_step = Counter(step for t in esd_tags for step in scalar_steps_img(acc, t))
        assert sorted(per_step) == figures_at and all(1 <= n <= max_esd for n in per_step.values()), per_step
    return acc


def scalar_steps_img(acc, tag):
    return [e.step for e in acc.Images(tag)]


def fit(tmp_path, callback, max_epochs=2, module_kwargs=None, **kw):
    Tiny = make_module_class(pl)
    torch.manual_seed(0)
    model = Tiny(**(module_kwargs or {}))
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[callback], **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, make_data(), make_data(seed=1) if (module_kwargs or {}).get("validation") else None)
    return trainer, model


# ---------------------------------------------------------------------------------------- tests


def test_tensorboard_layout_background(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    # Epochs of 4 tiny batches are faster than an analysis: allow every snapshot to be in flight.
    # The layout of every scheduled snapshot: the cost budget (tested in test_budget.py) may defer
    # some of these tiny epochs' snapshots on a busy machine, so it is off here.
    cb = ww_monitor.WeightWatcherCallback(figures_every_n_snapshots=2, max_figure_layers=2, max_pending=4,
                                          figures_min_run_seconds=0, figures_timeout=300, max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer, _ = fit(tmp_path, cb, max_epochs=3, logger=logger)
    steps = [0, BATCHES, 2 * BATCHES, 3 * BATCHES]  # baseline + every epoch end; no duplicate final
    assert cb.history.steps == steps
    assert [r.epoch for r in cb.history] == [0, 1, 2, 3]
    assert cb.history.layer_names == EXPECTED_LAYERS
    assert cb.stats["snapshots_taken"] == 4 and cb.stats["snapshots_skipped"] == 0
    assert 0 < cb.stats["train_thread_seconds"]
    figures = [0, 2 * BATCHES, 3 * BATCHES] if plotting_available() else None  # every 2nd + final
    check_tensorboard(logger.log_dir, steps, EXPECTED_LAYERS, figures_at=figures, max_esd=2)
    # the worker is gone and the summary is available to other callbacks
    assert cb._worker is None
    assert torch.isfinite(trainer.callback_metrics["ww/summary/alpha"])
    df = cb.history.to_pandas()
    assert len(df) == 4 * 3 and set(df["name"]) == set(EXPECTED_LAYERS)


def test_step_schedule_blocking_and_csv_logger(tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=3, blocking=True,
                                          figures_every_n_snapshots=None)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fit(tmp_path, cb, max_epochs=2, logger=[csv_logger, tb])
    steps = [0, 3, 6, 8]  # baseline, every 3 optimizer steps, final at step 8
    assert cb.history.steps == steps
    check_tensorboard(tb.log_dir, steps, EXPECTED_LAYERS)
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for layer in EXPECTED_LAYERS:
        logged = sorted(int(r["step"]) for r in rows if r.get(f"ww/alpha/{layer}"))
        assert logged == steps
        values = [float(r[f"ww/alpha/{layer}"]) for r in rows if r.get(f"ww/alpha/{layer}")]
        assert all(math.isfinite(v) for v in values)
    assert sorted(int(r["step"]) for r in rows if r.get("ww/summary/alpha")) == steps
    # blocking: every analysis ran inside the callback's hooks, on the training thread
    assert cb.stats["train_thread_seconds"] >= cb.stats["analysis_seconds"] > 0


def test_selection_passthrough(tmp_path):
    cb = ww_monitor.WeightWatcherCallback(include=["fc", "conv"], exclude=r"fc2", blocking=True)
    with pytest.warns(RuntimeWarning, match="the trainer has no logger"):
        fit(tmp_path, cb, max_epochs=1, logger=False)
    assert cb.history.layer_names == ["conv", "fc1"]
    cb = ww_monitor.WeightWatcherCallback(kinds=["conv2d"], blocking=True)
    with pytest.warns(RuntimeWarning, match="the trainer has no logger"):
        fit(tmp_path, cb, max_epochs=1, logger=False)
    assert cb.history.layer_names == ["conv"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_epochs": -1}, "`every_n_epochs` must be None or an int >= 1, got -1"),
        ({"every_n_train_steps": 0}, "`every_n_train_steps=0` is not a schedule"),
        ({"max_pending": 0}, "`max_pending` must be an int >= 1, got 0"),
        ({"blocking": "yes"}, "`blocking` must be True or False"),
        ({"worker_type": "fork"}, "`worker_type` must be one of"),
        ({"kinds": ["dense"]}, "`kinds` must be a subset of"),
        ({"include": "(unclosed"}, "not a valid regular expression"),
        ({"figure_layers": 3}, "`figure_layers` must be a string"),
        ({"conv_mode": "mean"}, "`conv_mode` must be one of"),
        ({"drain_timeout": 0}, "`drain_timeout` must be a positive number"),
        ({"every_n_epochs": True}, "`every_n_epochs` must be None or an int"),
    ],
)
def test_arguments_are_validated_up_front(kwargs, match):
    with pytest.raises(WWMonitorError, match=match.replace("(", r"\(")):
        ww_monitor.WeightWatcherCallback(**kwargs)


def test_init_signature_is_typed_and_documented():
    cls = ww_monitor.WeightWatcherCallback
    assert issubclass(cls, pl.Callback)
    params = inspect.signature(cls.__init__).parameters
    doc = cls.__doc__
    assert "Example::" in doc
    for name, p in params.items():
        if name == "self":
            continue
        assert p.annotation is not inspect.Parameter.empty, name
        assert f"    {name}:" in doc, f"{name} is not documented"
    import pickle

    cb = cls(every_n_train_steps=5)
    assert type(pickle.loads(pickle.dumps(cls))) is type(cls)
    assert "every_n_train_steps" in cb.state_key


def test_no_snapshot_in_sanity_check_validate_test_predict(tmp_path):
    cb = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None)
    Tiny = make_module_class(pl)
    torch.manual_seed(0)
    model = Tiny(validation=True)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs(tmp_path, num_sanity_val_steps=2,
                                                                       logger=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*the trainer has no logger", RuntimeWarning)
        trainer.fit(model, make_data(), make_data(seed=1))
    assert cb.history.steps == [0, BATCHES]
    trainer.validate(model, make_data(seed=1), verbose=False)
    trainer.predict(model, make_data(seed=1))
    assert cb.history.steps == [0, BATCHES] and cb.stats["snapshots_taken"] == 2


def test_summary_reaches_callback_metrics_for_early_stopping(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping

    cb = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None)
    es = EarlyStopping(monitor="ww/summary/alpha", mode="min", patience=100, check_on_train_epoch_end=True,
                       strict=True)
    Tiny = make_module_class(pl)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb, es], **trainer_kwargs(tmp_path, logger=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*the trainer has no logger", RuntimeWarning)
        trainer.fit(Tiny(), make_data())
    assert trainer.current_epoch == 2  # ran through: EarlyStopping found its metric every epoch
    assert float(es.best_score) == pytest.approx(min(r.summary["alpha"] for r in cb.history[:3]), abs=1e-5)


def test_broken_logger_warns_and_training_continues(tmp_path):
    from pytorch_lightning.loggers import Logger, TensorBoardLogger

    class Broken(Logger):
        name, version = "broken", 0

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("ww/") for k in metrics):  # Lightning's own logging must still work
                raise OSError("disk full")

        def log_hyperparams(self, *args, **kwargs):
            pass

    class ClosedTB(TensorBoardLogger):
        @property
        def experiment(self):
            exp = super().experiment

            def fail(*args, **kwargs):
                raise RuntimeError("writer is closed")

            exp.add_histogram_raw = fail
            return exp

    cb = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None)
    with pytest.warns(RuntimeWarning) as rec:
        fit(tmp_path, cb, max_epochs=2, logger=[Broken(), ClosedTB(str(tmp_path), name="tb")])
    messages = [str(w.message) for w in rec]
    assert sum("Broken.log_metrics failed" in m for m in messages) == 1  # once, not every snapshot
    assert sum("writing to TensorBoard failed" in m for m in messages) == 1
    assert cb.history.steps == [0, BATCHES, 2 * BATCHES]


def test_worker_failure_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    analyze_mod = importlib.import_module("ww_monitor.analysis.analyze")  # the package attribute is the function

    calls = []

    def failing(matrices, config):
        calls.append(1)
        raise MemoryError("no room for the SVD")

    monkeypatch.setattr(analyze_mod, "analyze_matrices", failing)
    cb = ww_monitor.WeightWatcherCallback(figures_every_n_snapshots=None)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(tmp_path, cb, max_epochs=2, logger=False)
    assert time.perf_counter() - t0 < 60
    failures = [str(w.message) for w in rec if "analysis of the snapshot" in str(w.message)]
    assert len(failures) == 3 and all("MemoryError: no room for the SVD" in m for m in failures)
    assert "at step 0 failed" in failures[0]
    assert len(calls) == 3 and cb.stats["snapshots_failed"] == 3
    assert all(r.errors and not r.layers for r in cb.history)
    assert cb._worker is None


def test_snapshot_copy_failure_is_a_warning(tmp_path, monkeypatch):
    import ww_monitor.core.engine as callback_mod

    def broken(*args, **kwargs):
        raise RuntimeError("parameters went away")

    monkeypatch.setattr(callback_mod, "collect_into", broken)
    cb = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(tmp_path, cb, max_epochs=1, logger=False)
    assert any("could not copy the weights: RuntimeError: parameters went away" in str(w.message) for w in rec)
    assert cb.history.steps == [0, BATCHES] and all(r.errors and not r.layers for r in cb.history)


def test_lagging_worker_skips_snapshots_instead_of_queueing(tmp_path, monkeypatch):
    analyze_mod = importlib.import_module("ww_monitor.analysis.analyze")  # the package attribute is the function

    real = analyze_mod.analyze_matrices

    def slow(matrices, config):
        time.sleep(0.4)
        return real(matrices, config)

    monkeypatch.setattr(analyze_mod, "analyze_matrices", slow)

    def no_renderer(*args, **kwargs):  # figures are off: no renderer process may be started
        raise AssertionError("figure renderer started")

    monkeypatch.setattr(importlib.import_module("ww_monitor.monitoring.subprocess_worker"), "SubprocessWorker", no_renderer)
    # max_overhead=None: every scheduled snapshot is due (no cost budget), so on_lag alone decides.
    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, max_pending=1,
                                          figures_every_n_snapshots=None, max_overhead=None)
    with pytest.warns(RuntimeWarning, match="skipped the snapshot at step"):
        fit(tmp_path, cb, max_epochs=2, logger=False)
    assert cb.stats["snapshots_skipped"] > 0
    # one decision per step (a step skipped and then taken as the final snapshot counts as taken)
    assert cb.stats["snapshots_taken"] + cb.stats["snapshots_skipped"] == 2 * BATCHES + 1
    assert len(set(cb.history.steps)) == len(cb.history) == cb.stats["snapshots_taken"]
    assert cb.history.steps[0] == 0 and cb.history.steps[-1] == 2 * BATCHES  # final one always taken
    # never more than one snapshot's weights in flight
    assert cb.stats["peak_inflight_bytes"] == cb.stats["snapshot_bytes"]


def test_lagging_worker_with_on_lag_wait_loses_no_snapshot(tmp_path, monkeypatch):
    analyze_mod = importlib.import_module("ww_monitor.analysis.analyze")
    real = analyze_mod.analyze_matrices

    def slow(matrices, config):
        time.sleep(0.2)
        return real(matrices, config)

    monkeypatch.setattr(analyze_mod, "analyze_matrices", slow)
    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, max_pending=1,
                                          on_lag="wait", figures_every_n_snapshots=None, max_overhead=None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(tmp_path, cb, max_epochs=2, logger=False)
    assert not any("skipped the snapshot" in str(w.message) for w in rec)
    assert cb.stats["snapshots_skipped"] == 0 and cb.stats["lag_waits"] > 0
    assert cb.history.steps == list(range(2 * BATCHES + 1))  # every step, in order, no duplicate
    assert cb.stats["peak_inflight_bytes"] == cb.stats["snapshot_bytes"]  # still one copy at a time
    # the waits happened on the training thread (hooks that do not wait cost milliseconds); each
    # wait is the 0.2 s analysis minus the training step in between, which a loaded machine stretches
    assert cb.stats["train_thread_seconds"] >= 0.05 * cb.stats["lag_waits"]


def test_exception_in_training_stops_the_worker(tmp_path):
    import threading

    cb = ww_monitor.WeightWatcherCallback(figures_every_n_snapshots=None)
    before = {t.name for t in threading.enumerate() if t.name == "ww-monitor-worker"}
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, cb, max_epochs=2, module_kwargs={"fail_at_step": 3}, logger=False)
    assert cb._worker is None
    time.sleep(0.2)
    after = [t for t in threading.enumerate() if t.name == "ww-monitor-worker"]
    assert len(after) <= len(before)


def test_process_worker(tmp_path):
    cb = ww_monitor.WeightWatcherCallback(worker_type="process", figures_every_n_snapshots=None, max_pending=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*the trainer has no logger", RuntimeWarning)
        fit(tmp_path, cb, max_epochs=1, logger=False)
    assert cb.history.steps == [0, BATCHES] and cb.history.layer_names == EXPECTED_LAYERS


def test_imports_do_not_mix_lightning_packages():
    code = textwrap.dedent(
        """
        import sys
        import ww_monitor
        cls = ww_monitor.WeightWatcherCallback
        assert "pytorch_lightning" in sys.modules
        assert not any(m == "lightning" or m.startswith("lightning.") for m in sys.modules), "lightning imported"
        print("OK")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(ww_monitor.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-2000:]


def test_reusing_the_callback_for_a_new_run_warns_and_starts_a_new_history(tmp_path):
    cb = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None)
    fit(tmp_path, cb, max_epochs=2, logger=False)
    assert cb.history.steps == [0, BATCHES, 2 * BATCHES]
    with pytest.warns(RuntimeWarning, match="from an earlier run, and this run starts at step 0"):
        fit(tmp_path, cb, max_epochs=1, logger=False)
    # the new run's snapshots, none of them dropped as "already in the history"
    assert cb.history.steps == [0, BATCHES] and cb.stats["snapshots_taken"] == 2
