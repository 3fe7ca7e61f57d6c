"""Signals users can trust (issue 10), on the quickstart's real training: early stopping's
warm-up and visible reason, no false alarm on the healthy run, reliable-only summary, every
alert of one snapshot readable back from the event file and the HTML report."""

import os
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ww_monitor as wwm
from ww_monitor.integrations.alpha_drift import spectra_left_random_state
from ww_monitor.monitoring.alerts import AlertConfig, WWMonitorAlert
from ww_monitor.outputs.offline_report import load_run, render_html

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import quickstart

EPOCHS = 8  # the quickstart's default


def fit_quickstart(tmp_path, callbacks, epochs=EPOCHS, logger=False):
    pl.seed_everything(0, verbose=False)
    train, val = quickstart.digits_loaders()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=5)
    trainer.fit(quickstart.make_model(pl), train, val)
    return trainer


def events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """The quickstart with the README's AlphaDriftEarlyStopping example and default alerts."""
    tmp = tmp_path_factory.mktemp("healthy")
    fired = []
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None,
                                   on_alert=fired.append)
    stopper = wwm.AlphaDriftEarlyStopping(floor=2.0, max_rise=0.5)  # the README's configuration
    logger = pl.loggers.TensorBoardLogger(str(tmp), name="q")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_quickstart(tmp, [ww, stopper], logger=logger)
    return dict(trainer=trainer, ww=ww, stopper=stopper, fired=fired, logdir=logger.log_dir, caught=caught)


def test_readme_early_stopping_does_not_stop_the_healthy_quickstart(healthy):
    trainer, stopper = healthy["trainer"], healthy["stopper"]
    assert trainer.current_epoch == EPOCHS and not stopper.stopped_reason
    assert float(trainer.callback_metrics["val/acc"]) > 0.9
    # The warm-up ended once the spectra left their random-like state, after the baseline.
    assert stopper.warmup_done and stopper.warmup_end_step > stopper.seen_steps[0]


def test_healthy_quickstart_raises_no_alert_and_summarises_reliable_layers_only(healthy):
    ww = healthy["ww"]
    assert healthy["fired"] == [] and ww.alerts_fired == []
    assert not [w for w in healthy["caught"] if issubclass(w.category, WWMonitorAlert)]
    last = ww.history[-1]
    reliable = {name: bool(v) for name, v in last.metric("reliable").items()}
    assert reliable == {"fc1": True, "fc2": True, "out": False}  # the head has 10 eigenvalues
    alphas = last.metric("alpha")
    assert last.summary["alpha"] == pytest.approx((alphas["fc1"] + alphas["fc2"]) / 2)
    assert 2.0 <= last.summary["alpha"] <= 4.0 and last.summary["num_unreliable"] == 1
    assert last.phases[last.layers.index("out")] is None
    # ww/alerts/active is written at every snapshot (a 0 baseline), not only on change.
    acc = events(healthy["logdir"])
    active = acc.Scalars("ww/alerts/active")
    assert [e.step for e in active] == ww.history.steps and {e.value for e in active} == {0.0}


def test_warmup_holds_decisions_until_the_spectra_leave_the_random_state(tmp_path):
    """A floor every value is under stops at the warm-up's end, not at the first snapshot; the
    reason is shown as a warning (no logging setup) and as TensorBoard text."""
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, alerts=False)
    stopper = wwm.AlphaDriftEarlyStopping(floor=100.0, min_snapshots=1)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="warm")
    with pytest.warns(UserWarning, match=r"AlphaDriftEarlyStopping: stopping training \(floor\)") as rec:
        trainer = fit_quickstart(tmp_path, [ww, stopper], logger=logger)
    first = ww.history[0].summary
    assert not spectra_left_random_state(first["num_layers"], first["num_undetermined"], first["num_random_like"])
    assert stopper.stopped_step == stopper.warmup_end_step > ww.history.steps[0]
    record = ww.history[ww.history.steps.index(stopper.stopped_step)].summary
    assert record["num_random_like"] / (record["num_layers"] - record["num_undetermined"]) < 0.5
    assert trainer.current_epoch < EPOCHS
    # The warning points at this file (the user's fit call), not at ww_monitor or Lightning.
    stop_warning = next(w for w in rec if "AlphaDriftEarlyStopping" in str(w.message))
    assert os.path.basename(stop_warning.filename) == "test_signals.py"
    texts = events(logger.log_dir).Tensors("ww/early_stopping/text_summary")
    assert [t.step for t in texts] == [stopper.stopped_step]
    assert b"fell below the floor" in texts[0].tensor_proto.string_val[0]


def test_several_alerts_at_one_step_are_all_readable_in_tensorboard_and_the_report(tmp_path):
    """Two NaN layers at once: both alerts in one ww/alerts entry, as the Text tab and the report show it."""
    ww = wwm.WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None,
                                   alerts=AlertConfig(actions={"non_finite": ("tensorboard", "callback")}))

    class Poison(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 0:
                with torch.no_grad():  # just before the epoch-end snapshot, the run's last
                    module.fc2.weight[0, 0] = float("nan")
                    module.out.weight[0, 0] = float("inf")

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="multi")
    fit_quickstart(tmp_path, [Poison(), ww], epochs=1, logger=logger)
    nf = [a for a in ww.alerts_fired if a.rule == "non_finite"]
    assert sorted(a.layer for a in nf) == ["fc2", "out"] and len({a.step for a in nf}) == 1
    step = nf[0].step
    texts = [t for t in events(logger.log_dir).Tensors("ww/alerts/text_summary") if t.step == step]
    assert len(texts) == 1  # one entry per snapshot: nothing overwritten in the Text tab
    text = texts[0].tensor_proto.string_val[0].decode()
    assert "`fc2`" in text and "`out`" in text and "docs/alerts.md#non_finite" in text
    page = render_html(load_run(logger.log_dir))
    assert "<code>fc2</code>" in page and "<code>out</code>" in page and "<li><strong>non_finite</strong>" in page
