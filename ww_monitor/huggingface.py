"""``ww_monitor.huggingface.WeightWatcherCallback``: the monitor as a ``transformers`` ``TrainerCallback``.

Needs the optional extra ``pip install ww-monitor[huggingface]``. The engine is the one behind
the Lightning callback (:class:`~ww_monitor.core.engine.MonitorEngine`); this module translates
the Trainer's events: ``on_train_begin`` (baseline snapshot, or the state of the checkpoint
resumed from), ``on_step_end`` / ``on_epoch_end`` (scheduled snapshots, results written, stop
decisions into ``control.should_training_stop``), ``on_save`` (the monitor's state saved in the
checkpoint folder, ``ww_monitor_state.pt``), ``on_train_end`` (final snapshot, drain, flush).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from .core.engine import MonitorEngine
from .core.monitor import _distributed
from .core.sinks import LoopHost, SummaryWriterSink, as_sinks
from .errors import WWMonitorError
from .integrations.alpha_drift import AlphaDriftEarlyStoppingMixin
from .validation import check_int

__all__ = ["WeightWatcherCallback", "STATE_FILE"]

#: The monitor's state in each Trainer checkpoint folder (``checkpoint-<step>/``).
STATE_FILE = "ww_monitor_state.pt"
_TENSORBOARD = ("auto", True, False)


class _Drift(AlphaDriftEarlyStoppingMixin):
    """The Lightning-free alpha-drift rule (the same checks on the same ``ww/...`` values)."""


class WeightWatcherCallback(TrainerCallback):
    """Watch the eigenvalue spectra of the model's weights while a ``transformers.Trainer`` trains.

    Example::

        from transformers import Trainer, TrainingArguments
        from ww_monitor.huggingface import WeightWatcherCallback

        ww = WeightWatcherCallback(every_n_steps=100, alpha_drift={"floor": 2.0})
        trainer = Trainer(model=model, args=TrainingArguments("out", report_to="tensorboard"),
                          train_dataset=ds, callbacks=[ww])
        trainer.train()                  # resume: trainer.train(resume_from_checkpoint=True)
        df = ww.history.to_pandas()

    Args:
        every_n_steps: snapshot every this many optimizer steps (``None``: off).
        every_n_epochs: snapshot at the end of every this many epochs (``None``: off).
        tensorboard: write ``ww/...`` scalars, ESD histograms ``ww/esd/<layer>``, the layer table
            and figures to a ``SummaryWriter`` (rank 0): ``"auto"`` when ``report_to`` includes
            ``"tensorboard"``, or True/False.
        tensorboard_dir: its folder; default ``$TENSORBOARD_LOGGING_DIR`` (where the Trainer's own
            TensorBoard callback writes, when set), else ``<output_dir>/runs/ww_monitor``.
        sinks: more destinations: callables ``fn(metrics, step)`` (e.g. ``wandb.log``), objects
            with ``log_metrics(metrics, step)``, ``SummaryWriter`` s, or a list of these.
        alpha_drift: stop training on spectral drift: the arguments of
            ``ww_monitor.AlphaDriftEarlyStopping`` as a dict (``{"floor": 2.0, "max_rise": 0.5}``);
            ``None`` (default) never stops on drift. Alerts with action ``stop`` also stop training.
        **options: any other argument of ``ww_monitor.WeightWatcherCallback`` (``include``,
            ``exclude``, ``kinds``, ``background``, ``blocking``, ``alerts``, ...), same meaning.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = 1,
                 tensorboard: str | bool = "auto", tensorboard_dir: str | None = None, sinks=None, alpha_drift: dict | None = None, **options: Any) -> None:
        for name in ("every_n_train_steps", "log_callback_metrics"):
            if name in options:
                raise WWMonitorError(f"huggingface.WeightWatcherCallback: `{name}` is not an argument here"
                                     + ("; use `every_n_steps`." if name == "every_n_train_steps" else "."))
        check_int("every_n_steps", every_n_steps, 1, allow_none=True, owner="huggingface.WeightWatcherCallback")
        if tensorboard not in _TENSORBOARD:
            raise WWMonitorError(f"huggingface.WeightWatcherCallback: `tensorboard` must be 'auto', True or False, "
                                 f"got {tensorboard!r}.")
        if alpha_drift is not None and not isinstance(alpha_drift, dict):
            raise WWMonitorError(f"huggingface.WeightWatcherCallback: `alpha_drift` must be a dict of "
                                 f"AlphaDriftEarlyStopping arguments or None, got {alpha_drift!r}.")
        self.engine = MonitorEngine(every_n_epochs=every_n_epochs, every_n_train_steps=every_n_steps, **options)
        self.tensorboard = tensorboard
        self.tensorboard_dir = tensorboard_dir
        self._extra_sinks = as_sinks(sinks)
        self.drift = _Drift(**alpha_drift) if alpha_drift is not None else None
        self._host = LoopHost([])
        self._host.global_rank = 0
        self._writer = None

    # what users read --------------------------------------------------------
    @property
    def history(self):
        """Every analysed snapshot (``history.to_pandas()``: one row per snapshot and layer)."""
        return self.engine.history

    @property
    def stats(self) -> dict:
        return self.engine.stats

    @property
    def alerts_fired(self) -> list:
        return self.engine.alerts_fired

    # Trainer events ---------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        host, engine = self._host, self.engine
        host.global_step = state.global_step
        host.ends_at_this_step = False
        rank, world = _distributed()
        host.global_rank = rank
        host.loggers = list(self._extra_sinks)
        if rank == 0 and self._wants_tensorboard(args):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self._tensorboard_dir(args))
            host.loggers.append(SummaryWriterSink(self._writer))
        if state.global_step > 0 and not len(engine.history):
            self._load_checkpoint_state(args, state)
        engine._check_reuse(state.global_step)
        engine._start_run(host, model, rank, world, epoch=int(state.epoch or 0))
        return self._decide(control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine, host = self.engine, self._host
        if not engine._active:
            return control
        step = host.global_step = state.global_step
        host.ends_at_this_step = 0 < state.max_steps <= step
        n = engine.every_n_train_steps
        if n and step % n == 0 and step != engine._checked_step:
            engine._checked_step = step
            engine._sync_point(host, model, snapshot=step != engine._last_step, epoch=int(state.epoch or 0))
        elif engine._world == 1:
            engine._collect(host)
        self._release_copies()
        return self._decide(control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        engine, host = self.engine, self._host
        if not engine._active:
            return control
        host.global_step = state.global_step
        epoch = int(round(state.epoch or 0))
        n = engine.every_n_epochs
        due = bool(n) and epoch % n == 0 and state.global_step != engine._last_step
        if due or engine._world > 1:  # under DDP every epoch end is a sync point
            engine._sync_point(host, model, snapshot=due, epoch=epoch)
        else:
            engine._collect(host)
        self._release_copies()
        return self._decide(control)

    def on_save(self, args, state, control, **kwargs):
        # Every rank saves (the gather inside is a sync point); rank 0 writes the file.
        saved = self.engine._engine_state(self._host if self.engine._active else None, None)
        if self.drift is not None:
            saved["alpha_drift"] = self.drift.state_dict()
        if state.is_world_process_zero:
            folder = self._checkpoint_folder(args, state)
            os.makedirs(folder, exist_ok=True)
            torch.save(saved, os.path.join(folder, STATE_FILE))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._host.global_step = state.global_step
        try:
            self.engine._finish_run(self._host, model, int(round(state.epoch or 0)))
            self._check_drift()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return control

    # internals --------------------------------------------------------------
    def _wants_tensorboard(self, args) -> bool:
        if self.tensorboard != "auto":
            return bool(self.tensorboard)
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        return "tensorboard" in report_to or "all" in report_to

    def _tensorboard_dir(self, args) -> str:
        return (self.tensorboard_dir or os.getenv("TENSORBOARD_LOGGING_DIR")
                or os.path.join(args.output_dir, "runs", "ww_monitor"))

    @staticmethod
    def _checkpoint_folder(args, state) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def _load_checkpoint_state(self, args, state) -> None:
        """Resuming: the state saved in the checkpoint the Trainer resumed from (the folder of
        ``state.global_step``); without it the history starts afresh at this step."""
        path = os.path.join(self._checkpoint_folder(args, state), STATE_FILE)
        if not os.path.exists(path):
            return
        saved = torch.load(path, weights_only=True)
        self.engine.load_state_dict(saved)
        if self.drift is not None and "alpha_drift" in saved:
            self.drift.load_state_dict(saved["alpha_drift"])

    def _release_copies(self) -> None:
        if self.engine._guard is not None:  # CUDA copies must finish before the next optimizer step
            self.engine._guard.guard_writes()
            self.engine._guard = None

    def _check_drift(self) -> None:
        if self.drift is not None:
            self.drift._check(self._host)

    def _decide(self, control):
        self._check_drift()
        if self._host.should_stop or (self.drift is not None and self.drift._want_stop):
            control.should_training_stop = True
        return control
