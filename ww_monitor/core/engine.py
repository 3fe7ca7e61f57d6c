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
share of the layers. Results are exchanged with ``all_gather_object`` (``torch.distributed``)
only at *sync points* that every rank reaches together. A snapshot whose analysis is still
running on some rank is gathered at a later sync point; whether a new snapshot is taken or
skipped is decided from the gathered in-flight counts, so all ranks decide alike (no
rank-local skipping, no deadlock). Every rank keeps the merged history; only rank 0 writes.

State: :meth:`~MonitorEngine._engine_state` waits for in-flight analyses (and gathers them
under DDP) so the saved history is complete; a snapshot owed at the checkpoint's step is
remembered and taken on resume, so the history continues without gaps or duplicates.
"""

from __future__ import annotations


import functools
import logging
import time
from typing import Any, Callable

import torch

from ..analysis.adapters import ZERO_UPDATE_REASON
from ..monitoring.alerts import Alert, AlertConfig, AlertTracker, dispatch_alerts
from ..analysis.analyze import DEFAULT_MAX_EVALS, DEFAULT_MAX_N, DEFAULT_MIN_EVALS, AnalysisConfig
from ..monitoring.cost import estimate_seconds
from ..monitoring.device import resolve_analysis_device, staging_budget, validate_analysis_device
from ..monitoring.distributed import all_gather_object, collect_into, is_initialized
from ..errors import WWMonitorError
from ..outputs.figure_pipeline import DEFAULT_MIN_RUN_SECONDS, FINAL_FIGURES_TIMEOUT, FigurePipeline
from ..functional.distances import esd_shift as esd_shift_distance
from ..functional.fingers import DEFAULT_FINGER_THRESH, DEFAULT_MAX_FINGERS
from ..monitoring.history import History, SnapshotRecord
from ..outputs.layer_groups import group_scalars
from ..analysis.layers import CONV_MODES, KINDS, available_layer_names, is_size_limit
from ..analysis.results import Report
from ..monitoring.snapshot import SnapshotBuilder
from ..user_warnings import warn_user
from ..outputs.tensorboard_writer import LoggerWriter, layer_scalars, summary_scalars
from ..validation import check_bool as _check_bool
from ..validation import check_int as _check_int
from ..validation import check_seconds as _check_seconds
from ..monitoring.worker import CHUNK_BYTES, AnalysisOutput, analyze_snapshot, failed_analysis, make_worker

__all__ = ["MonitorEngine"]

log = logging.getLogger(__name__)

_WORKER_TYPES = ("thread", "process")
_STATE_VERSION = 1
#: Layer names / skipped steps listed in one warning at most (the rest are counted).
_MAX_LISTED = 20


def _rank_zero_warn(message: str, category=UserWarning) -> None:
    """Warn once per process group (rank 0), attributed to the user's line, not to ours."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        warn_user(message, category)


def _on_training_thread(hook):
    """Adds the hook's wall time to ``stats["train_thread_seconds"]``: what the monitor costs the
    training thread directly (copies, logging, waits), as opposed to CPU the worker shares."""

    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.stats["train_thread_seconds"] += time.perf_counter() - t0

    return timed


def _as_tuple(value, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise WWMonitorError(f"`{name}` must be a string, a list of strings or None, got {value!r}.") from None
    if not all(isinstance(v, str) for v in items):
        raise WWMonitorError(f"`{name}` must be a string, a list of strings or None, got {value!r}.")
    return items


class MonitorEngine:
    """The monitor itself, for any training loop: see the module docstring. Its arguments are
    those of :class:`ww_monitor.WeightWatcherCallback` (documented there); front doors
    subclass it and translate their framework's events into the run-level methods."""

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
        peft: bool | str = False,
        distance_from_init: bool = False,
        esd_shift: bool = True,
        summary_include_unreliable: bool = False,
    ) -> None:
        super().__init__()
        _check_int("every_n_epochs", every_n_epochs, 0, allow_none=True)
        _check_int("every_n_train_steps", every_n_train_steps, 1, allow_none=True)
        for name, flag in (("background", background), ("blocking", blocking), ("worker_idle", worker_idle),
                           ("log_histograms", log_histograms),
                           ("log_text", log_text), ("log_callback_metrics", log_callback_metrics),
                           ("summary_include_unreliable", summary_include_unreliable)):
            _check_bool(name, flag)
        if worker_type not in _WORKER_TYPES:
            raise WWMonitorError(f"`worker_type` must be one of {_WORKER_TYPES}, got {worker_type!r}.")
        _check_int("worker_threads", worker_threads, 1, allow_none=True)
        _check_int("worker_nice", worker_nice, 0, allow_none=False)
        _check_int("max_pending", max_pending, 1, allow_none=False)
        if on_lag not in ("skip", "wait"):
            raise WWMonitorError(f"`on_lag` must be 'skip' or 'wait', got {on_lag!r}.")
        _check_int("figures_every_n_snapshots", figures_every_n_snapshots, 0, allow_none=True)
        _check_int("max_figure_layers", max_figure_layers, 0, allow_none=False)
        _check_seconds("figures_min_run_seconds", figures_min_run_seconds, allow_zero=True)
        _check_seconds("figures_timeout", figures_timeout, allow_zero=False)
        _check_seconds("drain_timeout", drain_timeout, allow_zero=False)
        if not isinstance(alerts, (bool, AlertConfig)):
            raise WWMonitorError(f"`alerts` must be True, False or an AlertConfig, got {alerts!r}.")
        if on_alert is not None and not callable(on_alert):
            raise WWMonitorError(f"`on_alert` must be callable or None, got {on_alert!r}.")
        if conv_mode not in CONV_MODES:
            raise WWMonitorError(f"`conv_mode` must be one of {CONV_MODES}, got {conv_mode!r}.")
        self.analysis_device = validate_analysis_device(analysis_device)
        kinds_t = _as_tuple(kinds, "kinds")
        if kinds_t is not None and any(k not in KINDS for k in kinds_t):
            raise WWMonitorError(f"`kinds` must be a subset of {list(KINDS)}, got {list(kinds_t)!r}.")
        include_t = _as_tuple(include, "include")
        exclude_t = _as_tuple(exclude, "exclude")
        figure_t = _as_tuple(figure_layers, "figure_layers")
        # AnalysisConfig validates the regexes, size limits and method with precise messages.
        self.config = AnalysisConfig(
            include=include_t or (), exclude=exclude_t or (), kinds=kinds_t, conv_mode=conv_mode,
            min_evals=min_evals, max_evals=max_evals, max_n=max_n, method=method, keep_eigenvalues=True,
            detX=detX, fix_fingers=fix_fingers or None, max_fingers=max_fingers, finger_thresh=finger_thresh,
            fit=fit, randomize=randomize, peft=peft,
        )
        _check_bool("distance_from_init", distance_from_init)
        _check_bool("esd_shift", esd_shift)
        self.distance_from_init = distance_from_init
        self.esd_shift = esd_shift
        if figure_t:
            AnalysisConfig(include=figure_t)  # same regex validation

        self.every_n_epochs = every_n_epochs or None
        self.every_n_train_steps = every_n_train_steps
        self.background = background
        self.blocking = blocking or not background
        self.worker_type = worker_type
        self.worker_threads = worker_threads
        self.worker_nice = worker_nice
        self.worker_idle = worker_idle
        self.max_pending = max_pending
        self.on_lag = on_lag
        self.log_histograms = log_histograms
        self.log_text = log_text
        self.log_callback_metrics = log_callback_metrics
        self.figures_every_n_snapshots = figures_every_n_snapshots or None
        self.figure_layers = figure_t
        self.max_figure_layers = max_figure_layers
        self.figures_min_run_seconds = float(figures_min_run_seconds)
        self.drain_timeout = float(drain_timeout)
        self.summary_include_unreliable = summary_include_unreliable
        self.figures_timeout = float(figures_timeout)
        self._figures = FigurePipeline(self.figures_every_n_snapshots, figure_t, max_figure_layers,
                                       self.figures_min_run_seconds, worker_nice, self.blocking, self.drain_timeout,
                                       self.figures_timeout)

        self._alert_config = alerts if isinstance(alerts, AlertConfig) else AlertConfig()
        self._alerts_on = alerts is not False
        self.on_alert = on_alert
        self._worker = None
        self._active = False
        self._rank, self._world = 0, 1
        self._guard = None  # snapshot with in-flight CUDA copies
        self._new_run()

    def _new_run(self) -> None:
        """The per-run state, fresh: history, alert state, counters (at construction, and when
        the callback is reused for a new run)."""
        #: Every analysed snapshot (:class:`ww_monitor.monitoring.history.History`).
        self.history = History()
        #: Alert state (``None`` when alerts are off); ``alerts_fired`` lists every alert raised.
        self.alert_tracker = AlertTracker(self._alert_config) if self._alerts_on else None
        self.alerts_fired: list[Alert] = []
        self._writer = LoggerWriter()  # its once-per-logger warnings and layouts belong to a run
        self._next_index = 0
        self._last_step: int | None = None  # step of the last snapshot taken
        self._checked_step: int | None = None  # step-schedule check already done at this step
        self._owed: tuple[int, int] | None = None  # restored: (step, epoch) of a snapshot due at the checkpoint
        self._meta: dict[int, dict] = {}  # snapshot index -> step, epoch, owners, ... until complete
        self._partials: dict[int, dict[int, AnalysisOutput]] = {}  # DDP: index -> {rank: output}
        self._warned_layers: set[str] = set()
        self._reported_selection = False
        #: ``(step, results)`` of the latest completed snapshot (each ``LayerResult`` with its
        #: eigenvalues), e.g. for :class:`ww_monitor.SpectralBalancer`; None before the first.
        self.latest_results: tuple[int, list] | None = None
        self._baseline: dict[str, torch.Tensor] | None = None  # weights at snapshot 0 (distance_from_init)
        self._prev_esd: dict[str, Any] = {}  # layer -> eigenvalues of its previous snapshot (esd_shift)
        #: Estimated analysis seconds of one snapshot on this machine (CPU analysis; :mod:`.cost`).
        self.estimated_snapshot_seconds: float | None = None
        self._schedule = {"last_due": None, "warned": False}
        self._skipped_steps: set[int] = set()  # due steps not taken because the worker lagged
        self.stats: dict[str, Any] = {
            "snapshots_taken": 0, "snapshots_skipped": 0, "snapshots_failed": 0, "copy_seconds": 0.0,
            "analysis_seconds": 0.0, "snapshot_bytes": 0, "peak_inflight_bytes": 0, "layers_analysed_here": 0,
            "lag_waits": 0, "train_thread_seconds": 0.0, "baseline_bytes": 0,
        }

    # ------------------------------------------------------------------ run level (front doors call these)
    def _check_reuse(self, step: int) -> None:
        """A monitor reused for a new run that starts before its history ends: start afresh."""
        last = self.history.steps[-1] if len(self.history) else self._last_step
        if last is not None and step < last:
            # The same callback object passed to a new Trainer: its snapshots would collide with
            # the earlier run's steps and be dropped as duplicates.
            _rank_zero_warn(
                f"WeightWatcherCallback: this callback holds {len(self.history)} snapshot(s) up to step {last} "
                f"from an earlier run, and this run starts at step {step}. Starting a new history "
                "(the earlier one is discarded); use one callback per run, or keep `callback.history` before "
                "fitting again.", RuntimeWarning)
            self._new_run()

    def _start_run(self, host, module, rank: int, world: int, epoch: int) -> None:
        """Start the worker and take the baseline snapshot (or the one owed by a checkpoint)."""
        self._rank, self._world = int(rank), int(world)
        if self._world > 1 and not is_initialized():
            self._world = 1  # no process group (e.g. a custom launcher): analyse everything here
        self._start_worker()
        self._active = True
        self._checked_step = None
        fresh = len(self.history) == 0 and self._last_step is None
        step = host.global_step
        owed = self._owed is not None and self._owed[0] == step and not self.history.has_step(step)
        if owed:
            epoch = self._owed[1]
        self._owed = None
        self._sync_point(host, module, snapshot=fresh or owed, epoch=epoch)

    def _finish_run(self, host, module, epoch: int) -> None:
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
            self._submit_figures()  # the final snapshot gets figures (in a run long enough for them)
            if not self._figures.finish():
                warn_user("WeightWatcherCallback: the final figures were not rendered within figures_timeout="
                          f"{self.figures_timeout:g}s; they are dropped (`ww-monitor report` draws them from the "
                          "logs).", RuntimeWarning)
            self._log_figures(host)
            self._writer.flush(list(getattr(host, "loggers", []) or []))
        finally:
            self._active = False
            self._stop_worker(cancel=False)

    def _abort_run(self) -> None:
        """Training failed: stop the worker, no collectives (other ranks may not get here)."""
        self._active = False
        self._stop_worker(cancel=True)

    def _engine_state(self, host, owed) -> dict[str, Any]:
        """The resumable state; completes the history first (a sync point under DDP)."""
        if self._active and host is not None:
            self._drain(host, kinds=("analysis",), reason="checkpoint")
            self._exchange(host)
        return {
            "version": _STATE_VERSION,
            "history": self.history.state_dict(),
            "next_index": self._next_index,
            "last_step": self._last_step,
            "owed": list(owed or []),
            "stats": {k: v for k, v in self.stats.items() if isinstance(v, (int, float))},
            "alerts": self.alert_tracker.state_dict() if self.alert_tracker is not None else {},
            # The previous ESDs, so esd_shift continues across a resume (tensors: weights_only loads).
            "prev_esd": {k: torch.as_tensor(v, dtype=torch.float64) for k, v in self._prev_esd.items()},
        }

    @staticmethod
    def _ends_at_this_step(host) -> bool:
        """Whether training stops after this step (then a busy due snapshot is left to the final one)."""
        return bool(getattr(host, "ends_at_this_step", False))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = History()
        self.history.load_state_dict(state_dict.get("history", {}))
        self._next_index = int(state_dict.get("next_index", len(self.history)))
        self._last_step = state_dict.get("last_step")
        owed = state_dict.get("owed") or None
        self._owed = (int(owed[0]), int(owed[1])) if owed else None
        if self.alert_tracker is not None and state_dict.get("alerts"):
            self.alert_tracker.load_state_dict(state_dict["alerts"])
        self._prev_esd = {k: torch.as_tensor(v).double().numpy() for k, v in state_dict.get("prev_esd", {}).items()}
        for k in ("snapshots_taken", "snapshots_skipped", "snapshots_failed"):  # run totals, not per rank
            if k in state_dict.get("stats", {}):
                self.stats[k] = int(state_dict["stats"][k])

    def _check_selection_only(self, module) -> None:
        """``fast_dev_run``: a smoke test of the training code, so no snapshots are taken (the
        analysis would cost more than the run); the layer selection is still checked and its
        problems reported, which is what a smoke test is for."""
        log.info("WeightWatcherCallback: fast_dev_run: no snapshots are taken; checking the layer selection only")
        if self._reported_selection:
            return
        try:
            owners, skipped = collect_into(None, module, self.config)
        except Exception as err:  # sharded parameters: their shapes are unknown until gathered
            log.debug("fast_dev_run selection check not possible: %s", err)
            return
        self._report_selection(module, owners, skipped)

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

    def _sync_point(self, host, module, snapshot: bool, epoch: int, final: bool = False) -> None:
        """Gather finished results (DDP), maybe take a snapshot, log what is complete.

        Under DDP every rank calls this at the same hooks with the same arguments.
        """
        if self._worker is None:
            return
        if snapshot:
            self._check_schedule()
        if self._world > 1:
            busy = self._gather(host) >= self.max_pending
        else:
            self._collect(host)
            busy = self._worker.pending("analysis") >= self.max_pending
        if snapshot and busy and self.on_lag == "wait":
            # Every rank is told the same `busy`, so under DDP all ranks wait here alike; the
            # results are gathered at the next sync point.
            self.stats["lag_waits"] += 1
            self._drain(host, kinds=("analysis",), reason="a snapshot (on_lag='wait')")
            busy = False
            if self._world == 1:
                self._collect(host)
        if snapshot:
            if busy and self._ends_at_this_step(host):
                pass  # not skipped: the final snapshot at train end takes this step (after a drain)
            elif busy:
                self._skip(host.global_step)
            else:
                self._take(host, module, epoch, final)
                if self.blocking:
                    self._drain(host, kinds=("analysis",), reason="a blocking snapshot")
                    self._exchange(host)

    def _skip(self, step: int) -> None:
        """Count a due snapshot not taken because the worker lags: once per step (the epoch and
        step schedules can both ask at one step), warned at the first skip of the run."""
        if step in self._skipped_steps:
            return
        self._skipped_steps.add(step)
        self.stats["snapshots_skipped"] += 1
        if len(self._skipped_steps) == 1:
            _rank_zero_warn(
                f"WeightWatcherCallback: skipped the snapshot at step {step} because "
                f"{self.max_pending} earlier snapshot(s) are still being analysed (max_pending="
                f"{self.max_pending}). Take snapshots less often, raise max_pending, on_lag='wait', or narrow "
                "the layer selection. Further skips are counted in stats['snapshots_skipped'] and listed at "
                "train end.", RuntimeWarning)

    def _report_skipped_steps(self) -> None:
        missing = sorted(s for s in self._skipped_steps if not self.history.has_step(s))
        if len(missing) > 1:
            shown = ", ".join(map(str, missing[:_MAX_LISTED])) + (" ..." if len(missing) > _MAX_LISTED else "")
            _rank_zero_warn(f"WeightWatcherCallback: {len(missing)} scheduled snapshots were skipped because the "
                            f"analysis lagged (steps {shown}); the history holds {len(self.history)}.",
                            RuntimeWarning)

    def _selection_message(self, module, selection_skipped) -> str:
        """Why nothing is analysed: every matching layer was skipped (reasons), or the selection
        matches no layer (the names there are)."""
        if selection_skipped:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in selection_skipped[:_MAX_LISTED])
            more = f" (and {len(selection_skipped) - _MAX_LISTED} more)" if len(selection_skipped) > _MAX_LISTED else ""
            return (f"WeightWatcherCallback: no layer can be analysed: every selected layer was skipped: "
                    f"{reasons}{more}. Nothing will be analysed; adjust min_evals/max_evals/max_n or the selection.")
        names = available_layer_names(module, self.config.conv_mode)
        shown = ", ".join(names[:_MAX_LISTED]) + (f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")
        return (f"WeightWatcherCallback: no weight matrix matches the selection (include={list(self.config.include)}, "
                f"exclude={list(self.config.exclude)}, kinds={self.config.kinds}); nothing will be analysed. "
                f"Layers in the model: {shown or 'none with a weight matrix'}.")

    def _report_selection(self, module, owners, selection_skipped) -> None:
        """Once per run: what the selection left out, like ``analyze()`` reports it."""
        self._reported_selection = True
        if not owners:
            _rank_zero_warn(self._selection_message(module, selection_skipped), RuntimeWarning)
            return
        unexpected = [s for s in selection_skipped if not is_size_limit(s.reason)]
        for s in selection_skipped:
            log.info("ww_monitor: layer %s (%s, shape %s) not analysed: %s", s.name, s.kind, s.shape, s.reason)
        if unexpected:  # size limits are configuration; anything else (dtype, ...) is news
            _rank_zero_warn("WeightWatcherCallback: " + "; ".join(
                f"layer {s.name} not analysed: {s.reason}" for s in unexpected[:_MAX_LISTED]), RuntimeWarning)

    def _take(self, host, module, epoch: int, final: bool) -> None:
        index, step = self._next_index, host.global_step
        if step in self._skipped_steps:  # skipped earlier at this step, taken now (the final snapshot)
            self._skipped_steps.discard(step)
            self.stats["snapshots_skipped"] -= 1
        device = resolve_analysis_device(self.analysis_device, getattr(module, "device", None))
        builder = SnapshotBuilder(index, step, epoch, share_memory=self._worker.mode == "process", device=device,
                                  device_budget=staging_budget(device))
        root = getattr(getattr(host, "strategy", None), "model", None)
        try:
            owners, selection_skipped = collect_into(builder, module, self.config, self._rank, self._world, root)
        except Exception as err:  # a selection/copy problem must not end the training run
            # Still a snapshot (index, step) like on every other rank, with an error as its result.
            self._next_index += 1
            self._last_step = step
            self._meta[index] = {"step": step, "epoch": epoch, "order": [], "selection_skipped": [],
                                 "figures": False}
            error = f"could not copy the weights: {type(err).__name__}: {err}"
            self._worker.submit("analysis", index, failed_analysis, (index, step, epoch, self._rank, error))
            return
        snap = builder.finish()
        if self.estimated_snapshot_seconds is None and device.type == "cpu" and snap.specs:
            # The cost model is calibrated for CPU analysis; said once, up front.
            self.estimated_snapshot_seconds = estimate_seconds(s.shape for s in snap.specs)
            if self._rank == 0:
                log.info("ww_monitor: one snapshot (%d matrices) will take about %.1f s of analysis here",
                         len(snap.specs), self.estimated_snapshot_seconds)
        self._next_index += 1
        self._last_step = step
        self.stats["snapshots_taken"] += 1
        self.stats["copy_seconds"] += snap.copy_seconds
        self.stats["snapshot_bytes"] = snap.nbytes
        self.stats["layers_analysed_here"] += len(snap)
        if not self._reported_selection:
            self._report_selection(module, owners, selection_skipped)
        self._meta[index] = {
            "step": step, "epoch": epoch, "order": list(owners), "selection_skipped": selection_skipped,
            "figures": self._is_figure_snapshot(index, final),
        }
        if snap.events:
            self._guard = snap
        if self.distance_from_init and index == 0 and self._baseline is None:
            # The one extra copy this feature keeps: the baseline snapshot's matrices.
            self._baseline = {m.name: m.weight.clone() for m in snap.matrices() if m.kind != "lora"}
            if self._worker.mode == "process":
                for t in self._baseline.values():
                    t.share_memory_()
            self.stats["baseline_bytes"] = sum(t.numel() * t.element_size() for t in self._baseline.values())
        # Histograms are binned by the worker too: the training thread only writes them.
        args = (snap, self.config, self._rank, CHUNK_BYTES, self.log_histograms, self._baseline, str(device))
        self._worker.submit("analysis", index, analyze_snapshot, args, nbytes=snap.nbytes)

    def _check_schedule(self) -> None:
        """Warn once when snapshots fall due faster than one takes to analyse (:mod:`.cost`)."""
        now = time.monotonic()
        last, self._schedule["last_due"] = self._schedule["last_due"], now
        estimate = self.estimated_snapshot_seconds
        if estimate is None or last is None or self._schedule["warned"] or estimate <= now - last:
            return
        self._schedule["warned"] = True
        _rank_zero_warn(
            f"WeightWatcherCallback: one snapshot takes about {estimate:.2f} s to analyse here but snapshots are "
            f"due {now - last:.2f} s apart, so the analysis cannot keep up (snapshots will be skipped or training "
            f"will wait, see on_lag). Take snapshots less often or narrow the layer selection.", RuntimeWarning)

    def _drain(self, host, kinds, reason: str) -> None:
        if self._worker is None:
            return
        if not self._worker.wait(timeout=self.drain_timeout, kinds=kinds):
            warn_user(
                f"WeightWatcherCallback: background analysis did not finish within drain_timeout="
                f"{self.drain_timeout:g}s before {reason}; its results are dropped.", RuntimeWarning)

    def _outputs_from(self, finished) -> list[AnalysisOutput]:
        outputs = []
        for job in finished:
            if job.error is not None or not isinstance(job.value, AnalysisOutput):
                meta = self._meta.get(job.key, {})
                outputs.append(AnalysisOutput(index=job.key, step=meta.get("step", -1), epoch=meta.get("epoch", -1),
                                              rank=self._rank, error=job.error or "no result"))
            else:
                outputs.append(job.value)
            self.stats["analysis_seconds"] += job.seconds
        return outputs

    def _exchange(self, host) -> None:
        """Log what is finished: gather across ranks under DDP (a sync point), else poll."""
        if self._world > 1:
            self._gather(host)
        else:
            self._collect(host)

    def _collect(self, host) -> None:
        """Single process: log every finished analysis and figure."""
        if self._worker is None:
            return
        for out in self._outputs_from(self._worker.poll(("analysis",))):
            self._complete(host, out.index, {self._rank: out})
        self._log_figures(host)

    def _gather(self, host) -> int:
        """DDP sync point: exchange finished outputs; returns the largest in-flight count."""
        local = self._outputs_from(self._worker.poll(("analysis",))) if self._worker is not None else []
        pending = self._worker.pending("analysis") if self._worker is not None else 0
        try:
            everyone = all_gather_object({"rank": self._rank, "outputs": local, "pending": pending}, self._world)
        except Exception as err:
            warn_user(f"WeightWatcherCallback: gathering results across ranks failed ({type(err).__name__}: "
                      f"{err}); distributed analysis results are incomplete.", RuntimeWarning)
            everyone = [{"rank": self._rank, "outputs": local, "pending": pending}]
        for payload in everyone:
            for out in payload["outputs"]:
                self._partials.setdefault(out.index, {})[payload["rank"]] = out
        for index in sorted(self._partials):
            if len(self._partials[index]) >= self._world:
                self._complete(host, index, self._partials.pop(index))
        self._log_figures(host)
        return max(p["pending"] for p in everyone)

    def _finalize_incomplete(self, host) -> None:
        for index in sorted(self._partials):
            parts = self._partials.pop(index)
            missing = sorted(set(range(self._world)) - set(parts))
            _rank_zero_warn(f"WeightWatcherCallback: snapshot {index} is incomplete (no results from ranks "
                            f"{missing}); logging the layers that were analysed.", RuntimeWarning)
            self._complete(host, index, parts)

    def _complete(self, host, index: int, parts: dict[int, AnalysisOutput]) -> None:
        meta = self._meta.pop(index, None)
        any_out = next(iter(parts.values()))
        step = meta["step"] if meta else any_out.step
        epoch = meta["epoch"] if meta else any_out.epoch
        order = {name: i for i, name in enumerate(meta["order"])} if meta else {}
        results, ranks, skipped, errors, seconds, histograms = [], [], [], [], 0.0, {}
        for rank in sorted(parts):
            out = parts[rank]
            seconds = max(seconds, out.seconds)
            histograms.update(out.histograms)
            if out.error:
                errors.append(f"rank {rank}: {out.error}")
            skipped.extend(out.skipped)
            for r in out.results:
                results.append(r)
                ranks.append(rank)
        pairs = sorted(zip(results, ranks), key=lambda p: order.get(p[0].name, len(order)))
        results = [p[0] for p in pairs]
        ranks = [p[1] for p in pairs]
        if errors:
            self.stats["snapshots_failed"] += 1
            warn_user(f"WeightWatcherCallback: analysis of the snapshot at step {step} failed: "
                      + "; ".join(errors), RuntimeWarning)
        for s in skipped:
            if s.reason == ZERO_UPDATE_REASON:  # expected at the start of LoRA training, not a problem
                log.info("ww_monitor: %s not analysed at step %d: %s", s.name, step, s.reason)
            elif s.name not in self._warned_layers:
                self._warned_layers.add(s.name)
                _rank_zero_warn(f"WeightWatcherCallback: layer {s.name} not analysed at step {step}: {s.reason}",
                                RuntimeWarning)
        if self.esd_shift:
            self._esd_shifts(results)
        report = Report(layers=results, skipped=list(skipped) + list(meta["selection_skipped"] if meta else []))
        summary = report.summary(include_unreliable=self.summary_include_unreliable)
        record = SnapshotRecord.from_results(index, step, epoch, results, ranks, skipped=report.skipped,
                                             seconds=seconds, errors=errors, summary=summary)
        if not self.history.add(record):
            log.debug("snapshot at step %d already in the history; not logged again", step)
            return
        if not results and errors:
            return
        self.latest_results = (step, results)
        metrics = layer_scalars(results)
        metrics.update(group_scalars(results))
        metrics.update(summary_scalars(summary))
        if self.log_callback_metrics and results:
            try:
                cm = host.callback_metrics
                for k, v in metrics.items():
                    cm[k] = torch.tensor(v, dtype=torch.float32)
                # Lets AlphaDriftEarlyStopping (and users) tell a new snapshot from an old value.
                cm["ww/snapshot_step"] = torch.tensor(step)
            except Exception as err:  # pragma: no cover - depends on the host's internals
                log.debug("could not update callback_metrics: %s", err)
        loggers = list(getattr(host, "loggers", []) or [])
        self._handle_alerts(host, loggers, results, skipped, step, epoch)
        if self._rank != 0:
            return
        self._writer.log_scalars(loggers, metrics, step)
        self._writer.log_tensorboard(loggers, step, results, histograms=self.log_histograms, text=self.log_text,
                                     precomputed=histograms)
        self._figures.offer(step, results, loggers, submit=bool(meta and meta["figures"]),
                            grids=self.history.figure_grids)

    def _esd_shifts(self, results) -> None:
        """``esd_shift`` of each layer against its previous snapshot (training thread; ESDs are small)."""
        for r in results:
            if r.eigenvalues is None:
                continue
            prev = self._prev_esd.get(r.name)
            if prev is not None:
                r.esd_shift = esd_shift_distance(prev, r.eigenvalues)
            self._prev_esd[r.name] = r.eigenvalues

    def _handle_alerts(self, host, loggers, results, skipped, step: int, epoch: int) -> None:
        """Evaluate the alert rules on a completed snapshot and carry out their actions.

        Runs on every rank with the same gathered results, so ``stop``/``raise`` act alike
        everywhere (no rank-local decision, no deadlock); output comes from rank 0 only.
        """
        if self.alert_tracker is None:
            return
        alerts = self.alert_tracker.update(results, skipped, step, epoch)
        active = len(self.alert_tracker.active)
        if self._rank == 0:  # at every snapshot, so the curve has its 0 baseline
            self._writer.log_scalars(loggers, {"ww/alerts/active": float(active)}, step)
        if not alerts:
            return
        self.alerts_fired.extend(a for a in alerts if not a.resolved)
        writers = [exp for _, exp in self._writer._tb_writers(loggers)] if self._rank == 0 else []
        if dispatch_alerts(alerts, self.alert_tracker.config, tensorboard_writers=writers,
                           on_alert=self.on_alert, rank=self._rank, active=active):
            first = next(a for a in alerts if not a.resolved and "stop" in self.alert_tracker.config.actions_for(a.rule))
            log.info("WeightWatcherCallback: stopping training on alert %s: %s", first.rule, first.message)
            host.should_stop = True

    def _submit_figures(self) -> None:
        """Render the figures of the latest complete snapshot in the background (rank 0)."""
        if self._rank == 0:
            self._figures.submit(self.history.figure_grids)

    def _log_figures(self, host) -> None:
        if self._rank != 0:
            return
        loggers = list(getattr(host, "loggers", []) or [])
        self._figures.warm_up(loggers)
        for step, images in self._figures.collect(lambda m: _rank_zero_warn(m, RuntimeWarning)):
            self._writer.log_images(loggers, step, images)
