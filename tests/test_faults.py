"""Issue 7, faults: nothing the monitor does crashes training, and nothing it owns outlives a run.

Complements ``test_callback.py`` (which covers an always-failing analysis, copy failures, a
lagging worker, an exception at a fixed step, broken loggers) with the faults that are about
*timing* and *lifecycle*: a failure in the middle of a run, interrupts while an analysis is in
flight (real signals, in a subprocess), refitting with the same callback, evaluation-only runs,
and loggers that are missing, CSV-only, unimportable or closed under our feet.

Every run uses a real ``pytorch_lightning.Trainer`` on CPU with a tiny MLP.
"""

from __future__ import annotations

import importlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch
from test_callback import ClassifierSteps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor
import ww_monitor.core.engine as callback_mod

pl = pytest.importorskip("pytorch_lightning")

BATCHES = 4
WORKER_THREAD_PREFIX = "ww-monitor"  # ThreadWorker and SubprocessWorker's pipe threads (worker.py)


class MLP(ClassifierSteps, pl.LightningModule):
    def __init__(self, fail_at_step: int | None = None, width: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)
        self.fail_at_step = fail_at_step

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))


def data(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCHES * 8, 16, generator=g)
    y = torch.randint(0, 4, (BATCHES * 8,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(tmp_path, callbacks, max_epochs=1, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), log_every_n_steps=1, num_sanity_val_steps=0,
                enable_checkpointing=False, logger=False, limit_val_batches=0)
    base.update(kw)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **base)


def ww(**kw):
    kw.setdefault("figures_every_n_snapshots", None)  # no figure subprocess unless a test wants one
    return ww_monitor.WeightWatcherCallback(**kw)


def monitor_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX) and t.is_alive()]


def messages(rec) -> list[str]:
    return [str(w.message) for w in rec]


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    before = set(monitor_threads())
    yield
    deadline = time.monotonic() + 5
    while set(monitor_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(monitor_threads()) - before, "a ww_monitor thread outlived the test"


# ------------------------------------------------------------------------------ worker failures


def test_one_failing_analysis_mid_run_is_a_warning_and_the_rest_is_logged(tmp_path, monkeypatch):
    """A single snapshot's analysis raising in the background thread: a RuntimeWarning naming its
    step, counted in stats; the snapshots before and after it are analysed normally."""
    real = callback_mod.analyze_snapshot
    seen = []

    def flaky(snapshot, config, *args):
        seen.append(threading.current_thread().name)
        if snapshot.step == 2:
            snapshot.release()
            raise ValueError("LAPACK did not converge")
        return real(snapshot, config, *args)

    monkeypatch.setattr(callback_mod, "analyze_snapshot", flaky)
    cb = ww(every_n_epochs=None, every_n_train_steps=1, max_pending=8, max_overhead=None)  # every step's snapshot
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [cb], max_epochs=1)
        t.fit(MLP(), data())
    assert t.state.finished and t.global_step == BATCHES
    assert all(name.startswith(WORKER_THREAD_PREFIX) for name in seen)  # it really ran in the background
    failures = [m for m in messages(rec) if "analysis of the snapshot" in m]
    assert len(failures) == 1 and "at step 2 failed" in failures[0] and "LAPACK did not converge" in failures[0]
    assert all(issubclass(w.category, RuntimeWarning) for w in rec if "analysis of the snapshot" in str(w.message))
    assert cb.stats["snapshots_failed"] == 1
    assert cb.history.steps == [0, 1, 2, 3, 4]
    by_step = {r.step: r for r in cb.history}
    assert by_step[2].errors and not by_step[2].layers
    assert all(by_step[s].layers and not by_step[s].errors for s in (0, 1, 3, 4))


def test_failing_worker_function_in_blocking_mode(tmp_path, monkeypatch):
    """Same through the inline worker (``background=False``): the exception must not reach the
    training loop even though the analysis runs on the training thread."""
    analyze_mod = importlib.import_module("ww_monitor.analysis.analyze")  # the package attribute is the function

    def broken(matrices, config):
        raise RuntimeError("analysis exploded")

    monkeypatch.setattr(analyze_mod, "analyze_matrices", broken)
    cb = ww(background=False)
    with pytest.warns(RuntimeWarning, match="analysis exploded"):
        trainer(tmp_path, [cb], max_epochs=1).fit(MLP(), data())
    assert cb.stats["snapshots_failed"] == 2 and cb.history.steps == [0, BATCHES]


# ------------------------------------------------------------------------------ signals

_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import faulthandler, signal, sys, threading, time, warnings
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks if it hangs
    # Ctrl-C as in a terminal: a shell without job control starts background jobs (`make test &`,
    # nohup) with SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import pytorch_lightning as pl
    import ww_monitor
    import ww_monitor.core.engine as callback_mod

    real = callback_mod.analyze_snapshot

    def marked(snapshot, config, *args):
        print("ANALYSING", snapshot.step, flush=True)   # the test sends its signal now
        return real(snapshot, config, *args)

    callback_mod.analyze_snapshot = marked

    class Big(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(1024, 1536)            # about half a second of float64 eigh
            self.head = nn.Linear(1536, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            time.sleep(0.01)
            return nn.functional.cross_entropy(self.head(torch.relu(self.big(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    x, y = torch.randn(64, 1024), torch.randint(0, 4, (64,))
    # worker_nice=0: on a loaded test machine a niced worker may not get the CPU to start at all
    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=2, worker_nice=0,
                                          figures_every_n_snapshots=None, max_pending=1)
    trainer = pl.Trainer(max_epochs=100000, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    warnings.simplefilter("ignore")
    try:
        trainer.fit(Big(), DataLoader(TensorDataset(x, y), batch_size=8))
        print("FIT RETURNED", flush=True)
    finally:
        time.sleep(0.2)
        alive = [t.name for t in threading.enumerate() if t.name.startswith("ww-monitor") and t.is_alive()]
        print("WORKER", cb._worker is None, flush=True)
        print("THREADS", ",".join(alive) or "-", flush=True)
    """
)


def _run_until_analysing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SIGNAL_SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=str(tmp_path))
    lines: list[str] = []
    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 180  # imports alone can take tens of seconds on a busy machine
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        lines.append(line)
        # the second snapshot (step 2): training is in its loop, an analysis is in flight
        if line.startswith("ANALYSING") and int(line.split()[1]) > 0:
            return proc, lines, q
    proc.kill()
    proc.wait()
    pytest.fail("the training script never started an analysis:\n" + "".join(lines))


def _drain(q, lines, seconds=5.0):
    """The rest of the script's output, up to its end (None) or ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return
        if line is None:
            return
        lines.append(line)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_background_analysis_exits_promptly(tmp_path, sig):
    proc, lines, q = _run_until_analysing(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # every thread's stack, to see where it hangs
        time.sleep(2)
        proc.kill()
        proc.wait()
        _drain(q, lines)
        pytest.fail(f"{sig.name}: still running 20 s after the signal:\n" + "".join(lines))
    _drain(q, lines)
    elapsed = time.monotonic() - t0
    text = "".join(lines)
    assert elapsed < 20, text
    if sig == signal.SIGINT:  # Lightning exits with sys.exit(1) after its graceful shutdown
        assert proc.returncode != 0 and "FIT RETURNED" not in text, text
    # Lightning turns SIGINT into KeyboardInterrupt (graceful shutdown, then sys.exit(1)) and SIGTERM
    # into SIGTERMException at the next step: both go through on_exception, which stops the worker.
    assert "WORKER True" in text, text
    assert "THREADS -" in text, text
    assert "Traceback" not in text or "SIGTERMException" in text, text


# ------------------------------------------------------------------------------ lifecycle


def test_training_step_exception_with_analysis_in_flight_stops_the_worker(tmp_path, monkeypatch):
    """The exception arrives while the background thread is busy: on_exception cancels it, fit
    raises the user's error (not ours), promptly, and the callback can be used again."""
    real = callback_mod.analyze_snapshot
    started = threading.Event()

    def slow(snapshot, config, *args):
        started.set()
        time.sleep(0.5)
        return real(snapshot, config, *args)

    monkeypatch.setattr(callback_mod, "analyze_snapshot", slow)
    cb = ww(every_n_epochs=None, every_n_train_steps=1, max_pending=1)
    workers = []
    orig_start = cb._start_worker

    def spy():
        orig_start()
        workers.append(cb._worker)

    cb._start_worker = spy

    class FailsWhileAnalysing(MLP):
        def training_step(self, batch, batch_idx):
            if self.global_step == self.fail_at_step:
                # A busy machine may not have scheduled the low-priority worker yet: the
                # exception must arrive while an analysis is in flight.
                started.wait(5)
            return super().training_step(batch, batch_idx)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="boom in training_step"):
            trainer(tmp_path, [cb], max_epochs=2).fit(FailsWhileAnalysing(fail_at_step=2), data())
    assert started.is_set()
    assert time.perf_counter() - t0 < 15
    assert cb._worker is None and not cb._figures.started and not cb._active
    assert len(workers) == 1 and workers[0].closed and not workers[0].alive
    assert not monitor_threads()
    # the same callback object still works for a new run
    monkeypatch.setattr(callback_mod, "analyze_snapshot", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer(tmp_path, [cb], max_epochs=1).fit(MLP(), data())
    assert cb.history.steps and cb.history.steps[-1] == BATCHES
    assert len(set(cb.history.steps)) == len(cb.history)


def test_fit_twice_same_trainer_continues_history_without_duplicates(tmp_path):
    cb = ww(every_n_epochs=1, blocking=True)
    t = trainer(tmp_path, [cb], max_epochs=1)
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t.fit(model, data())
        assert cb.history.steps == [0, BATCHES]
        t.fit_loop.max_epochs = 3
        t.fit(model, data())
    assert cb.history.steps == [0, BATCHES, 2 * BATCHES, 3 * BATCHES]
    assert [r.index for r in cb.history] == [0, 1, 2, 3]
    assert cb.stats["snapshots_taken"] == 4 and cb.stats["snapshots_failed"] == 0
    assert cb._worker is None


def test_fit_twice_new_trainer_background_keeps_a_consistent_history(tmp_path):
    """A second, fresh Trainer restarts global_step at 0. The callback must not crash, must not
    log two records for one step, and the second run's new steps are recorded."""
    cb = ww(every_n_epochs=None, every_n_train_steps=2, max_pending=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer(tmp_path, [cb], max_epochs=1).fit(MLP(), data())
        first = list(cb.history.steps)
        assert first == [0, 2, 4]
        trainer(tmp_path, [cb], max_epochs=2).fit(MLP(), data())
    steps = cb.history.steps
    assert steps[:3] == first
    assert len(set(steps)) == len(steps)  # no duplicate steps
    assert 2 * BATCHES in steps  # the second run's final snapshot is in
    assert cb._worker is None


def test_validate_test_predict_take_no_snapshots_and_start_no_worker(tmp_path):
    cb = ww(blocking=True)
    model = MLP()
    t = trainer(tmp_path, [cb], max_epochs=1, limit_val_batches=None)
    t.validate(model, data(1), verbose=False)
    t.test(model, data(1), verbose=False)
    t.predict(model, data(1))
    assert len(cb.history) == 0 and cb.stats["snapshots_taken"] == 0
    assert cb._worker is None and not monitor_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t.fit(model, data(), data(1))
    assert cb.history.steps == [0, BATCHES]
    t.test(model, data(1), verbose=False)
    t.validate(model, data(1), verbose=False)
    assert cb.history.steps == [0, BATCHES] and cb.stats["snapshots_taken"] == 2


# ------------------------------------------------------------------------------ loggers


def test_no_logger_warns_once_and_fills_history(tmp_path):
    cb = ww(every_n_epochs=None, every_n_train_steps=1, blocking=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_epochs=1, logger=False).fit(MLP(), data())
    ours = [m for m in messages(rec) if m.startswith("WeightWatcherCallback")]
    assert len(ours) == 1 and "no logger" in ours[0]
    assert cb.history.steps == list(range(BATCHES + 1))
    assert all(r.layers for r in cb.history)


def test_csv_logger_only_gets_the_scalars(tmp_path):
    import csv

    from pytorch_lightning.loggers import CSVLogger

    # The test MLP's layers are all under 50 eigenvalues (unreliable): average them anyway (issue 10).
    cb = ww(blocking=True, summary_include_unreliable=True)
    logger = CSVLogger(str(tmp_path), name="csv")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(MLP(), data())
    assert not [m for m in messages(rec) if m.startswith("WeightWatcherCallback")]
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    alpha_rows = [r for r in rows if r.get("ww/alpha/fc1")]
    assert sorted(int(r["step"]) for r in alpha_rows) == [0, BATCHES]
    assert all(float(r["ww/summary/alpha"]) > 0 for r in rows if r.get("ww/summary/alpha"))


def test_tensorboard_unimportable_warns_and_training_continues(tmp_path):
    """As if tensorboard were not installed: the TensorBoardLogger's writer cannot be created.
    (Patching ``sys.modules`` would break Lightning's own use of the logger first.)"""
    from pytorch_lightning.loggers import TensorBoardLogger

    def missing():
        return ModuleNotFoundError("No module named 'tensorboard'")

    class NoTensorBoard(TensorBoardLogger):
        """Lightning's own use works; ww_monitor sees a writer that cannot be imported/created."""

        broken = False

        @property
        def experiment(self):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if self.broken and caller.startswith("ww_monitor"):
                raise missing()
            return super().experiment

        def log_metrics(self, metrics, step=None):
            if self.broken and any(k.startswith("ww/") for k in metrics):
                raise missing()
            return super().log_metrics(metrics, step)

    class Break(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            logger.broken = True

    logger = NoTensorBoard(str(tmp_path), name="tb")
    cb = ww(every_n_epochs=None, every_n_train_steps=2, max_pending=8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [Break(), cb], max_epochs=1, logger=logger)
        t.fit(MLP(), data())
    assert t.state.finished
    ours = [m for m in messages(rec) if m.startswith("WeightWatcherCallback")]
    assert any("log_metrics failed" in m and "ModuleNotFoundError" in m for m in ours), ours
    assert len([m for m in ours if "log_metrics failed" in m]) == 1  # once, not per snapshot
    assert cb.history.steps == [0, 2, 4] and all(r.layers for r in cb.history)


def test_writer_closed_mid_run_training_continues(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    class CloseAfterFirstSnapshot(pl.Callback):
        closed = False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not self.closed and len(cb.history) >= 1:
                trainer.logger.experiment.close()
                self.closed = True

    cb = ww(every_n_epochs=None, every_n_train_steps=1, blocking=True)
    closer = CloseAfterFirstSnapshot()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [cb, closer], max_epochs=2, logger=logger)
        t.fit(MLP(), data())
    assert closer.closed and t.state.finished
    ours = [m for m in messages(rec) if m.startswith("WeightWatcherCallback")]
    assert len(ours) <= 3, ours  # at most one warning per logger and kind, never one per snapshot
    assert cb.history.steps == list(range(2 * BATCHES + 1)) and all(r.layers for r in cb.history)


def test_writer_methods_raising_after_close_warn_once(tmp_path):
    """A writer that refuses to write after close (like tensorboardX's): one warning, training goes on."""
    from pytorch_lightning.loggers import TensorBoardLogger

    class Closing(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(cb.history) >= 1:
                exp = trainer.logger.experiment

                def refuse(*args, **kwargs):
                    raise ValueError("I/O operation on closed file")

                for name in ("add_histogram_raw", "add_text", "add_custom_scalars", "add_image"):
                    setattr(exp, name, refuse)

    cb = ww(every_n_epochs=None, every_n_train_steps=1, blocking=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [cb, Closing()], max_epochs=1, logger=TensorBoardLogger(str(tmp_path), name="tb"))
        t.fit(MLP(), data())
    assert t.state.finished
    ours = [m for m in messages(rec) if m.startswith("WeightWatcherCallback")]
    assert 1 <= len(ours) <= 2, ours
    assert any("closed file" in m for m in ours)
    assert cb.history.steps == list(range(BATCHES + 1))
