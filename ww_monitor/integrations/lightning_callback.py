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

Everything else lives in :class:`ww_monitor.core.engine.MonitorEngine`; this module only
translates Lightning's hooks (and reads ``trainer.fit_loop`` for what a checkpoint owes); results
are exchanged between ranks through the strategy's own collectives (``LightningCollectives``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.engine import MonitorEngine
from ..core.hooks import on_training_thread as _on_training_thread
from ..monitoring.distributed import LightningCollectives

# WeightWatcherCallback is built on first access (module __getattr__), which F822 cannot see.
__all__ = ["WeightWatcherMixin", "WeightWatcherCallback"]  # noqa: F822

#: Lightning's ``Trainer``, from either package (``lightning.pytorch`` or ``pytorch_lightning``):
#: the hooks read it duck-typed (``global_step``, ``loggers``, ``strategy``, ...).
Trainer = Any


def _ends_at_this_step(trainer: Trainer) -> bool:
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


class WeightWatcherMixin(MonitorEngine):
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
            ``None`` disables the epoch schedule (0 is an error, not "off").
        every_n_train_steps: take a snapshot every this many optimizer steps (``None``: off).
            With both schedules off, pass ``ends_only=True``: then only the baseline (train
            start) and final (train end) snapshots are taken; without it that is an error (a
            monitor that watches nothing in between is more often a mistake than a choice).
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
            ``None`` picks the ``max_figure_layers`` worst layers (standard errors outside the
            alpha band, :mod:`ww_monitor.outputs.worst_layers`), then layers spread over the depth.
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
        peft: LoRA adapters (see :mod:`ww_monitor.analysis.adapters`): ``"auto"`` (default) analyses
            the adapter updates ``scaling * B @ A`` as ``<layer>.lora_BA.<adapter>`` (from an r x r
            core: cheap) next to the base weights, which LoRA freezes, so they are analysed once
            (see ``watch_frozen``); without LoRA layers it is ``False``. ``False`` analyses the base
            weights only (``wwm.analyze``'s default), ``True``/``"peft_only"`` only the updates,
            ``"with_base"`` everything plus the merged weights ``W + scaling * B @ A`` (an out x in
            product per adapter and snapshot). Zero updates (``lora_B`` right after initialisation)
            are skipped with a reason, never a rank collapse.
        watch_frozen: also analyse *frozen* matrices (no parameter they read requires grad:
            LoRA base weights, a frozen backbone or embedding) at every snapshot. Default
            ``False``: a frozen matrix is copied and analysed at the first snapshot at which it is
            frozen (the baseline, usually) and then carried forward: not copied, analysed or logged
            again, its last result standing (``frozen=True`` in ``history.to_pandas()``, the
            ``ww/layers`` table and the report). A layer unfrozen later (gradual unfreezing) is
            watched again from the next snapshot; one frozen later is analysed once more, then
            carried (:mod:`ww_monitor.monitoring.carry`). The ``ww/summary/*`` means (and the
            per-block/kind means) cover the layers that train, at the baseline as later, so they
            do not jump after the baseline and under LoRA they describe the adapters;
            ``ww/summary/num_frozen`` counts the frozen ones. With ``True`` every matrix is copied
            and analysed at every snapshot and the means cover every layer (the behaviour before
            this option).
        distance_from_init: log ``ww/distance_from_init/<layer>`` = ``||W_t - W_0||_F / ||W_0||_F``
            relative to the baseline snapshot (train start). Keeps one copy of the analysed
            weights (the baseline) for the whole run; not available after resuming from a
            checkpoint (the baseline is not saved). Adapter updates (kind ``lora``) have none, nor
            do matrices frozen at the baseline (carried forward, see ``watch_frozen``; a layer
            unfrozen later gets no distance unless ``watch_frozen=True``).
        esd_shift: log ``ww/esd_shift/<layer>``: the 1-Wasserstein distance between the
            log10-eigenvalue distributions of this and the previous snapshot (in decades; 0 for
            an unchanged ESD). Costs one sort of the eigenvalues; keeps the previous ESDs (saved
            in checkpoints, so it continues across a resume). Both are also columns of
            ``history.to_pandas()``.
        summary_include_unreliable: also average layers whose fit is not reliable (too few
            eigenvalues or tail points, :mod:`ww_monitor.analysis.reliability`) into the fit-based
            ``ww/summary/*`` means. Default False: they are left out and counted in
            ``ww/summary/num_unreliable``.
        max_overhead: the largest share of the training's wall time the monitor may cost
            (default 0.03; :mod:`ww_monitor.monitoring.budget`): its time on the training thread
            plus the background analyses' wall time may not exceed ``0.25 s + max_overhead * t``
            after ``t`` seconds of training. A scheduled snapshot that would exceed it is
            deferred to the next scheduled step that fits (counted in
            ``stats["snapshots_deferred"]``, logged at INFO); the baseline and final snapshots are
            always taken. Long runs keep their whole schedule; a 10-second fit with a snapshot
            every epoch thins out instead of slowing down. ``None`` takes every scheduled
            snapshot (then ``on_lag`` decides what happens when the analysis cannot keep up).
            Not applied with ``blocking=True``, whose point is a deterministic schedule.
        ends_only: only the baseline and final snapshots; ``every_n_epochs`` and
            ``every_n_train_steps`` must then be ``None``.

    A misspelt argument is a ``WWMonitorError`` naming the closest valid one.

    ``callback.stats`` counts what the monitor did and cost: ``snapshots_taken``/``_skipped``/
    ``_failed``/``_deferred`` (by ``max_overhead``), ``copy_seconds`` (weight copies), ``analysis_seconds`` (worker wall time), ``analysis_cpu_seconds``,
    ``train_thread_seconds`` (time spent in this callback's hooks on the training thread:
    copies, logging and any waits), ``peak_inflight_bytes``, ``lag_waits``, ``baseline_bytes``
    (the baseline copy kept for ``distance_from_init``), ``snapshot_bytes`` and
    ``matrices_copied`` (the latest snapshot, this rank), ``frozen_layers`` (frozen matrices at
    the latest snapshot), ``layers_carried`` and ``carried_bytes`` (frozen matrices carried
    forward instead of copied over the run, and the bytes those copies would have taken).
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined]  # Lightning Callback's, the base at run time
            every_n_epochs=self.every_n_epochs,
            every_n_train_steps=self.every_n_train_steps,
            include=list(self.config.include),
            exclude=list(self.config.exclude),
            kinds=None if self.config.kinds is None else list(self.config.kinds),
        )

    @_on_training_thread
    def on_train_start(self, trainer: Trainer, pl_module: nn.Module) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        self._check_reuse(trainer.global_step)
        if getattr(trainer, "fast_dev_run", False):
            self._check_selection_only(pl_module)
            return
        self._start_run(
            trainer,
            pl_module,
            trainer.global_rank,
            trainer.world_size,
            trainer.current_epoch,
            collectives=LightningCollectives(trainer.strategy),
        )

    @_on_training_thread
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
    def on_train_epoch_end(self, trainer: Trainer, pl_module: nn.Module) -> None:
        if not self._active:
            return
        n = self.every_n_epochs
        due = bool(n) and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step
        if due or self._world > 1:  # under DDP every epoch end is a sync point
            self._sync_point(trainer, pl_module, snapshot=due, epoch=trainer.current_epoch + 1)
        else:
            self._collect(trainer)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: nn.Module, optimizer: Any) -> None:
        if self._guard is not None:  # CUDA copies still reading the weights the step will change
            self._guard.guard_writes()
            self._guard = None

    @_on_training_thread
    def on_train_end(self, trainer: Trainer, pl_module: nn.Module) -> None:
        self._finish_run(trainer, pl_module, trainer.current_epoch)

    def on_exception(self, trainer: Trainer, pl_module: nn.Module, exception: BaseException) -> None:
        self._abort_run()

    def teardown(self, trainer: Trainer, pl_module: nn.Module, stage: str) -> None:
        if self._worker is not None:
            self._abort_run()

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank by Trainer.save_checkpoint, so the gather inside is a valid sync point.
        trainer = getattr(self, "_trainer_ref", None)
        owed = self._owed_now(trainer) if trainer is not None and self._active else None
        return self._engine_state(trainer, owed)

    def setup(self, trainer: Trainer, pl_module: nn.Module, stage: str) -> None:
        self._trainer_ref = trainer

    @staticmethod
    def _ends_at_this_step(trainer: Trainer) -> bool:
        return _ends_at_this_step(trainer)

    def _owed_now(self, trainer: Trainer) -> tuple[int, int] | None:
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


_CLASSES: dict[str, type] = {}


def _build(callback_base: type, module: str) -> type:
    cls = type(
        "WeightWatcherCallback",
        (WeightWatcherMixin, callback_base),
        {"__doc__": WeightWatcherMixin.__doc__, "__module__": module},
    )
    cls.__qualname__ = "WeightWatcherCallback"
    return cls


def __getattr__(name: str) -> type:
    if name == "WeightWatcherCallback":
        cls = _CLASSES.get("pytorch_lightning")
        if cls is None:
            from pytorch_lightning import Callback

            cls = _CLASSES["pytorch_lightning"] = _build(Callback, __name__)
            globals()["WeightWatcherCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
