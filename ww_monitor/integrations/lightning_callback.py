"""``WeightWatcherCallback``: spectral analysis of the weights while a Lightning model trains.

Two flavours share all logic (:class:`WeightWatcherMixin`), differing only in the Lightning
package whose ``Callback`` they subclass (Lightning does not support mixing ``lightning`` and
``pytorch_lightning`` objects: ``isinstance`` checks against the other package's classes fail):

* ``ww_monitor.WeightWatcherCallback`` / ``ww_monitor.integrations.lightning_callback.WeightWatcherCallback`` for
  ``import pytorch_lightning as pl``;
* ``ww_monitor.lightning.WeightWatcherCallback`` for ``import lightning.pytorch as pl``
  (or ``import lightning as L``).

Importing this module does not import any Lightning package; the ``pytorch_lightning``
class is built on first access, so ``ww_monitor.lightning`` never pulls in
``pytorch_lightning`` and vice versa.

How it works (the callback only orchestrates; the math lives in :mod:`ww_monitor.analysis.analyze`):

1. **Snapshot** (training thread, between optimizer steps, under ``torch.no_grad``): the
   selected matrices are copied into one flat buffer per dtype (:mod:`.snapshot`), at train
   start (baseline), every ``every_n_epochs`` epochs / ``every_n_train_steps`` steps and at
   train end (unless that step was just taken). Never during sanity checking, validation,
   test, predict or ``fast_dev_run`` (which only checks the layer selection). Parametrized
   weights are read without side effects (:mod:`.weight_access`); tied weights are copied once.
2. **Analyse** in a background worker (:mod:`.worker`): one daemon thread by default, using one
   intra-op thread at lowered priority so it soaks up idle CPU instead of slowing training.
   At most ``max_pending`` snapshots are in flight; when the worker lags, new snapshots are
   skipped with a warning instead of queueing more weight copies.
3. **Log** on the training thread: finished results are polled in training hooks and written
   at the *snapshot's* step (:mod:`.tensorboard_writer`), kept in :attr:`history`, and the
   summary goes into ``trainer.callback_metrics`` (``ww/summary/alpha`` ...), so
   ``EarlyStopping``/``ModelCheckpoint`` can monitor it (one interval late in background mode).

Distributed (DDP, FSDP, DeepSpeed), see :mod:`.distributed`: every rank copies and analyses
its share of the layers. Results are exchanged with ``all_gather_object`` only at *sync
points* that every rank reaches together: the snapshot hooks, every training epoch end,
checkpoint saving (``state_dict``) and train end. A snapshot whose analysis is still running on
some rank is simply gathered at a later sync point; whether a new snapshot is taken or skipped
is decided from the gathered in-flight counts, so all ranks decide alike (no rank-local
skipping, no deadlock). Every rank keeps the merged history and callback metrics; only rank 0
writes to the loggers. Background analysis therefore overlaps training under DDP too, and
results appear at the next sync point; ``blocking=True`` gathers at the snapshot itself.

Checkpoints: ``state_dict`` waits for in-flight analyses (and gathers them under DDP) so the
saved history is complete; a snapshot that was due at the very step of the checkpoint but not
taken yet is remembered and taken on resume. Resuming therefore continues the history
without gaps or duplicates.
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
from ..analysis.layers import CONV_MODES, KINDS, available_layer_names, is_size_limit
from ..analysis.results import Report
from ..monitoring.snapshot import SnapshotBuilder
from ..user_warnings import warn_user
from ..outputs.tensorboard_writer import LoggerWriter, layer_scalars, summary_scalars
from ..validation import check_bool as _check_bool
from ..validation import check_int as _check_int
from ..validation import check_seconds as _check_seconds
from ..monitoring.worker import CHUNK_BYTES, AnalysisOutput, analyze_snapshot, failed_analysis, make_worker

__all__ = ["WeightWatcherMixin", "WeightWatcherCallback"]

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


def _ends_at_this_step(trainer) -> bool:
    """Training stops after this step (max_steps reached, or the last batch of the last epoch),
    so the final snapshot at train end will be taken at it."""
    max_steps = getattr(trainer, "max_steps", -1)
    if isinstance(max_steps, int) and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    try:
        last_batch = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
    except AttributeError:
        return False
    return isinstance(max_epochs, int) and max_epochs >= 0 and last_batch and trainer.current_epoch + 1 >= max_epochs


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


class WeightWatcherMixin:
    """Watch the eigenvalue spectra (ESDs) of a model's weight matrices while it trains.

    At train start, every ``every_n_epochs`` epochs and/or ``every_n_train_steps`` optimizer
    steps, and at train end, the selected weight matrices are copied and analysed
    (power-law alpha, norms, stable rank, rank loss, spikes, phase) in a background worker.
    Results are logged at the step of the snapshot: ``ww/<metric>/<layer>`` and
    ``ww/summary/<metric>`` scalars to every logger, plus ESD histograms ``ww/esd/<layer>``,
    figures ``ww/plots/...``, a ``ww/layers`` table and a custom-scalars layout to TensorBoard.
    Every snapshot is kept in :attr:`history` (``callback.history.to_pandas()``) and saved in
    checkpoints.

    Example::

        import pytorch_lightning as pl          # or: import lightning.pytorch as pl
        from ww_monitor import WeightWatcherCallback
        # with lightning.pytorch: from ww_monitor.lightning import WeightWatcherCallback

        ww = WeightWatcherCallback(every_n_epochs=1, exclude=r"^head")
        trainer = pl.Trainer(max_epochs=10, callbacks=[ww],
                             logger=pl.loggers.TensorBoardLogger("tb_logs"))
        trainer.fit(model, datamodule=dm)
        df = ww.history.to_pandas()             # one row per (snapshot, layer)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: ww_monitor.WeightWatcherCallback
              init_args: {every_n_epochs: 2, exclude: "embeddings"}

    Args:
        every_n_epochs: take a snapshot at the end of every this many training epochs;
            ``None`` or 0 disables the epoch schedule.
        every_n_train_steps: take a snapshot every this many optimizer steps (``None``: off).
        include: regex or list of regexes (``re.search`` on layer names); only matching layers
            are analysed. Naming a layer of an unrecognised module type analyses it too.
        exclude: regex or list of regexes; matching layers are not analysed.
        kinds: only these layer kinds (``linear``, ``conv2d``, ``embedding``, ``attention``,
            ``rnn``, ...); ``None`` for all.
        conv_mode: ``"pooled"`` (one ESD per conv layer, weightwatcher's default) or
            ``"slices"`` (one ESD per kernel position).
        min_evals: layers with fewer eigenvalues are skipped (reported, not dropped silently).
        max_evals: layers with more eigenvalues are skipped (``None``: no limit).
        max_n: layers with a larger dimension are skipped (``None``: no limit).
        background: analyse in a background worker (default). ``False`` analyses on the
            training thread, which implies ``blocking``.
        blocking: wait for each snapshot's analysis before training continues; results are
            logged at once. Deterministic, for tests and debugging.
        worker_type: ``"thread"`` (default) or ``"process"`` (a spawned process: no GIL
            sharing; the training script needs an ``if __name__ == "__main__":`` guard).
        worker_threads: intra-op threads used by the analysis (default 1): training keeps the
            other cores, and at layer sizes multi-threaded LAPACK gains little (on a busy
            machine it can be several times slower). ``None`` leaves the count alone.
        worker_nice: raise the worker's nice value by this much (Linux; 0 to keep it).
        worker_idle: run the worker in Linux's ``SCHED_IDLE`` class: it only gets CPU time that
            nothing else wants (lowest overhead; on a saturated machine snapshots are skipped).
        max_pending: snapshots allowed in flight (copied, not yet analysed). Memory stays bounded
            by that many weight copies whatever ``on_lag`` says.
        on_lag: what happens to a due snapshot while ``max_pending`` are still in flight:
            ``"skip"`` (default) drops it with a warning, training never waits; ``"wait"`` makes
            training wait for the worker first, so no snapshot is lost (with ``worker_idle``
            the cost is then at most that of ``blocking``, and zero when there is idle CPU).
        log_histograms: log ESD histograms of log10(eigenvalues) to TensorBoard.
        log_text: log a per-layer markdown table ``ww/layers`` to TensorBoard.
        log_callback_metrics: put the summary into ``trainer.callback_metrics``.
        figures_every_n_snapshots: render figures (alpha per layer, ESDs, phase heatmap) every
            this many snapshots and at the final one; ``None`` or 0 disables figures.
        figure_layers: regex or list of regexes selecting the layers that get an ESD figure;
            ``None`` picks ``max_figure_layers`` layers spread over the depth.
        max_figure_layers: most ESD figures per snapshot.
        figures_min_run_seconds: figures are drawn only once training has run this long (default
            60 s; 0: always). The renderer's start-up costs a few CPU-seconds, more than a short
            run's training; figures of earlier snapshots are left to ``ww-monitor report``.
            Figures are drawn only with a TensorBoard logger (other loggers cannot store them).
        figures_timeout: most seconds the training thread waits at train end for the final
            figures (default 10; a warm renderer needs 1-2 s); later ones are dropped with a warning.
        method: eigensolver, ``"auto"``, ``"gram"``, ``"svd"`` or ``"mixed"``.
        analysis_device: where the eigensolves run: ``"auto"`` (the weights' device when it is a
            GPU, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. On a GPU the snapshot stays
            on the device within a quarter of its free memory, the solves run on a low-priority
            stream, only eigenvalues come to the host, and an out-of-memory error falls back to
            the CPU with a warning (:mod:`ww_monitor.monitoring.device`).
        drain_timeout: seconds to wait for outstanding analyses at train end and when a
            checkpoint is saved before giving up with a warning.
        alerts: alert rules (:class:`ww_monitor.monitoring.alerts.AlertConfig`: thresholds, enabled rules,
            per-rule actions ``log``/``warn``/``tensorboard``/``callback``/``raise``/``stop``);
            ``True`` for the defaults (rank collapse, alpha outside [2, 4] after a warm-up,
            non-finite weights, phase regression, correlation traps), ``False`` to disable.
            Alerts fire when a layer enters a state and are resolved when it leaves.
        on_alert: called with each :class:`~ww_monitor.monitoring.alerts.Alert` (rank 0) for rules whose
            actions include ``"callback"`` (the default).
        detX: the det X = 1 tail of SETOL (``detX_num``, ``detX_val``, ``ERG_gap``); cost ~1%.
        fix_fingers: ``"clip_xmax"`` or ``"xmin_peak"``: power-law fits not thrown off by a few
            outlying eigenvalues (analysis time 1.2x / 1.05x).
        max_fingers: ``clip_xmax``: most top eigenvalues clipped.
        finger_thresh: ``clip_xmax``: a clip must lower alpha by more than this.
        fit: ``"PL"``, ``"TPL"`` (truncated power law: alpha and ``Lambda``; 1.2x) or ``"E_TPL"``
            (TPL on the ``xmin_peak`` tail; 1.3x).
        randomize: randomized-ESD columns (``rand_distance``, ...): two to six extra eigensolves
            per layer, ~6x the analysis time. These five are weightwatcher 0.7.7's options, as in
            :func:`ww_monitor.analyze`; times from ``benchmarks/bench_options.py``.
        peft: LoRA adapters (see :mod:`ww_monitor.analysis.adapters`): ``False`` analyses the base
            weights, ``True``/``"peft_only"`` only the adapter updates ``scaling * B @ A`` (from an
            r x r core: cheap), ``"with_base"`` everything plus the merged weights. Zero updates
            (``lora_B`` right after initialisation) are skipped with a reason, never a rank collapse.
        distance_from_init: log ``ww/distance_from_init/<layer>`` = ``||W_t - W_0||_F / ||W_0||_F``
            relative to the baseline snapshot (train start). Keeps one copy of the analysed
            weights (the baseline) for the whole run; not available after resuming from a
            checkpoint (the baseline is not saved). Adapter updates (kind ``lora``) have none.
        esd_shift: log ``ww/esd_shift/<layer>``: the 1-Wasserstein distance between the
            log10-eigenvalue distributions of this and the previous snapshot (in decades; 0 for
            an unchanged ESD). Costs one sort of the eigenvalues; keeps the previous ESDs (saved
            in checkpoints, so it continues across a resume). Both are also columns of
            ``history.to_pandas()``.
        summary_include_unreliable: also average layers whose fit is not reliable (too few
            eigenvalues or tail points, :mod:`ww_monitor.analysis.reliability`) into the fit-based
            ``ww/summary/*`` means. Default False: they are left out and counted in
            ``ww/summary/num_unreliable``.

    ``callback.stats`` counts what the monitor did and cost: ``snapshots_taken``/``_skipped``/
    ``_failed``, ``copy_seconds`` (weight copies), ``analysis_seconds`` (worker wall time),
    ``train_thread_seconds`` (time spent in this callback's hooks on the training thread:
    copies, logging and any waits), ``peak_inflight_bytes``, ``lag_waits`` and ``baseline_bytes``
    (the baseline copy kept for ``distance_from_init``).
    """

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

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined]
            every_n_epochs=self.every_n_epochs, every_n_train_steps=self.every_n_train_steps,
            include=list(self.config.include), exclude=list(self.config.exclude),
            kinds=None if self.config.kinds is None else list(self.config.kinds),
        )

    @_on_training_thread
    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        last = self.history.steps[-1] if len(self.history) else self._last_step
        if last is not None and trainer.global_step < last:
            # The same callback object passed to a new Trainer: its snapshots would collide with
            # the earlier run's steps and be dropped as duplicates.
            _rank_zero_warn(
                f"WeightWatcherCallback: this callback holds {len(self.history)} snapshot(s) up to step {last} "
                f"from an earlier run, and this run starts at step {trainer.global_step}. Starting a new history "
                "(the earlier one is discarded); use one callback per run, or keep `callback.history` before "
                "fitting again.", RuntimeWarning)
            self._new_run()
        if getattr(trainer, "fast_dev_run", False):
            self._check_selection_only(pl_module)
            return
        self._rank, self._world = int(trainer.global_rank), int(trainer.world_size)
        if self._world > 1 and not is_initialized():
            self._world = 1  # no process group (e.g. a custom launcher): analyse everything here
        self._start_worker()
        self._active = True
        self._checked_step = None
        fresh = len(self.history) == 0 and self._last_step is None
        step, epoch = trainer.global_step, trainer.current_epoch
        owed = self._owed is not None and self._owed[0] == step and not self.history.has_step(step)
        if owed:
            epoch = self._owed[1]
        self._owed = None
        self._sync_point(trainer, pl_module, snapshot=fresh or owed, epoch=epoch)

    def _check_selection_only(self, pl_module) -> None:
        """``fast_dev_run``: a smoke test of the training code, so no snapshots are taken (the
        analysis would cost more than the run); the layer selection is still checked and its
        problems reported, which is what a smoke test is for."""
        log.info("WeightWatcherCallback: fast_dev_run: no snapshots are taken; checking the layer selection only")
        if self._reported_selection:
            return
        try:
            owners, skipped = collect_into(None, pl_module, self.config)
        except Exception as err:  # sharded parameters: their shapes are unknown until gathered
            log.debug("fast_dev_run selection check not possible: %s", err)
            return
        self._report_selection(pl_module, owners, skipped)

    @_on_training_thread
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        step = trainer.global_step
        n = self.every_n_train_steps
        if n and step % n == 0 and step != self._checked_step:
            self._checked_step = step
            self._sync_point(trainer, pl_module, snapshot=step != self._last_step, epoch=trainer.current_epoch)
        elif self._world == 1:
            self._collect(trainer)

    @_on_training_thread
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._active:
            return
        n = self.every_n_epochs
        due = bool(n) and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step
        if due or self._world > 1:  # under DDP every epoch end is a sync point
            self._sync_point(trainer, pl_module, snapshot=due, epoch=trainer.current_epoch + 1)
        else:
            self._collect(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._guard is not None:  # CUDA copies still reading the weights the step will change
            self._guard.guard_writes()
            self._guard = None

    @_on_training_thread
    def on_train_end(self, trainer, pl_module) -> None:
        if not self._active:
            return
        try:
            take = trainer.global_step != self._last_step
            if take:  # the final snapshot is never skipped: make room for it first
                self._drain(trainer, kinds=("analysis",), reason="the final snapshot")
            self._sync_point(trainer, pl_module, snapshot=take, epoch=trainer.current_epoch, final=True)
            self._drain(trainer, kinds=("analysis",), reason="train end")
            self._exchange(trainer)
            self._finalize_incomplete(trainer)
            self._report_skipped_steps()
            self._submit_figures()  # the final snapshot gets figures (in a run long enough for them)
            if not self._figures.finish():
                warn_user("WeightWatcherCallback: the final figures were not rendered within figures_timeout="
                          f"{self.figures_timeout:g}s; they are dropped (`ww-monitor report` draws them from the "
                          "logs).", RuntimeWarning)
            self._log_figures(trainer)
            self._writer.flush(trainer.loggers)
        finally:
            self._active = False
            self._stop_worker(cancel=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # No collectives here: other ranks may not reach this point.
        self._active = False
        self._stop_worker(cancel=True)

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._worker is not None:
            self._active = False
            self._stop_worker(cancel=True)

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer_ref", None)
        if self._active and trainer is not None:
            # Complete the history before it is saved. Called on every rank by
            # Trainer.save_checkpoint, so the gather below is a valid sync point.
            self._drain(trainer, kinds=("analysis",), reason="checkpoint")
            self._exchange(trainer)
        return {
            "version": _STATE_VERSION,
            "history": self.history.state_dict(),
            "next_index": self._next_index,
            "last_step": self._last_step,
            "owed": list(self._owed_now(trainer) or []) if trainer is not None and self._active else [],
            "stats": {k: v for k, v in self.stats.items() if isinstance(v, (int, float))},
            "alerts": self.alert_tracker.state_dict() if self.alert_tracker is not None else {},
            # The previous ESDs, so esd_shift continues across a resume (tensors: weights_only loads).
            "prev_esd": {k: torch.as_tensor(v, dtype=torch.float64) for k, v in self._prev_esd.items()},
        }

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

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer_ref = trainer

    # ------------------------------------------------------------------ internals
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

    def _owed_now(self, trainer) -> tuple[int, int] | None:
        """(step, epoch) of a snapshot due now but not taken yet: a checkpoint saved before our
        hook at this step ran (e.g. ModelCheckpoint at validation end, before the epoch end)."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        try:
            last_batch = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        except AttributeError:
            last_batch = False
        if self.every_n_epochs and last_batch and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            return step, trainer.current_epoch + 1
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._checked_step:
            return step, trainer.current_epoch
        return None

    def _is_figure_snapshot(self, index: int, final: bool) -> bool:
        return self._figures.due(index, final)

    # snapshot -> worker ------------------------------------------------------
    def _sync_point(self, trainer, pl_module, snapshot: bool, epoch: int, final: bool = False) -> None:
        """Gather finished results (DDP), maybe take a snapshot, log what is complete.

        Under DDP every rank calls this at the same hooks with the same arguments.
        """
        if self._worker is None:
            return
        if snapshot:
            self._check_schedule()
        if self._world > 1:
            busy = self._gather(trainer) >= self.max_pending
        else:
            self._collect(trainer)
            busy = self._worker.pending("analysis") >= self.max_pending
        if snapshot and busy and self.on_lag == "wait":
            # Every rank is told the same `busy`, so under DDP all ranks wait here alike; the
            # results are gathered at the next sync point.
            self.stats["lag_waits"] += 1
            self._drain(trainer, kinds=("analysis",), reason="a snapshot (on_lag='wait')")
            busy = False
            if self._world == 1:
                self._collect(trainer)
        if snapshot:
            if busy and _ends_at_this_step(trainer):
                pass  # not skipped: the final snapshot at train end takes this step (after a drain)
            elif busy:
                self._skip(trainer.global_step)
            else:
                self._take(trainer, pl_module, epoch, final)
                if self.blocking:
                    self._drain(trainer, kinds=("analysis",), reason="a blocking snapshot")
                    self._exchange(trainer)

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

    def _selection_message(self, pl_module, selection_skipped) -> str:
        """Why nothing is analysed: every matching layer was skipped (reasons), or the selection
        matches no layer (the names there are)."""
        if selection_skipped:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in selection_skipped[:_MAX_LISTED])
            more = f" (and {len(selection_skipped) - _MAX_LISTED} more)" if len(selection_skipped) > _MAX_LISTED else ""
            return (f"WeightWatcherCallback: no layer can be analysed: every selected layer was skipped: "
                    f"{reasons}{more}. Nothing will be analysed; adjust min_evals/max_evals/max_n or the selection.")
        names = available_layer_names(pl_module, self.config.conv_mode)
        shown = ", ".join(names[:_MAX_LISTED]) + (f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")
        return (f"WeightWatcherCallback: no weight matrix matches the selection (include={list(self.config.include)}, "
                f"exclude={list(self.config.exclude)}, kinds={self.config.kinds}); nothing will be analysed. "
                f"Layers in the model: {shown or 'none with a weight matrix'}.")

    def _report_selection(self, pl_module, owners, selection_skipped) -> None:
        """Once per run: what the selection left out, like ``analyze()`` reports it."""
        self._reported_selection = True
        if not owners:
            _rank_zero_warn(self._selection_message(pl_module, selection_skipped), RuntimeWarning)
            return
        unexpected = [s for s in selection_skipped if not is_size_limit(s.reason)]
        for s in selection_skipped:
            log.info("ww_monitor: layer %s (%s, shape %s) not analysed: %s", s.name, s.kind, s.shape, s.reason)
        if unexpected:  # size limits are configuration; anything else (dtype, ...) is news
            _rank_zero_warn("WeightWatcherCallback: " + "; ".join(
                f"layer {s.name} not analysed: {s.reason}" for s in unexpected[:_MAX_LISTED]), RuntimeWarning)

    def _take(self, trainer, pl_module, epoch: int, final: bool) -> None:
        index, step = self._next_index, trainer.global_step
        if step in self._skipped_steps:  # skipped earlier at this step, taken now (the final snapshot)
            self._skipped_steps.discard(step)
            self.stats["snapshots_skipped"] -= 1
        device = resolve_analysis_device(self.analysis_device, getattr(pl_module, "device", None))
        builder = SnapshotBuilder(index, step, epoch, share_memory=self._worker.mode == "process", device=device,
                                  device_budget=staging_budget(device))
        root = getattr(trainer.strategy, "model", None)
        try:
            owners, selection_skipped = collect_into(builder, pl_module, self.config, self._rank, self._world, root)
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
            self._report_selection(pl_module, owners, selection_skipped)
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

    def _drain(self, trainer, kinds, reason: str) -> None:
        if self._worker is None:
            return
        if not self._worker.wait(timeout=self.drain_timeout, kinds=kinds):
            warn_user(
                f"WeightWatcherCallback: background analysis did not finish within drain_timeout="
                f"{self.drain_timeout:g}s before {reason}; its results are dropped.", RuntimeWarning)

    # worker -> results -------------------------------------------------------
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

    def _exchange(self, trainer) -> None:
        """Log what is finished: gather across ranks under DDP (a sync point), else poll."""
        if self._world > 1:
            self._gather(trainer)
        else:
            self._collect(trainer)

    def _collect(self, trainer) -> None:
        """Single process: log every finished analysis and figure."""
        if self._worker is None:
            return
        for out in self._outputs_from(self._worker.poll(("analysis",))):
            self._complete(trainer, out.index, {self._rank: out})
        self._log_figures(trainer)

    def _gather(self, trainer) -> int:
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
                self._complete(trainer, index, self._partials.pop(index))
        self._log_figures(trainer)
        return max(p["pending"] for p in everyone)

    def _finalize_incomplete(self, trainer) -> None:
        for index in sorted(self._partials):
            parts = self._partials.pop(index)
            missing = sorted(set(range(self._world)) - set(parts))
            _rank_zero_warn(f"WeightWatcherCallback: snapshot {index} is incomplete (no results from ranks "
                            f"{missing}); logging the layers that were analysed.", RuntimeWarning)
            self._complete(trainer, index, parts)

    def _complete(self, trainer, index: int, parts: dict[int, AnalysisOutput]) -> None:
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
        metrics.update(summary_scalars(summary))
        if self.log_callback_metrics and results:
            try:
                cm = trainer.callback_metrics
                for k, v in metrics.items():
                    cm[k] = torch.tensor(v, dtype=torch.float32)
                # Lets AlphaDriftEarlyStopping (and users) tell a new snapshot from an old value.
                cm["ww/snapshot_step"] = torch.tensor(step)
            except Exception as err:  # pragma: no cover - depends on the trainer's internals
                log.debug("could not update callback_metrics: %s", err)
        loggers = list(getattr(trainer, "loggers", []) or [])
        self._handle_alerts(trainer, loggers, results, skipped, step, epoch)
        if self._rank != 0:
            return
        self._writer.log_scalars(loggers, metrics, step)
        self._writer.log_tensorboard(loggers, step, results, histograms=self.log_histograms, text=self.log_text,
                                     precomputed=histograms)
        self._figures.offer(step, results, loggers, submit=bool(meta and meta["figures"]), phases=self.history.phases)

    def _esd_shifts(self, results) -> None:
        """``esd_shift`` of each layer against its previous snapshot (training thread; ESDs are small)."""
        for r in results:
            if r.eigenvalues is None:
                continue
            prev = self._prev_esd.get(r.name)
            if prev is not None:
                r.esd_shift = esd_shift_distance(prev, r.eigenvalues)
            self._prev_esd[r.name] = r.eigenvalues

    def _handle_alerts(self, trainer, loggers, results, skipped, step: int, epoch: int) -> None:
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
            trainer.should_stop = True

    def _submit_figures(self) -> None:
        """Render the figures of the latest complete snapshot in the background (rank 0)."""
        if self._rank == 0:
            self._figures.submit(self.history.phases)

    def _log_figures(self, trainer) -> None:
        if self._rank != 0:
            return
        loggers = list(getattr(trainer, "loggers", []) or [])
        self._figures.warm_up(loggers)
        for step, images in self._figures.collect(lambda m: _rank_zero_warn(m, RuntimeWarning)):
            self._writer.log_images(loggers, step, images)


_CLASSES: dict[str, type] = {}


def _build(callback_base: type, module: str) -> type:
    cls = type(
        "WeightWatcherCallback", (WeightWatcherMixin, callback_base),
        {"__doc__": WeightWatcherMixin.__doc__, "__module__": module},
    )
    cls.__qualname__ = "WeightWatcherCallback"
    return cls


def __getattr__(name: str):
    if name == "WeightWatcherCallback":
        cls = _CLASSES.get("pytorch_lightning")
        if cls is None:
            from pytorch_lightning import Callback

            cls = _CLASSES["pytorch_lightning"] = _build(Callback, __name__)
            globals()["WeightWatcherCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
