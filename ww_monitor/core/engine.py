"""The framework-agnostic monitor engine: schedule, snapshot, analyse, collect, alert, write.

:class:`MonitorEngine` holds everything a training-time spectral monitor does, and nothing of
any training framework. Front doors translate their framework's events into its run-level
calls (:meth:`~MonitorEngine._start_run`, :meth:`~MonitorEngine._sync_point`,
:meth:`~MonitorEngine._collect`, :meth:`~MonitorEngine._finish_run`, ...):
``ww_monitor.WeightWatcherCallback`` (Lightning), ``ww_monitor.Monitor`` (plain loops, Fabric).

Each call gets a *host* (:class:`ww_monitor.core.sinks.Host`): the few things the engine
reads from or tells the training loop, duck-typed so that a Lightning ``Trainer`` is one as it
is: ``global_step``, ``loggers`` (sinks with ``log_metrics(metrics, step)``; TensorBoard ones
also get histograms, text and figures), ``callback_metrics`` (a dict the summary is put
into, or ``None``), ``should_stop`` (set when an alert's action is ``stop``) and optionally
``strategy.model`` (the root module under FSDP/DeepSpeed).

How it works (the engine only orchestrates; the math lives in :mod:`ww_monitor.analysis.analyze`):

1. **Snapshot** (training thread, between optimizer steps, under ``torch.no_grad``): the
   selected matrices are copied into one flat buffer per dtype
   (:mod:`ww_monitor.monitoring.snapshot`), at the start of a run (baseline), when the
   schedule says so, and at the end (unless that step was just taken). Parametrized weights are
   read without side effects (:mod:`ww_monitor.analysis.weight_access`); tied weights are
   copied once.
2. **Analyse** in a background worker (:mod:`ww_monitor.monitoring.worker`): one daemon thread
   by default, using one intra-op thread at lowered priority so it soaks up idle CPU instead
   of slowing training. At most ``max_pending`` snapshots are in flight; when the worker lags,
   new snapshots are skipped with a warning instead of queueing more weight copies.
3. **Log** on the training thread: finished results are polled and written at the
   *snapshot's* step (:mod:`ww_monitor.outputs.tensorboard_writer`), kept in :attr:`history`,
   and the summary goes into ``host.callback_metrics`` (``ww/summary/alpha`` ...).

Distributed, see :mod:`ww_monitor.monitoring.distributed`: every rank copies and analyses its
share of the layers. Results are exchanged with ``all_gather_object`` (through
:class:`~ww_monitor.monitoring.distributed.Collectives`: ``torch.distributed`` by default, the
Lightning strategy's under Lightning) only at *sync points* that every rank reaches together. A snapshot whose analysis is still
running on some rank is gathered at a later sync point; whether a new snapshot is taken or
skipped is decided from the gathered in-flight counts, so all ranks decide alike (no
rank-local skipping, no deadlock). Every rank keeps the merged history; only rank 0 writes.

State: :meth:`~MonitorEngine._engine_state` waits for in-flight analyses (and gathers them
under DDP) so the saved history is complete; a snapshot owed at the checkpoint's step is
remembered and taken on resume, so the history continues without gaps or duplicates.

This module holds the scheduling (run start/end, sync points, take or skip a snapshot, the
worker's life); the rest of the engine is in its neighbours: :mod:`.settings` (the arguments,
validated), :mod:`.run_state` (per-run state, state dict), :mod:`.thinning` (scheduled
snapshots not taken: cost-budget deferrals, lag skips), :mod:`.completion` (finished
analyses -> history, alerts, sinks), :mod:`.selection_report` (what the layer selection left out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..analysis.analyze import DEFAULT_MAX_EVALS, DEFAULT_MAX_N, DEFAULT_MIN_EVALS
from ..functional.fingers import DEFAULT_FINGER_THRESH, DEFAULT_MAX_FINGERS
from ..monitoring.alerts import Alert, AlertConfig
from ..monitoring.analysis_job import CHUNK_BYTES, analyze_snapshot, failed_analysis
from ..monitoring.budget import DEFAULT_MAX_OVERHEAD
from ..monitoring.cost import calibration, estimate_seconds
from ..monitoring.device import resolve_analysis_device, staging_budget
from ..monitoring.distributed import Collectives, TorchCollectives, collect_into
from ..monitoring.snapshot import SnapshotBuilder
from ..monitoring.worker import make_worker
from ..outputs.figure_pipeline import DEFAULT_MIN_RUN_SECONDS, FINAL_FIGURES_TIMEOUT, FigurePipeline
from ..user_warnings import warn_user
from ..validation import CheckedKeywords
from .completion import Completion
from .planning import Planning
from .run_state import RunState
from .selection_report import SelectionReport
from .settings import MonitorSettings
from .sinks import Host
from .thinning import Thinning

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MonitorEngine"]

log = logging.getLogger(__name__)


class MonitorEngine(CheckedKeywords, RunState, Completion, SelectionReport, Thinning, Planning):
    """The monitor itself, for any training loop: see the module docstring. Its arguments are
    those of :class:`ww_monitor.WeightWatcherCallback` (documented there); front doors
    subclass it and translate their framework's events into the run-level methods."""

    #: The front door's name, which begins every warning the engine gives its user.
    warning_prefix = "WeightWatcherCallback"
    #: The warning when results have nowhere to go (no logger, no sink), in the front door's terms.
    no_logger_message = (
        "the trainer has no logger; results are kept only in `callback.history`. Pass e.g. "
        "`logger=TensorBoardLogger(...)` to the Trainer."
    )

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        kinds: list[str] | None = None,
        conv_mode: str = "pooled",
        min_evals: int = DEFAULT_MIN_EVALS,
        max_evals: int | None = DEFAULT_MAX_EVALS,
        max_n: int | None = DEFAULT_MAX_N,
        background: bool = True,
        blocking: bool = False,
        worker_type: str = "thread",
        worker_threads: int | None = 1,
        worker_nice: int = 10,
        worker_idle: bool = False,
        max_pending: int = 1,
        on_lag: str = "skip",
        log_histograms: bool = True,
        log_text: bool = True,
        log_callback_metrics: bool = True,
        figures_every_n_snapshots: int | None = 10,
        figure_layers: str | list[str] | None = None,
        max_figure_layers: int = 3,
        figures_min_run_seconds: float = DEFAULT_MIN_RUN_SECONDS,
        figures_timeout: float = FINAL_FIGURES_TIMEOUT,
        method: str = "auto",
        analysis_device: str = "auto",
        drain_timeout: float = 600.0,
        alerts: AlertConfig | bool = True,
        on_alert: Callable[[Alert], None] | None = None,
        detX: bool = False,
        fix_fingers: str | None = None,
        max_fingers: int = DEFAULT_MAX_FINGERS,
        finger_thresh: float = DEFAULT_FINGER_THRESH,
        fit: str = "PL",
        randomize: bool = False,
        peft: bool | str = "auto",
        watch_frozen: bool = False,
        distance_from_init: bool = False,
        esd_shift: bool = True,
        summary_include_unreliable: bool = False,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        ends_only: bool = False,
    ) -> None:
        super().__init__()
        settings = MonitorSettings.from_arguments(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            include=include,
            exclude=exclude,
            kinds=kinds,
            conv_mode=conv_mode,
            min_evals=min_evals,
            max_evals=max_evals,
            max_n=max_n,
            background=background,
            blocking=blocking,
            worker_type=worker_type,
            worker_threads=worker_threads,
            worker_nice=worker_nice,
            worker_idle=worker_idle,
            max_pending=max_pending,
            on_lag=on_lag,
            log_histograms=log_histograms,
            log_text=log_text,
            log_callback_metrics=log_callback_metrics,
            figures_every_n_snapshots=figures_every_n_snapshots,
            figure_layers=figure_layers,
            max_figure_layers=max_figure_layers,
            figures_min_run_seconds=figures_min_run_seconds,
            figures_timeout=figures_timeout,
            method=method,
            analysis_device=analysis_device,
            drain_timeout=drain_timeout,
            alerts=alerts,
            on_alert=on_alert,
            detX=detX,
            fix_fingers=fix_fingers,
            max_fingers=max_fingers,
            finger_thresh=finger_thresh,
            fit=fit,
            randomize=randomize,
            peft=peft,
            distance_from_init=distance_from_init,
            esd_shift=esd_shift,
            summary_include_unreliable=summary_include_unreliable,
            max_overhead=max_overhead,
            watch_frozen=watch_frozen,
            ends_only=ends_only,
            owner=self.warning_prefix,
        )
        for name, value in settings.public_items():  # config, every_n_epochs, blocking, ...: as attributes
            setattr(self, name, value)
        self._alert_config = settings.alert_config
        self._alerts_on = settings.alerts_on
        self._figures = FigurePipeline(
            self.figures_every_n_snapshots,
            self.figure_layers,
            self.max_figure_layers,
            self.figures_min_run_seconds,
            self.worker_nice,
            self.blocking,
            self.drain_timeout,
            self.figures_timeout,
        )
        self._worker = None
        self._active = False
        self._rank, self._world = 0, 1
        #: How ranks exchange results (``torch.distributed`` unless the front door brings its own).
        self._collectives: Collectives = TorchCollectives()
        self._guard = None  # snapshot with in-flight CUDA copies
        self._new_run()

    # ------------------------------------------------------------------ run level (front doors call these)
    def _start_run(
        self,
        host: Host,
        module: nn.Module | None,
        rank: int,
        world: int,
        epoch: int,
        collectives: Collectives | None = None,
    ) -> None:
        """Start the worker and take the baseline snapshot (or the one owed by a checkpoint).
        ``collectives``: how ranks exchange results (default: ``torch.distributed``)."""
        self._rank, self._world = int(rank), int(world)
        if collectives is not None:
            self._collectives = collectives
        if self._world > 1 and not self._collectives.is_initialized():
            self._world = 1  # no process group (e.g. a custom launcher): analyse everything here
        self._start_worker()
        self._active = True
        self._checked_step = None
        fresh = len(self.history) == 0 and self._last_step is None
        step = host.global_step
        owed_at = self._owed
        owed = owed_at is not None and owed_at[0] == step and not self.history.has_step(step)
        if owed and owed_at is not None:
            epoch = owed_at[1]
        self._owed = None
        self._budget.start()
        self._sync_point(host, module, snapshot=fresh or owed, epoch=epoch, budgeted=False)

    def _finish_run(self, host: Host, module: nn.Module | None, epoch: int) -> None:
        """The final snapshot (unless this step was just taken), drain, gather, figures, flush."""
        if not self._active:
            return
        try:
            take = host.global_step != self._last_step
            if take:  # the final snapshot is never skipped: make room for it first
                self._drain(host, kinds=("analysis",), reason="the final snapshot")
            self._sync_point(host, module, snapshot=take, epoch=epoch, final=True)
            self._drain(host, kinds=("analysis",), reason="train end")
            self._exchange(host)
            self._finalize_incomplete(host)
            self._report_skipped_steps()
            self._report_deferred()
            self._submit_figures()  # the final snapshot gets figures (in a run long enough for them)
            if not self._figures.finish():
                warn_user(
                    f"{self.warning_prefix}: the final figures were not rendered within figures_timeout="
                    f"{self.figures_timeout:g}s; they are dropped (`ww-monitor report` draws them from the "
                    "logs).",
                    RuntimeWarning,
                )
            self._log_figures(host)
            self._writer.flush(list(getattr(host, "loggers", []) or []))
        finally:
            self._active = False
            self._stop_worker(cancel=False)

    def _abort_run(self) -> None:
        """Training failed: stop the worker, no collectives (other ranks may not get here)."""
        self._active = False
        self._stop_worker(cancel=True)

    @staticmethod
    def _ends_at_this_step(host: Host) -> bool:
        """Whether training stops after this step (then a busy due snapshot is left to the final one)."""
        return bool(getattr(host, "ends_at_this_step", False))

    def _start_worker(self) -> None:
        if self._worker is not None and not self._worker.closed:
            return
        mode = self.worker_type if self.background else "inline"
        self._worker = make_worker(mode, num_threads=self.worker_threads, nice=self.worker_nice, idle=self.worker_idle)
        self._figures.start(self._worker)

    def _stop_worker(self, cancel: bool) -> None:
        self._figures.close(cancel=cancel)
        worker, self._worker = self._worker, None
        if worker is None:
            return
        self.stats["peak_inflight_bytes"] = max(self.stats["peak_inflight_bytes"], worker.peak_inflight_bytes)
        if not worker.close(timeout=5.0 if cancel else 30.0, cancel=cancel):
            log.debug("ww_monitor worker did not stop in time; it is a daemon and ends with the process")

    def _is_figure_snapshot(self, index: int, final: bool) -> bool:
        return self._figures.due(index, final)

    def _sync_point(
        self,
        host: Host,
        module: nn.Module | None,
        snapshot: bool,
        epoch: int,
        final: bool = False,
        budgeted: bool = True,
    ) -> None:
        """Gather finished results (DDP), maybe take a snapshot, log what is complete.

        Under DDP every rank calls this at the same hooks with the same arguments. ``budgeted``:
        the cost budget may defer this snapshot (not the baseline, an owed or the final one).
        """
        if self._worker is None:
            return
        if snapshot:
            self._check_schedule()
        budgeted = budgeted and snapshot and not final
        if self._world > 1:
            pending, within = self._gather(host, within_budget=not budgeted or self._budget.allows())
            busy = pending >= self.max_pending
        else:
            self._collect(host)
            busy = self._worker.pending("analysis") >= self.max_pending
            within = not budgeted or self._budget.allows()
        if snapshot and not within and not self._ends_at_this_step(host):
            self._defer(host.global_step)
            return
        if snapshot and busy and self.on_lag == "wait":
            # Every rank is told the same `busy`, so under DDP all ranks wait here alike; the
            # results are gathered at the next sync point.
            self.stats["lag_waits"] += 1
            t0 = time.perf_counter()
            self._drain(host, kinds=("analysis",), reason="a snapshot (on_lag='wait')")
            self._budget.charge(time.perf_counter() - t0)  # training waited: part of the monitor's cost
            busy = False
            if self._world == 1:
                self._collect(host)
        if snapshot:
            if busy and self._ends_at_this_step(host):
                pass  # not skipped: the final snapshot at train end takes this step (after a drain)
            elif busy:
                self._skip(host.global_step)
            else:
                self._take(host, module, epoch, final, budgeted)
                if self.blocking:
                    self._drain(host, kinds=("analysis",), reason="a blocking snapshot")
                    self._exchange(host)

    def _take(self, host: Host, module: nn.Module | None, epoch: int, final: bool, budgeted: bool = True) -> None:
        """Copy the selected weights and hand them to the worker. ``budgeted``: an optional
        snapshot whose cost the budget accounts (the baseline, an owed and the final snapshot are
        fixed costs of a run: they carry its one-time warm-ups, e.g. the first analysis' imports)."""
        assert self._worker is not None  # _sync_point, the only caller, returns without a worker
        assert module is not None  # no snapshot without a model (Monitor.close(model=None) takes none)
        index, step = self._next_index, host.global_step
        if step in self._skipped_steps:  # skipped earlier at this step, taken now (the final snapshot)
            self._skipped_steps.discard(step)
            self.stats["snapshots_skipped"] -= 1
        device = resolve_analysis_device(self.analysis_device, getattr(module, "device", None))
        builder = SnapshotBuilder(
            index,
            step,
            epoch,
            share_memory=self._worker.mode == "process",
            device=device,
            device_budget=staging_budget(device),
        )
        root = getattr(getattr(host, "strategy", None), "model", None)
        self._carry.begin()
        try:  # frozen matrices analysed before are carried forward: not owned, not copied (monitoring.carry)
            owners, selection_skipped = collect_into(
                builder, module, self.config, self._rank, self._world, root, carry=self._carry.carry
            )
        except Exception as err:  # a selection/copy problem must not end the training run
            self._carry.abort()
            # Still a snapshot (index, step) like on every other rank, with an error as its result.
            self._next_index += 1
            self._last_step = step
            self._meta[index] = {"step": step, "epoch": epoch, "order": [], "selection_skipped": [], "figures": False}
            error = f"could not copy the weights: {type(err).__name__}: {err}"
            self._worker.submit("analysis", index, failed_analysis, (index, step, epoch, self._rank, error))
            return
        snap = builder.finish()
        carried = self._carry.commit()
        if self.estimated_snapshot_seconds is None and device.type == "cpu" and snap.specs:
            # The cost model is calibrated for CPU analysis; said once, up front. Frozen matrices
            # are carried forward after this snapshot: the snapshots to come cost the others.
            later = [s for s in snap.specs if self.watch_frozen or not s.frozen]
            shapes = [s.shape for s in later]
            self.estimated_snapshot_seconds = estimate_seconds(
                shapes, [s.dtype for s in later], self.config.method, calibration(self.worker_threads)
            )  # as the worker runs it
            if self._rank == 0:
                log.info(
                    "ww_monitor: one snapshot (%d matrices) will take about %.1f s of analysis here%s",
                    len(shapes),
                    self.estimated_snapshot_seconds,
                    f" ({len(snap.specs) - len(shapes)} frozen ones are analysed once, now)"
                    if len(shapes) < len(snap.specs)
                    else "",
                )
        self._next_index += 1
        self._last_step = step
        self.stats["snapshots_taken"] += 1
        self.stats["copy_seconds"] += snap.copy_seconds
        if budgeted:
            self._budget.charge(snap.copy_seconds)
        self.stats["snapshot_bytes"] = snap.nbytes
        self.stats["matrices_copied"] = len(snap)
        self.stats["layers_analysed_here"] += len(snap)
        self.stats["frozen_layers"] = carried.frozen
        self.stats["layers_carried"] += len(carried.carried)
        self.stats["carried_bytes"] += carried.carried_bytes
        if not self._reported_selection:
            self._report_selection(module, owners, selection_skipped)
        self._meta[index] = {
            "step": step,
            "epoch": epoch,
            "order": list(owners),
            "selection_skipped": selection_skipped,
            "figures": self._is_figure_snapshot(index, final),
            "copy_seconds": snap.copy_seconds,
            "budgeted": budgeted,
            "carried": carried.carried,
        }
        if snap.events:
            self._guard = snap
        if self.distance_from_init and index == 0 and self._baseline is None:
            # The one extra copy this feature keeps: the baseline snapshot's matrices.
            # Frozen matrices are left out: carried forward, they get no later distance anyway.
            self._baseline = {
                m.name: m.weight.clone()
                for m in snap.matrices()
                if m.kind != "lora" and (self.watch_frozen or not m.frozen)
            }
            if self._worker.mode == "process":
                for t in self._baseline.values():
                    t.share_memory_()
            self.stats["baseline_bytes"] = sum(t.numel() * t.element_size() for t in self._baseline.values())
        # Histograms are binned by the worker too: the training thread only writes them.
        args = (snap, self.config, self._rank, CHUNK_BYTES, self.log_histograms, self._baseline, str(device))
        self._worker.submit("analysis", index, analyze_snapshot, args, nbytes=snap.nbytes)

    def _drain(self, host: Host, kinds: tuple[str, ...], reason: str) -> None:
        if self._worker is None:
            return
        if not self._worker.wait(timeout=self.drain_timeout, kinds=kinds):
            warn_user(
                f"{self.warning_prefix}: background analysis did not finish within drain_timeout="
                f"{self.drain_timeout:g}s before {reason}; its results are dropped.",
                RuntimeWarning,
            )
