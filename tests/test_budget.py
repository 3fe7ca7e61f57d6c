"""The cost budget (``max_overhead``): pure accounting, and deferral in a real Trainer run."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor as wwm
from ww_monitor.errors import WWMonitorError
from ww_monitor.monitoring.budget import DEFAULT_MAX_OVERHEAD, OVERHEAD_ALLOWANCE_SECONDS, CostBudget

pl = pytest.importorskip("pytorch_lightning")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_budget_grows_with_training_time_and_defers_what_does_not_fit():
    clock = FakeClock()
    b = CostBudget(0.05, allowance=0.25, clock=clock)
    b.start()
    assert b.limit() == pytest.approx(0.25)
    b.charge(0.2)
    b.snapshot_cost(0.1)
    assert not b.allows()  # 0.2 + 0.1 > 0.25
    clock.now += 2.0  # 2 s of training earn 0.1 s
    assert b.limit() == pytest.approx(0.35) and b.allows()
    b.charge(-1.0)  # negative times (clock jitter) are not credits
    assert b.spent == pytest.approx(0.2)
    assert b.allows(expected=0.15) and not b.allows(expected=0.2)


def test_disabled_budget_allows_everything():
    b = CostBudget(None)
    b.start()
    b.charge(1e6)
    assert not b.enabled and b.allows() and math.isinf(b.limit())


def test_budget_state_carries_spent_and_elapsed_across_a_resume():
    clock = FakeClock()
    b = CostBudget(0.1, allowance=0.0, clock=clock)
    b.start()
    clock.now += 10.0
    b.charge(0.7)
    b.defer()
    state = b.state_dict()
    clock.now += 1000.0  # time between the checkpoint and the resume is not training time
    r = CostBudget(0.1, allowance=0.0, clock=clock)
    r.load_state_dict(state)
    r.start()  # the resumed run keeps its start
    assert r.elapsed() == pytest.approx(10.0) and r.spent == pytest.approx(0.7) and r.deferred == 1
    assert r.limit() == pytest.approx(1.0)


def test_defaults_are_named_and_bound_a_ten_second_fit():
    # What the budget itself admits on a 10-second fit must stay under the 10% users accept.
    assert OVERHEAD_ALLOWANCE_SECONDS + DEFAULT_MAX_OVERHEAD * 10.0 < 0.1 * 10.0
    assert wwm.WeightWatcherCallback().max_overhead == DEFAULT_MAX_OVERHEAD


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "0.1", math.nan, True])
def test_max_overhead_is_validated(value):
    with pytest.raises(WWMonitorError, match="`max_overhead`"):
        wwm.WeightWatcherCallback(max_overhead=value)


class Wide(pl.LightningModule):
    """Layers large enough that one analysis costs many training steps."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 384)
        self.b = nn.Linear(384, 384)
        self.c = nn.Linear(384, 4)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.c(torch.relu(self.b(torch.relu(self.a(x))))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(cb, steps=30):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8 * steps, 32), torch.randint(0, 4, (8 * steps,))), batch_size=8)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Wide(), data)
    return trainer


def test_snapshots_due_faster_than_the_budget_are_deferred_not_lost():
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, on_lag="wait", max_overhead=0.01,
                                   alerts=False, figures_every_n_snapshots=None)
    trainer = _fit(cb)
    steps = cb.history.steps
    assert cb.stats["snapshots_deferred"] > 0
    assert cb.stats["snapshots_taken"] + cb.stats["snapshots_deferred"] >= trainer.global_step
    assert steps[0] == 0 and steps[-1] == trainer.global_step  # baseline and final always taken
    assert len(steps) < trainer.global_step
    # The accounting the budget acts on: beyond the limit by at most the last snapshot it admitted
    # (whose real cost can exceed the estimate), plus that snapshot's copy and logging.
    budget = cb._budget
    slack = max(r.seconds for r in cb.history) + cb.stats["copy_seconds"] + 0.05
    assert budget.spent <= budget.limit() + slack
    assert cb.stats["analysis_cpu_seconds"] > 0


def test_no_budget_takes_every_scheduled_snapshot():
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, on_lag="wait", max_overhead=None,
                                   alerts=False, figures_every_n_snapshots=None)
    trainer = _fit(cb, steps=8)
    assert cb.stats["snapshots_deferred"] == 0
    assert cb.history.steps == list(range(trainer.global_step + 1))


def test_at_the_defaults_a_lagging_analysis_thins_the_schedule_quietly(monkeypatch, caplog, recwarn):
    """Under the budget, snapshots the machine cannot afford are news at INFO, not warnings."""
    import importlib
    import logging
    import time

    analyze_mod = importlib.import_module("ww_monitor.analysis.analyze")
    real = analyze_mod.analyze_matrices

    def slow(matrices, config):  # an analysis far slower than a training step
        time.sleep(0.15)
        return real(matrices, config)

    monkeypatch.setattr(analyze_mod, "analyze_matrices", slow)
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, alerts=False,
                                   figures_every_n_snapshots=None)
    with caplog.at_level(logging.INFO, logger="ww_monitor"):
        trainer = _fit(cb, steps=20)
    thinned = cb.stats["snapshots_skipped"] + cb.stats["snapshots_deferred"]
    assert thinned > 0 and cb.history.steps[-1] == trainer.global_step
    messages = [str(w.message) for w in recwarn.list]
    assert not any("skipped the snapshot" in m or "cannot keep up" in m for m in messages), messages
    assert any("max_overhead" in r.getMessage() or "lagged" in r.getMessage() for r in caplog.records)


def test_blocking_mode_keeps_its_deterministic_schedule():
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, blocking=True, max_overhead=0.01,
                                   alerts=False, figures_every_n_snapshots=None)
    trainer = _fit(cb, steps=12)
    assert cb.stats["snapshots_deferred"] == 0
    assert cb.history.steps == list(range(trainer.global_step + 1))
