"""``ww_monitor.huggingface.WeightWatcherCallback``: the monitor as a ``transformers`` ``TrainerCallback``.

Needs the optional extra ``pip install ww-monitor[huggingface]``. The engine is the one behind
the Lightning callback (:class:`~ww_monitor.core.engine.MonitorEngine`); this module translates
the Trainer's events: ``on_train_begin`` (baseline snapshot, or the state of the checkpoint
resumed from), ``on_step_end`` / ``on_epoch_end`` (scheduled snapshots, results written, stop
decisions into ``control.should_training_stop``), ``on_save`` (the monitor's state saved in the
checkpoint folder, ``ww_monitor_state.pt``), ``on_train_end`` (final snapshot, drain, flush).

Reporting integrations (``report_to``: W&B, MLflow, Comet, TensorBoard, ...): the Trainer calls
them before user callbacks and only with its own logs, so they would never see our scalars. At
train start the callback finds the Trainer's ``CallbackHandler`` (it is the caller of the event),
moves itself just before the first integration (so its ``on_train_end``, which writes the final
snapshot, runs before they close), and hands every completed snapshot's ``ww/...`` scalars to the
integrations' ``on_log``, as the Trainer does with its logs. The Trainer's TensorBoard integration
is skipped while this callback writes TensorBoard itself (by default into that integration's run
folder, at the snapshot's step, with histograms), so no tag is written twice.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from .balancing.huggingface import AlphaDecay, SpectralBalancer, TempBalance, _output_dir
from .core.engine import MonitorEngine
from .core.hooks import training_thread_time
from .core.monitor import _distributed
from .core.settings import check_schedule
from .core.sinks import LoopHost, SummaryWriterSink, as_sinks
from .errors import WWMonitorError
from .integrations.alpha_drift import AlphaDriftEarlyStoppingMixin
from .user_warnings import warn_user
from .validation import CheckedKeywords, check_bool

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from .monitoring.history import History
    from .outputs.plan import CostPlan

__all__ = ["WeightWatcherCallback", "STATE_FILE", "SpectralBalancer", "TempBalance", "AlphaDecay"]

log = logging.getLogger(__name__)

#: The monitor's state in each Trainer checkpoint folder (``checkpoint-<step>/``).
STATE_FILE = "ww_monitor_state.pt"
_TENSORBOARD = ("auto", True, False)
#: How far up the stack the Trainer's ``CallbackHandler.call_event`` is from our event method
#: (it calls us directly; one more level tolerates a wrapper).
_HANDLER_FRAMES = 2


def _reporting_callbacks() -> dict[str, type]:
    """``report_to`` name -> integration callback class, as transformers maps them."""
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover - depends on the transformers version
        return {}
    return dict(INTEGRATION_TO_CALLBACK)


class _PendingScalars:
    """A sink keeping the latest ``ww/...`` scalars until they are handed to the integrations."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics)
        self.metrics["ww/snapshot_step"] = float(step)

    def take(self) -> dict[str, float]:
        out, self.metrics = self.metrics, {}
        return out


class _TrainerEngine(MonitorEngine):
    """The engine, with warnings that name this front door."""

    warning_prefix = "huggingface.WeightWatcherCallback"
    no_logger_message = (
        "no logger; results are kept only in `callback.history`. Report to TensorBoard "
        '(report_to="tensorboard" or tensorboard=True) or another report_to integration, or pass '
        "`sinks`."
    )


class _Drift(AlphaDriftEarlyStoppingMixin):
    """The Lightning-free alpha-drift rule (the same checks on the same ``ww/...`` values)."""


class WeightWatcherCallback(CheckedKeywords, TrainerCallback):
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
        every_n_epochs: snapshot at the end of every this many epochs (``None``: off). With both
            off, pass ``ends_only=True`` (only the baseline and final snapshots are taken).
        tensorboard: write ``ww/...`` scalars, ESD histograms ``ww/esd/<layer>``, the layer table
            and figures to a ``SummaryWriter`` (rank 0): ``"auto"`` when ``report_to`` includes
            ``"tensorboard"``, or True/False.
        tensorboard_dir: its folder; default: the run folder of the Trainer's TensorBoard
            integration when ``report_to`` has one (``$TENSORBOARD_LOGGING_DIR`` or
            ``<output_dir>/runs/<date>_<host>``: our tags appear next to the loss), else
            ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/ww_monitor``.
        report_to_integrations: also hand the ``ww/...`` scalars (and ``ww/snapshot_step``) of
            every completed snapshot to the Trainer's ``report_to`` integrations (W&B, MLflow,
            Comet, ...), logged at the Trainer's step when the results arrive; the TensorBoard
            integration only when ``tensorboard`` is off (else the values would be written twice).
        sinks: more destinations: callables ``fn(metrics, step)`` (e.g. ``wandb.log``), objects
            with ``log_metrics(metrics, step)``, ``SummaryWriter`` s, or a list of these.
        alpha_drift: stop training on spectral drift: the arguments of
            ``ww_monitor.AlphaDriftEarlyStopping`` as a dict (``{"floor": 2.0, "max_rise": 0.5}``);
            ``None`` (default) never stops on drift. Alerts with action ``stop`` also stop training.
        **options: any other argument of ``ww_monitor.WeightWatcherCallback`` (``include``,
            ``exclude``, ``kinds``, ``background``, ``blocking``, ``alerts``, ...), same meaning
            and defaults: ``peft="auto"`` (a peft LoRA model's adapter updates are watched at every
            snapshot) and ``watch_frozen=False`` (matrices that do not require grad, such as the
            base weights under LoRA, are analysed once and carried forward).
    """

    warning_prefix = "huggingface.WeightWatcherCallback"
    _options_signature = MonitorEngine.__init__
    _not_here: ClassVar[Mapping[str, str | None]] = {
        "every_n_train_steps": "every_n_steps",
        "log_callback_metrics": None,
    }

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        tensorboard: str | bool = "auto",
        tensorboard_dir: str | None = None,
        sinks: Any = None,
        alpha_drift: dict | None = None,
        report_to_integrations: bool = True,
        **options: Any,
    ) -> None:
        try:
            check_schedule(
                ("every_n_steps", every_n_steps),
                ("every_n_epochs", every_n_epochs),
                ends_only=options.get("ends_only", False),
            )
        except WWMonitorError as err:
            raise WWMonitorError(f"huggingface.WeightWatcherCallback: {err}") from None
        if tensorboard not in _TENSORBOARD:
            raise WWMonitorError(
                f"huggingface.WeightWatcherCallback: `tensorboard` must be 'auto', True or False, got {tensorboard!r}."
            )
        if alpha_drift is not None and not isinstance(alpha_drift, dict):
            raise WWMonitorError(
                f"huggingface.WeightWatcherCallback: `alpha_drift` must be a dict of "
                f"AlphaDriftEarlyStopping arguments or None, got {alpha_drift!r}."
            )
        check_bool("report_to_integrations", report_to_integrations, owner="huggingface.WeightWatcherCallback")
        self.engine = _TrainerEngine(every_n_epochs=every_n_epochs, every_n_train_steps=every_n_steps, **options)
        self.report_to_integrations = report_to_integrations
        self._pending = _PendingScalars()
        self._integrations: list = []  # the integration callbacks our scalars are handed to
        self.tensorboard = tensorboard
        self.tensorboard_dir = tensorboard_dir
        self._extra_sinks = as_sinks(sinks)
        try:
            self.drift = _Drift(**alpha_drift) if alpha_drift is not None else None
        except WWMonitorError as err:
            raise WWMonitorError(f"huggingface.WeightWatcherCallback: `alpha_drift`: {err}") from None
        self._host = LoopHost([])
        self._host.global_rank = 0
        self._writer: SummaryWriter | None = None

    # what users read --------------------------------------------------------
    @property
    def history(self) -> History:
        """Every analysed snapshot (``history.to_pandas()``: one row per snapshot and layer)."""
        return self.engine.history

    @property
    def stats(self) -> dict:
        return self.engine.stats

    @property
    def alerts_fired(self) -> list:
        return self.engine.alerts_fired

    def plan(self, model: nn.Module | Mapping[str, torch.Tensor], ranks: int | None = None, **options: Any) -> CostPlan:
        """What monitoring ``model`` will cost per snapshot, before training: see
        :meth:`ww_monitor.WeightWatcherCallback.plan` (same arguments)."""
        return self.engine.plan(model, ranks, **options)

    # Trainer events ---------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        host, engine = self._host, self.engine
        host.global_step = state.global_step
        host.ends_at_this_step = False
        rank, world = _distributed()
        host.global_rank = rank
        host.loggers = list(self._extra_sinks)
        integrations, set_up = self._join_integrations()
        tensorboard_class = _reporting_callbacks().get("tensorboard") or ()
        tensorboard_run = next(
            (getattr(cb, "logging_dir", None) for cb in integrations if isinstance(cb, tensorboard_class)), None
        )
        own_tensorboard = self._wants_tensorboard(args)
        if rank == 0 and own_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self._tensorboard_dir(args, tensorboard_run))
            host.loggers.append(SummaryWriterSink(self._writer))
        self._integrations = [
            cb
            for cb in integrations
            if self.report_to_integrations and not (own_tensorboard and isinstance(cb, tensorboard_class))
        ]
        if rank == 0 and self._integrations:
            host.loggers.append(self._pending)
        if state.global_step > 0 and not len(engine.history):
            self._load_checkpoint_state(args, state)
        engine._check_reuse(state.global_step)
        engine._start_run(host, model, rank, world, epoch=int(state.epoch or 0))
        if set_up:  # the baseline at step 0 (else at the first step: the integrations set up after us)
            self._report(args, state, control, model)
        return self._decide(control)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        with training_thread_time(self.engine):  # timed like the Lightning hooks
            return self._on_step_end(args, state, control, model)

    def _on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None
    ) -> TrainerControl:
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
        self._report(args, state, control, model)
        return self._decide(control)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        with training_thread_time(self.engine):  # timed like the Lightning hooks
            return self._on_epoch_end(args, state, control, model)

    def _on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None
    ) -> TrainerControl:
        engine, host = self.engine, self._host
        if not engine._active:
            return control
        host.global_step = state.global_step
        epoch = int(round(state.epoch or 0))
        n = engine.every_n_epochs
        due = bool(n) and n is not None and epoch % n == 0 and state.global_step != engine._last_step
        if due or engine._world > 1:  # under DDP every epoch end is a sync point
            engine._sync_point(host, model, snapshot=due, epoch=epoch)
        else:
            engine._collect(host)
        self._release_copies()
        self._report(args, state, control, model)
        return self._decide(control)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # Every rank saves (the gather inside is a sync point); rank 0 writes the file.
        saved = self.engine._engine_state(self._host if self.engine._active else None, None)
        if self.drift is not None:
            saved["alpha_drift"] = self.drift.state_dict()
        if state.is_world_process_zero:
            folder = self._checkpoint_folder(args, state)
            os.makedirs(folder, exist_ok=True)
            torch.save(saved, os.path.join(folder, STATE_FILE))
        return control

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        self._host.global_step = state.global_step
        try:
            self.engine._finish_run(self._host, model, int(round(state.epoch or 0)))
            self._check_drift()
            self._report(args, state, control, model)
        finally:
            self._integrations = []
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return control

    # internals --------------------------------------------------------------
    def _wants_tensorboard(self, args: TrainingArguments) -> bool:
        if self.tensorboard != "auto":
            return bool(self.tensorboard)
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        return "tensorboard" in report_to or "all" in report_to

    def _tensorboard_dir(self, args: TrainingArguments, tensorboard_run: str | None) -> str:
        return (
            self.tensorboard_dir
            or tensorboard_run
            or os.getenv("TENSORBOARD_LOGGING_DIR")
            or os.path.join(_output_dir(args), "runs", "ww_monitor")
        )

    def _join_integrations(self) -> tuple[list, bool]:
        """The Trainer's ``report_to`` callbacks, and whether their ``on_train_begin`` already ran
        (we came after them). Moves this callback just before the first of them, so that our
        ``on_train_end`` (the final snapshot) reports before they close."""
        handler = None
        frame: FrameType | None = sys._getframe(2)  # the caller of the event method that called us
        for _ in range(_HANDLER_FRAMES):
            candidate = frame.f_locals.get("self") if frame is not None else None
            if isinstance(candidate, CallbackHandler) and self in candidate.callbacks:
                handler = candidate
                break
            frame = frame.f_back if frame is not None else None
        if handler is None:  # not called by a Trainer (e.g. a test calling the events directly)
            log.debug(
                "ww_monitor: the Trainer's callback handler was not found; no report_to integration "
                "gets the ww/ scalars"
            )
            return [], False
        classes = tuple(_reporting_callbacks().values())
        integrations = [cb for cb in handler.callbacks if isinstance(cb, classes)]
        if not integrations:
            return [], False
        position = handler.callbacks.index
        set_up = position(self) > max(position(cb) for cb in integrations)  # all of them ran before us
        if position(self) > position(integrations[0]):
            # Moving ourselves earlier while the handler iterates is safe: the callbacks after our old
            # position keep their indices, so none is skipped or called twice in this event.
            callbacks = handler.callbacks
            callbacks.remove(self)
            callbacks.insert(callbacks.index(integrations[0]), self)
        return integrations, set_up

    def _report(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None
    ) -> None:
        """Hand the completed snapshots' scalars to the integrations, as the Trainer hands its logs."""
        if not self._integrations or not self._pending.metrics:
            return
        logs = self._pending.take()
        for cb in self._integrations:
            try:
                cb.on_log(args, state, control, logs=dict(logs), model=model)
            except Exception as err:  # a reporting backend's problem must not end training
                warn_user(
                    f"huggingface.WeightWatcherCallback: {type(cb).__name__} could not log the ww/ scalars "
                    f"({type(err).__name__}: {err}); continuing.",
                    RuntimeWarning,
                )

    @staticmethod
    def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
        return os.path.join(_output_dir(args), f"checkpoint-{state.global_step}")

    def _load_checkpoint_state(self, args: TrainingArguments, state: TrainerState) -> None:
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

    def _decide(self, control: TrainerControl) -> TrainerControl:
        self._check_drift()
        if self._host.should_stop or (self.drift is not None and self.drift._want_stop):
            control.should_training_stop = True
        return control
