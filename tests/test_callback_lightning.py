"""The same callback for the unified ``lightning`` package (``lightning.pytorch``)."""

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_callback import (
    BATCHES,
    EXPECTED_LAYERS,
    check_tensorboard,
    make_data,
    make_module_class,
    plotting_available,
    trainer_kwargs,
)

import ww_monitor

L = pytest.importorskip("lightning.pytorch")


def test_lightning_pytorch_tensorboard_and_csv(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from ww_monitor.lightning import WeightWatcherCallback

    cb = WeightWatcherCallback(figures_every_n_snapshots=1, max_figure_layers=1, max_pending=4,
                               figures_min_run_seconds=0, figures_timeout=300)
    assert isinstance(cb, L.Callback)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    Tiny = make_module_class(L)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **trainer_kwargs(tmp_path, logger=[tb, csv_logger]))
    trainer.fit(Tiny(), make_data())
    steps = [0, BATCHES, 2 * BATCHES]
    assert cb.history.steps == steps
    check_tensorboard(tb.log_dir, steps, EXPECTED_LAYERS, figures_at=steps if plotting_available() else None)
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for layer in EXPECTED_LAYERS:
        assert sorted(int(r["step"]) for r in rows if r.get(f"ww/alpha/{layer}")) == steps
    assert "ww/summary/alpha" in trainer.callback_metrics


def test_each_flavour_subclasses_only_its_own_package():
    import pytorch_lightning

    from ww_monitor.lightning import WeightWatcherCallback

    assert issubclass(WeightWatcherCallback, L.Callback)
    assert not issubclass(WeightWatcherCallback, pytorch_lightning.Callback)
    assert issubclass(ww_monitor.WeightWatcherCallback, pytorch_lightning.Callback)
    assert not issubclass(ww_monitor.WeightWatcherCallback, L.Callback)
    # same state key, so a checkpoint written with one flavour resumes with the other
    assert WeightWatcherCallback().state_key == ww_monitor.WeightWatcherCallback().state_key


def test_importing_the_lightning_flavour_does_not_import_pytorch_lightning():
    code = textwrap.dedent(
        """
        import sys
        from ww_monitor.lightning import WeightWatcherCallback
        import lightning.pytorch as L
        assert issubclass(WeightWatcherCallback, L.Callback)
        assert "pytorch_lightning" not in sys.modules, "pytorch_lightning imported"
        print("OK")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(ww_monitor.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-2000:]
