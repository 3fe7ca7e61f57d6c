"""``AlphaDriftEarlyStopping``: stop training when the spectra stop improving or degrade.

Reads the values :class:`~ww_monitor.WeightWatcherCallback` puts into
``trainer.callback_metrics`` (``ww/summary/<metric>``, ``ww/<metric>/<layer>``, and
``ww/snapshot_step`` to recognise a new snapshot) and applies
:class:`~ww_monitor.early_stopping.AlphaDriftRule` once per snapshot.

Lag: in background mode a snapshot's result arrives one or more hooks after it was taken (at
the next batch/epoch end, or the next sync point under DDP), so the stop happens then; with
``WeightWatcherCallback(blocking=True)`` it happens at the snapshot. Under DDP every rank has the
same gathered values, and the decision is additionally reduced across ranks at every epoch end
(``strategy.reduce_boolean_decision``), so all ranks stop together.
"""

from __future__ import annotations

import logging
from typing import Any

from .early_stopping import AlphaDriftRule
from .errors import WWMonitorError

__all__ = ["AlphaDriftEarlyStoppingMixin", "AlphaDriftEarlyStopping"]

log = logging.getLogger(__name__)

SNAPSHOT_KEY = "ww/snapshot_step"


class AlphaDriftEarlyStoppingMixin:
    """Stop when the monitored spectral quantity falls below a floor, degrades, or converges.

    Example::

        from ww_monitor import WeightWatcherCallback, AlphaDriftEarlyStopping
        trainer = pl.Trainer(callbacks=[
            WeightWatcherCallback(every_n_epochs=1),
            AlphaDriftEarlyStopping(monitor="ww/summary/alpha", floor=2.0, max_rise=0.5),
        ])

    Args:
        monitor: a key the WeightWatcherCallback fills: ``ww/summary/alpha`` (default),
            ``ww/summary/alpha_weighted``, or a layer's ``ww/alpha/<layer name>``.
        floor: stop when the value falls below this (mean alpha < 2: over-training). ``None``: off.
        max_rise: stop when the value rises more than this above its best (lowest). ``None``: off.
        min_delta: with ``patience``: stop when the value changes by less than this for
            ``patience`` consecutive snapshots (converged). ``None``: off.
        patience: snapshots of no change that count as converged.
        min_snapshots: never stop before this many snapshots were seen (the baseline at train
            start is one); Lightning's own ``Trainer(min_epochs=...)`` is honoured as well.
        verbose: log the decision at INFO level.
    """

    def __init__(self, monitor: str = "ww/summary/alpha", floor: float | None = 2.0, max_rise: float | None = None,
                 min_delta: float | None = None, patience: int = 3, min_snapshots: int = 2, verbose: bool = True) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor.startswith("ww/"):
            raise WWMonitorError(f"`monitor` must be a ww/ metric key such as 'ww/summary/alpha', got {monitor!r}.")
        if not isinstance(min_snapshots, int) or min_snapshots < 1:
            raise WWMonitorError(f"`min_snapshots` must be an int >= 1, got {min_snapshots!r}.")
        try:
            self.rule = AlphaDriftRule(floor=floor, max_rise=max_rise, min_delta=min_delta, patience=patience,
                                       monitor=monitor)
        except ValueError as err:
            raise WWMonitorError(f"AlphaDriftEarlyStopping: {err}") from None
        self.monitor = monitor
        self.min_snapshots = min_snapshots
        self.verbose = verbose
        self.seen_steps: list[int] = []
        self.stopped_reason = ""
        self.stopped_step: int | None = None
        self._want_stop = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)  # type: ignore[attr-defined]

    def _check(self, trainer) -> None:
        cm = trainer.callback_metrics
        marker, value = cm.get(SNAPSHOT_KEY), cm.get(self.monitor)
        if marker is None or value is None:
            return
        step = int(marker)
        if step in self.seen_steps:
            return
        self.seen_steps.append(step)
        decision = self.rule.update(float(value))
        if decision.stop and len(self.seen_steps) >= self.min_snapshots and not self._want_stop:
            self._want_stop = True
            self.stopped_reason = decision.reason
            self.stopped_step = step
            if self.verbose and trainer.global_rank == 0:
                log.info("AlphaDriftEarlyStopping: stopping (%s) on the snapshot of step %d: %s",
                         decision.criterion, step, decision.reason)

    def _apply(self, trainer, reduce: bool) -> None:
        stop = self._want_stop
        if reduce:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer)
        if trainer.world_size == 1:
            self._apply(trainer, reduce=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)
        # Every rank reaches every epoch end: the one place a collective decision is safe.
        self._apply(trainer, reduce=trainer.world_size > 1)

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "seen_steps": list(self.seen_steps),
                "stopped_reason": self.stopped_reason, "stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rule.load_state_dict(state_dict.get("rule", {}))
        self.seen_steps = [int(s) for s in state_dict.get("seen_steps", [])]
        self.stopped_reason = state_dict.get("stopped_reason", "")
        self.stopped_step = state_dict.get("stopped_step")


def _build(base: type, module: str) -> type:
    cls = type("AlphaDriftEarlyStopping", (AlphaDriftEarlyStoppingMixin, base),
               {"__doc__": AlphaDriftEarlyStoppingMixin.__doc__, "__module__": module})
    cls.__qualname__ = "AlphaDriftEarlyStopping"
    return cls


def __getattr__(name: str):
    if name == "AlphaDriftEarlyStopping":
        from pytorch_lightning import Callback

        cls = _build(Callback, __name__)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
