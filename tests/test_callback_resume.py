"""Resuming from a checkpoint continues the history without gaps or duplicates."""


import numpy as np
import pytest
import torch
from test_callback import BATCHES, make_data, make_module_class, trainer_kwargs

import ww_monitor

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

# The snapshots in these runs are only checked through callback.history.
pytestmark = pytest.mark.filterwarnings("ignore:.*the trainer has no logger:RuntimeWarning")


def _run(tmp_path, max_epochs, callbacks, ckpt_path=None, validation=False, **kw):
    Tiny = make_module_class(pl)
    torch.manual_seed(0)
    model = Tiny(validation=validation)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks,
                         **trainer_kwargs(tmp_path, logger=False, enable_checkpointing=True, **kw))
    trainer.fit(model, make_data(), make_data(seed=1) if validation else None, ckpt_path=ckpt_path)
    return trainer


def _ww(**kw):
    kw.setdefault("figures_every_n_snapshots", None)
    kw.setdefault("max_pending", 8)  # tiny epochs: never skip for lag, so runs are comparable
    kw.setdefault("max_overhead", None)  # nor defer for the cost budget (its resume: test_budget.py)
    return ww_monitor.WeightWatcherCallback(**kw)


@pytest.mark.parametrize(
    "schedule, validation, ckpt_every",
    [
        ({"every_n_epochs": 1}, False, {"every_n_epochs": 1}),  # saved at train epoch end, after our hook
        # saved at validation end, i.e. before our epoch-end hook
        ({"every_n_epochs": 1}, True, {"every_n_epochs": 1, "save_on_train_epoch_end": False}),
        ({"every_n_epochs": None, "every_n_train_steps": 3}, False, {"every_n_train_steps": 5}),  # mid-epoch
    ],
    ids=["epoch-end", "validation-end", "mid-epoch"],
)
def test_resume_continues_history(tmp_path, schedule, validation, ckpt_every):
    total_epochs = 3
    full = _ww(**schedule)
    _run(tmp_path / "full", total_epochs, [full], validation=validation)

    first = _ww(**schedule)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **ckpt_every)
    _run(tmp_path / "a", 2 if "every_n_epochs" in ckpt_every else 3, [first, ckpt], validation=validation,
         **({} if "every_n_epochs" in ckpt_every else {"max_steps": 5}))
    path = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    saved = torch.load(path, weights_only=True)  # the state is plain types and tensors only
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("WeightWatcherCallback")]
    assert len(state["history"]["records"]) >= 2
    recorded = [r["step"] for r in state["history"]["records"]]
    if validation:  # saved before our epoch-end hook ran: the snapshot due there is owed
        assert state["owed"] == [saved["global_step"], saved["epoch"] + 1]
        assert saved["global_step"] not in recorded
    else:
        assert state["owed"] == []

    second = _ww(**schedule)
    trainer = _run(tmp_path / "b", total_epochs, [second, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
                   ckpt_path=str(path), validation=validation)
    assert trainer.global_step == total_epochs * BATCHES
    steps = second.history.steps
    assert steps == full.history.steps, (steps, full.history.steps)  # no gap, no duplicate
    assert [r.index for r in second.history] == list(range(len(steps)))
    assert [r.epoch for r in second.history] == [r.epoch for r in full.history]
    # Same weights at the same steps -> the same spectra. Resuming mid-epoch restarts a plain
    # DataLoader from its first batch, so there only the snapshots up to the checkpoint agree.
    resumed_at = saved["global_step"]
    mid_epoch = resumed_at % BATCHES != 0
    for a, b in zip(second.history, full.history):
        assert a.layers == b.layers
        if not mid_epoch or a.step <= resumed_at:
            np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_checkpoint_waits_for_in_flight_analysis(tmp_path):
    """A checkpoint written while an analysis runs in the background still contains it."""
    cb = _ww(every_n_epochs=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _run(tmp_path, 2, [cb, ckpt])
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 2
    for i, f in enumerate(files):
        state = next(v for k, v in torch.load(f, weights_only=True)["callbacks"].items()
                     if k.startswith("WeightWatcherCallback"))
        assert [r["step"] for r in state["history"]["records"]] == [BATCHES * j for j in range(i + 2)]
