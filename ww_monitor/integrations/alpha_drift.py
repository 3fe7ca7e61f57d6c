"""``AlphaDriftEarlyStopping``: stop training when the spectra stop improving or degrade.

Reads the values :class:`~ww_monitor.WeightWatcherCallback` puts into
``trainer.callback_metrics`` (``ww/summary/<metric>``, ``ww/<metric>/<layer>``, and
``ww/snapshot_step`` to recognise a new snapshot) and applies
:class:`~ww_monitor.monitoring.early_stopping.AlphaDriftRule` once per snapshot.

Warm-up (``warmup=True``, the default): right after initialisation every layer is random-like
and its alpha is large and noisy; in the first epochs mean alpha typically *rises* before it
falls (the quickstart: 5.0 -> 7.9 -> 3.5 ...), which a "rose above its best" rule would read as
degradation. So no decision is taken, and no best value recorded, until the spectra have left
their initial state: the first snapshot at which fewer than half of the layers that have a phase
are random-like (``WARMUP_MAX_RANDOM_SHARE``; the counts come from ``ww/summary/num_random_like``,
``ww/summary/num_layers`` and ``ww/summary/num_undetermined``). If no layer has a phase (all
too small), the criterion cannot speak and only ``min_snapshots`` applies.

Stop reason: when it stops training it says why in a warning (shown without any logging
configuration, rank 0 only, attributed to the user's ``trainer.fit`` line) and, with a
TensorBoard logger, as text ``ww/early_stopping`` at the snapshot's step; ``stopped_reason``
keeps it.

Lag: in background mode a snapshot's result arrives one or more hooks after it was taken (at
the next batch/epoch end, or the next sync point under DDP), so the stop happens then; with
``WeightWatcherCallback(blocking=True)`` it happens at the snapshot. Under DDP every rank has the
same gathered values, and the decision is additionally reduced across ranks at every epoch end
(``strategy.reduce_boolean_decision``), so all ranks stop together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import WWMonitorError
from ..monitoring.early_stopping import AlphaDriftRule
from ..user_warnings import warn_user
from ..validation import CheckedKeywords, check_bool, check_int, check_number
from .lightning_callback import Trainer

# AlphaDriftEarlyStopping is built on first access (module __getattr__), which F822 cannot see.
__all__ = [
    "AlphaDriftEarlyStoppingMixin",
    "AlphaDriftEarlyStopping",  # noqa: F822
    "WARMUP_MAX_RANDOM_SHARE",
    "spectra_left_random_state",
]

log = logging.getLogger(__name__)

SNAPSHOT_KEY = "ww/snapshot_step"
#: Warm-up ends once the share of phase-determined layers still random-like falls below this:
#: most of the network then shows learned structure (spikes, a decaying edge or a heavy tail),
#: while a minority of layers that barely train (a frozen embedding, a tiny layer) cannot hold
#: the decision back forever.
WARMUP_MAX_RANDOM_SHARE = 0.5
_COUNT_KEYS = ("ww/summary/num_layers", "ww/summary/num_undetermined", "ww/summary/num_random_like")


def spectra_left_random_state(num_layers: float, num_undetermined: float, num_random_like: float) -> bool:
    """The warm-up criterion: fewer than ``WARMUP_MAX_RANDOM_SHARE`` of the layers with a phase
    are random-like (True also when no layer has a phase: the criterion cannot speak)."""
    phased = num_layers - num_undetermined
    return phased <= 0 or num_random_like / phased < WARMUP_MAX_RANDOM_SHARE


class AlphaDriftEarlyStoppingMixin(CheckedKeywords):
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
        warmup: take no decision (and record no best value) before the spectra have left their
            initial random-like state (module docstring). ``False``: decide from the first snapshot.
        verbose: also log the decision and the end of the warm-up at INFO level (the stop reason
            is always shown as a warning).
    """

    warning_prefix = "AlphaDriftEarlyStopping"

    def __init__(
        self,
        monitor: str = "ww/summary/alpha",
        floor: float | None = 2.0,
        max_rise: float | None = None,
        min_delta: float | None = None,
        patience: int = 3,
        min_snapshots: int = 2,
        verbose: bool = True,
        warmup: bool = True,
    ) -> None:
        super().__init__()
        owner = "AlphaDriftEarlyStopping"
        if not isinstance(monitor, str) or not monitor.startswith("ww/"):
            raise WWMonitorError(
                f"{owner}: `monitor` must be a ww/ metric key such as 'ww/summary/alpha', got {monitor!r}."
            )
        check_number("floor", floor, allow_none=True, owner=owner)
        check_number("max_rise", max_rise, allow_none=True, above=0.0, owner=owner)
        check_number("min_delta", min_delta, allow_none=True, above=0.0, owner=owner)
        check_int("patience", patience, 1, owner=owner)
        check_int("min_snapshots", min_snapshots, 1, owner=owner)
        check_bool("verbose", verbose, owner=owner)
        try:
            self.rule = AlphaDriftRule(
                floor=floor, max_rise=max_rise, min_delta=min_delta, patience=patience, monitor=monitor
            )
        except ValueError as err:
            raise WWMonitorError(f"AlphaDriftEarlyStopping: {err}") from None
        if not isinstance(warmup, bool):
            raise WWMonitorError(f"`warmup` must be True or False, got {warmup!r}.")
        self.monitor = monitor
        self.min_snapshots = min_snapshots
        self.verbose = verbose
        self.warmup = warmup
        self.warmup_done = not warmup
        self.warmup_end_step: int | None = None
        self.seen_steps: list[int] = []
        self.stopped_reason = ""
        self.stopped_step: int | None = None
        self._want_stop = False
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)  # type: ignore[attr-defined]  # Lightning Callback's, the base at run time

    def _warn_missing(self, trainer: Trainer, cm: Mapping[str, Any]) -> None:
        """A snapshot's results arrived without the monitored key: it may be misspelt (or name a
        layer that is not analysed), and then this callback would never act. Warned once."""
        if self._warned_missing:
            return
        self._warned_missing = True
        import difflib

        keys = sorted(k for k in cm if isinstance(k, str) and k.startswith("ww/") and k != SNAPSHOT_KEY)
        close = difflib.get_close_matches(self.monitor, keys, n=3)
        hint = f"; did you mean {', '.join(repr(k) for k in close)}?" if close else ""
        if trainer.global_rank == 0:
            warn_user(
                f"AlphaDriftEarlyStopping: monitor={self.monitor!r} is not among the metrics "
                f"WeightWatcherCallback logged ({len(keys)} ww/ keys){hint} It never stops training "
                "while the key is missing.",
                RuntimeWarning,
            )

    def _check(self, trainer: Trainer) -> None:
        cm = trainer.callback_metrics
        marker, value = cm.get(SNAPSHOT_KEY), cm.get(self.monitor)
        if marker is not None and value is None:
            self._warn_missing(trainer, cm)
        if marker is None or value is None:
            return
        step = int(marker)
        if step in self.seen_steps:
            return
        self.seen_steps.append(step)
        if not self.warmup_done:
            counts = [cm.get(k) for k in _COUNT_KEYS]
            if any(c is None for c in counts) or spectra_left_random_state(*(float(c) for c in counts)):
                self.warmup_done, self.warmup_end_step = True, step
                if self.verbose and trainer.global_rank == 0:
                    log.info(
                        "AlphaDriftEarlyStopping: warm-up over at step %d (the spectra left their random-like "
                        "initial state); decisions start now",
                        step,
                    )
            else:
                return
        decision = self.rule.update(float(value))
        if decision.stop and len(self.seen_steps) >= self.min_snapshots and not self._want_stop:
            self._want_stop = True
            self.stopped_reason = decision.reason
            self.stopped_step = step
            if trainer.global_rank == 0:
                self._announce(trainer, decision.criterion, step)

    def _announce(self, trainer: Trainer, criterion: str, step: int) -> None:
        """Say why training stops: a warning (no logging setup needed) and TensorBoard text."""
        text = (
            f"AlphaDriftEarlyStopping: stopping training ({criterion}) on the snapshot of step {step}: "
            f"{self.stopped_reason}"
        )
        warn_user(text, UserWarning)
        if self.verbose:
            log.info(text)
        from ..outputs.tensorboard_writer import is_tensorboard_logger

        for lg in getattr(trainer, "loggers", None) or []:
            if not is_tensorboard_logger(lg):
                continue
            try:
                lg.experiment.add_text("ww/early_stopping", text, global_step=step)
            except Exception as err:  # a closed logger must not turn a stop into a crash
                log.debug("could not write the stop reason to TensorBoard: %s", err)

    def _apply(self, trainer: Trainer, reduce: bool) -> None:
        stop = self._want_stop
        if reduce:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            trainer.should_stop = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer)
        if trainer.world_size == 1:
            self._apply(trainer, reduce=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: nn.Module) -> None:
        self._check(trainer)
        # Every rank reaches every epoch end: the one place a collective decision is safe.
        self._apply(trainer, reduce=trainer.world_size > 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.state_dict(),
            "seen_steps": list(self.seen_steps),
            "stopped_reason": self.stopped_reason,
            "stopped_step": self.stopped_step,
            "warmup_done": self.warmup_done,
            "warmup_end_step": self.warmup_end_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rule.load_state_dict(state_dict.get("rule", {}))
        self.seen_steps = [int(s) for s in state_dict.get("seen_steps", [])]
        self.stopped_reason = state_dict.get("stopped_reason", "")
        self.stopped_step = state_dict.get("stopped_step")
        self.warmup_done = bool(state_dict.get("warmup_done", self.warmup_done))
        self.warmup_end_step = state_dict.get("warmup_end_step")


def _build(base: type, module: str) -> type:
    cls = type(
        "AlphaDriftEarlyStopping",
        (AlphaDriftEarlyStoppingMixin, base),
        {"__doc__": AlphaDriftEarlyStoppingMixin.__doc__, "__module__": module},
    )
    cls.__qualname__ = "AlphaDriftEarlyStopping"
    return cls


def __getattr__(name: str) -> type:
    if name == "AlphaDriftEarlyStopping":
        from pytorch_lightning import Callback

        cls = _build(Callback, __name__)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
