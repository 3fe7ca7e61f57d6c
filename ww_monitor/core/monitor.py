"""``ww_monitor.Monitor``: spectral monitoring for plain PyTorch loops and Lightning Fabric.

The same engine as ``WeightWatcherCallback`` (:class:`~ww_monitor.core.engine.MonitorEngine`),
driven by two calls instead of a trainer's hooks: :meth:`Monitor.step` after each optimizer
step and :meth:`Monitor.close` at the end.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import WWMonitorError
from ..user_warnings import warn_user
from ..validation import check_int
from .engine import MonitorEngine
from .hooks import on_training_thread as _on_training_thread
from .settings import check_schedule
from .sinks import LoopHost, as_sinks

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Monitor"]

#: Arguments of the Lightning callback that a plain loop has no use for.
_NOT_HERE = {"every_n_epochs": "every_n_steps", "every_n_train_steps": "every_n_steps"}

#: Monitors with a run in progress, closed at interpreter exit if their user did not (weak: a
#: monitor dropped by its user is closed by ``__del__`` instead).
_RUNNING: weakref.WeakSet[Monitor] = weakref.WeakSet()
_atexit_registered = False


def _close_running_monitors() -> None:
    for monitor in list(_RUNNING):
        monitor._close_unclosed("the interpreter exits")


def _watch_until_closed(monitor: Monitor) -> None:
    """Register the exit hook on the first run (not at import: importing has no side effects)."""
    global _atexit_registered
    _RUNNING.add(monitor)
    if not _atexit_registered:
        atexit.register(_close_running_monitors)
        _atexit_registered = True


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the default ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Monitor(MonitorEngine):
    """Watch the eigenvalue spectra of a model's weights in any training loop.

    The first :meth:`step` takes the baseline snapshot; then one every ``every_n_steps`` steps,
    and a final one at :meth:`close`. Each is analysed in the background and written at its
    step: ``ww/<metric>/<layer>`` and ``ww/summary/<metric>`` scalars to every sink, plus ESD
    histograms ``ww/esd/<layer>``, the ``ww/layers`` table and figures to a ``SummaryWriter``.
    Every snapshot is kept in :attr:`history`; :attr:`metrics` holds the latest scalars;
    :meth:`state_dict` / :meth:`load_state_dict` resume without gaps. Under ``torch.distributed``
    every rank calls :meth:`step` with the same steps (each analyses its share of the layers;
    rank 0 writes).

    Example::

        from torch.utils.tensorboard import SummaryWriter
        import ww_monitor

        monitor = ww_monitor.Monitor(SummaryWriter("tb_logs"), every_n_steps=100)
        for step, (x, y) in enumerate(loader, start=1):
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if monitor.step(model, step):  # True once an alert with action "stop" fired
                break
        monitor.close(model, step)
        df = monitor.history.to_pandas()

    Warnings begin with ``Monitor:``. A monitor not closed by the end of the program (or dropped
    without :meth:`close`) warns, takes the final snapshot of the model last passed to
    :meth:`step` and writes what is still in flight, so nothing is lost silently; under
    ``torch.distributed`` (where that needs every rank) it warns and drops the results in flight.
    :meth:`step` numbers must not go back (a per-epoch batch index would): a step before the
    previous one is ignored, with a warning (once per run).

    Args:
        sinks: where results go: a ``SummaryWriter``, any callable ``fn(metrics, step)``, an object
            with ``log_metrics(metrics, step)`` (e.g. a Lightning logger), or a list of these.
            ``None`` keeps them in :attr:`history` and :attr:`metrics` only.
        every_n_steps: take a snapshot every this many steps (``step % every_n_steps == 0``);
            ``None`` only with ``ends_only=True`` (the first and the final snapshot only).
        **options: any other argument of :class:`ww_monitor.WeightWatcherCallback` (``include``,
            ``exclude``, ``kinds``, ``background``, ``blocking``, ``alerts``, ``on_alert``,
            ``esd_shift``, ...), with the same meaning and defaults: ``peft="auto"`` (LoRA adapter
            updates watched) and ``watch_frozen=False`` (matrices that do not require grad are
            analysed once and carried forward).
    """

    warning_prefix = "Monitor"
    no_logger_message = (
        "no logger or sink; results are kept only in `monitor.history` and `monitor.metrics`. "
        "Pass a SummaryWriter, a callable fn(metrics, step) or a logger as `sinks`."
    )

    _options_signature = MonitorEngine.__init__
    _not_here = _NOT_HERE

    def __init__(self, sinks: Any = None, every_n_steps: int | None = 100, **options: Any) -> None:
        try:
            check_schedule(("every_n_steps", every_n_steps), ends_only=options.get("ends_only", False))
        except WWMonitorError as err:
            raise WWMonitorError(f"Monitor: {err}") from None
        super().__init__(every_n_epochs=None, every_n_train_steps=every_n_steps, **options)
        self._host = LoopHost(as_sinks(sinks))
        self._model_ref: weakref.ref[Any] | None = None  # the model last passed to step(), for a close at exit
        self._training_thread: int | None = None
        self._warned_backwards = False

    @property
    def every_n_steps(self) -> int | None:
        return self.every_n_train_steps

    @property
    def sinks(self) -> list:
        return self._host.loggers

    @property
    def should_stop(self) -> bool:
        """True once an alert whose action is ``stop`` fired (also what :meth:`step` returns)."""
        return self._host.should_stop

    @property
    def metrics(self) -> dict[str, float]:
        """The latest snapshot's ``ww/...`` scalars (also in the sinks)."""
        return {k: float(v) for k, v in self._host.callback_metrics.items()}

    @_on_training_thread
    def step(self, model: nn.Module, step: int, epoch: int = 0) -> bool:
        """Call after each optimizer step (every rank alike). Takes the snapshot when one is due,
        writes finished results, and returns :attr:`should_stop`."""
        self._check_step(model, step)
        host = self._host
        if self._active and step < host.global_step:
            self._step_went_back(step, host.global_step)
            if self._world == 1:
                self._collect(host)
            return host.should_stop
        host.global_step = step
        self._model_ref = weakref.ref(model)
        self._training_thread = threading.get_ident()
        n = self.every_n_train_steps
        if not self._active:
            self._check_reuse(step)
            rank, world = _distributed()
            self._warned_backwards = False
            self._start_run(host, model, rank, world, epoch)
            _watch_until_closed(self)
        elif n and step % n == 0 and step != self._checked_step:
            self._checked_step = step
            self._sync_point(host, model, snapshot=step != self._last_step, epoch=epoch)
        elif self._world == 1:
            self._collect(host)
        if self._guard is not None:  # CUDA copies must finish before the next optimizer step
            self._guard.guard_writes()
            self._guard = None
        return host.should_stop

    @_on_training_thread
    def close(self, model: nn.Module | None = None, step: int | None = None, epoch: int = 0) -> None:
        """End of training: a final snapshot of ``model`` at ``step`` (unless that step was just
        taken; none without ``model``), wait for the analyses, write everything, stop the worker."""
        if not self._active:
            return
        host = self._host
        if model is None:
            # No model, no final snapshot: the host is put at the last snapshot's step (None if
            # none was taken, which _finish_run reads as "already taken" too).
            host.global_step = self._last_step  # type: ignore[assignment]
        else:
            self._check_step(model, step if step is not None else host.global_step)
            if step is not None:
                host.global_step = step
        try:
            self._finish_run(host, model, epoch)
        finally:
            _RUNNING.discard(self)

    def state_dict(self) -> dict[str, Any]:
        """The history, alert state and schedule, for ``torch.save`` next to the model's
        (tensors and plain types only: loads with ``weights_only=True``)."""
        return self._engine_state(self._host if self._active else None, None)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort_run()
            _RUNNING.discard(self)

    def __del__(self) -> None:
        if getattr(self, "_active", False):
            self._close_unclosed("it is garbage-collected")

    def _step_went_back(self, step: int, previous: int) -> None:
        if self._warned_backwards:
            return
        self._warned_backwards = True
        warn_user(
            f"Monitor: step {step} is before the previous step {previous}; `step` must count optimizer "
            "steps from the start of training and never go back (a batch index that restarts every "
            "epoch does). Calls with a step that went back are ignored (warned once per run).",
            RuntimeWarning,
        )

    def _close_unclosed(self, when: str) -> None:
        """:meth:`close` for a monitor its user did not close: warn, then take the final snapshot of
        the model last passed to :meth:`step` and write everything still in flight."""
        if not self._active:
            return
        _RUNNING.discard(self)
        host = self._host
        flushable = self._world == 1 and self._training_thread in (None, threading.get_ident())
        if not flushable:
            # Under torch.distributed the final snapshot is a collective the other ranks are not
            # in; on another thread (a garbage collection run by the worker) closing would join it.
            warn_user(
                f"Monitor: not closed when {when}; the results still in flight are dropped. Call "
                "`monitor.close(model, step)` at the end of training.",
                RuntimeWarning,
            )
            self._active = False
            try:
                self._stop_worker(cancel=True)
            except RuntimeError:  # the worker's own thread: it ends with the process (a daemon)
                pass
            return
        model = self._model_ref() if self._model_ref is not None else None
        warn_user(
            f"Monitor: not closed when {when}; closing it now: the final snapshot (step "
            f"{host.global_step}) and the results still in flight are written. Call "
            "`monitor.close(model, step)` at the end of training, or use `with Monitor(...) as monitor:`.",
            RuntimeWarning,
        )
        try:
            self.close(model, host.global_step if model is not None else None)
        except Exception as err:  # at exit or in a garbage collection: never raise
            warn_user(
                f"Monitor: closing failed ({type(err).__name__}: {err}); results still in flight are dropped.",
                RuntimeWarning,
            )
            self._abort_run()

    @staticmethod
    def _check_step(model: nn.Module, step: int) -> None:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise WWMonitorError(f"Monitor: `model` must be a torch.nn.Module, got {type(model).__name__}.")
        check_int("step", step, 0, owner="Monitor")
