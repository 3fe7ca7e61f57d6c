"""Finished analyses -> history, alerts and sinks: :class:`Completion`.

A base of :class:`~ww_monitor.core.engine.MonitorEngine`, on the training thread. Finished
worker jobs are polled (one process) or exchanged through the engine's collectives at a sync point
(DDP: a snapshot is complete once every rank's share has arrived). A complete snapshot is put in
order, its ``esd_shift`` computed against the previous one, added to the history, its scalars put
into ``host.callback_metrics``, the alert rules evaluated (on every rank alike, so ``stop`` acts
everywhere), and rank 0 writes scalars, histograms, the layer table and figures to the sinks.
"""

from __future__ import annotations

import logging
import time

import torch

from ..analysis.adapters import ZERO_UPDATE_REASON
from ..analysis.results import Report
from ..functional.distances import esd_shift as esd_shift_distance
from ..monitoring.alert_dispatch import dispatch_alerts
from ..monitoring.analysis_job import AnalysisOutput
from ..monitoring.history import SnapshotRecord
from ..outputs.layer_groups import group_scalars
from ..outputs.tensorboard_writer import layer_scalars, summary_scalars
from ..user_warnings import warn_user
from .engine_state import EngineState
from .hooks import rank_zero_warn

__all__ = ["Completion"]

log = logging.getLogger(__name__)


class Completion(EngineState):
    """Collect, gather and complete snapshots; alerts; writing (see the module docstring)."""

    def _outputs_from(self, finished) -> list[AnalysisOutput]:
        outputs = []
        for job in finished:
            if job.error is not None or not isinstance(job.value, AnalysisOutput):
                meta = self._meta.get(job.key, {})
                outputs.append(
                    AnalysisOutput(
                        index=job.key,
                        step=meta.get("step", -1),
                        epoch=meta.get("epoch", -1),
                        rank=self._rank,
                        error=job.error or "no result",
                    )
                )
            else:
                outputs.append(job.value)
            self.stats["analysis_seconds"] += job.seconds
            self._charge_analysis(job)
        return outputs

    def _charge_analysis(self, job) -> None:
        """Charge a finished analysis to the cost budget at its wall time: while it runs it competes
        with training for cores, the interpreter lock and memory bandwidth, so its wall time bounds
        what it can cost training (its CPU time alone undercounts: on 2 busy cores a snapshot's
        CPU time was a third of the slowdown it caused). The next snapshot is expected to cost as
        much. ``stats["analysis_cpu_seconds"]`` keeps the worker thread's CPU time."""
        single = self._worker is not None and self._worker.mode != "inline" and self.worker_threads == 1
        self.stats["analysis_cpu_seconds"] += job.cpu_seconds if single else job.seconds
        meta = self._meta.get(job.key, {})
        if meta.get("budgeted", False):
            self._budget.charge(job.seconds)
            self._budget.snapshot_cost(job.seconds + meta.get("copy_seconds", 0.0))

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

    def _gather(self, host, within_budget: bool = True) -> tuple[int, bool]:
        """DDP sync point: exchange finished outputs; returns the largest in-flight count and
        whether every rank's cost budget allows a snapshot (so all ranks decide alike)."""
        local = self._outputs_from(self._worker.poll(("analysis",))) if self._worker is not None else []
        pending = self._worker.pending("analysis") if self._worker is not None else 0
        mine = {"rank": self._rank, "outputs": local, "pending": pending, "within_budget": within_budget}
        try:
            everyone = self._collectives.all_gather_object(mine, self._world)
        except Exception as err:
            warn_user(
                f"{self.warning_prefix}: gathering results across ranks failed ({type(err).__name__}: "
                f"{err}); distributed analysis results are incomplete.",
                RuntimeWarning,
            )
            everyone = [mine]
        for payload in everyone:
            for out in payload["outputs"]:
                self._partials.setdefault(out.index, {})[payload["rank"]] = out
        for index in sorted(self._partials):
            if len(self._partials[index]) >= self._world:
                self._complete(host, index, self._partials.pop(index))
        self._log_figures(host)
        return max(p["pending"] for p in everyone), all(p.get("within_budget", True) for p in everyone)

    def _finalize_incomplete(self, host) -> None:
        for index in sorted(self._partials):
            parts = self._partials.pop(index)
            missing = sorted(set(range(self._world)) - set(parts))
            rank_zero_warn(
                f"{self.warning_prefix}: snapshot {index} is incomplete (no results from ranks "
                f"{missing}); logging the layers that were analysed.",
                RuntimeWarning,
            )
            self._complete(host, index, parts)

    def _complete(self, host, index: int, parts: dict[int, AnalysisOutput]) -> None:
        budgeted = self._meta.get(index, {}).get("budgeted", False)
        t0 = time.perf_counter()
        try:
            self._complete_and_write(host, index, parts)
        finally:  # logging a snapshot is part of its cost (the baseline's, with first writes, is fixed)
            if budgeted:
                self._budget.charge(time.perf_counter() - t0)

    def _complete_and_write(self, host, index: int, parts: dict[int, AnalysisOutput]) -> None:
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
            warn_user(
                f"{self.warning_prefix}: analysis of the snapshot at step {step} failed: " + "; ".join(errors),
                RuntimeWarning,
            )
        for s in skipped:
            if s.reason == ZERO_UPDATE_REASON:  # expected at the start of LoRA training, not a problem
                log.info("ww_monitor: %s not analysed at step %d: %s", s.name, step, s.reason)
            elif s.name not in self._warned_layers:
                self._warned_layers.add(s.name)
                rank_zero_warn(
                    f"{self.warning_prefix}: layer {s.name} not analysed at step {step}: {s.reason}", RuntimeWarning
                )
        if self.esd_shift:
            self._esd_shifts(results)
        carried = tuple(meta.get("carried", ())) if meta else ()
        watched = self._watched(results)
        report = Report(layers=watched, skipped=list(skipped) + list(meta["selection_skipped"] if meta else []))
        summary = report.summary(include_unreliable=self.summary_include_unreliable)
        summary["num_frozen"] = sum(bool(r.frozen) for r in results) + len(carried)
        record = SnapshotRecord.from_results(
            index, step, epoch, results, ranks, skipped=report.skipped, seconds=seconds, errors=errors, summary=summary
        )
        if not self.history.add(record):
            log.debug("snapshot at step %d already in the history; not logged again", step)
            return
        if not results and errors:
            return
        self.latest_results = (step, results)
        metrics = layer_scalars(results)
        metrics.update(group_scalars(watched))
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
        self._writer.log_tensorboard(
            loggers,
            step,
            results,
            histograms=self.log_histograms,
            text=self.log_text,
            precomputed=histograms,
            carried=carried,
            layout=[r.name for r in watched],
        )
        self._figures.offer(
            step, results, loggers, submit=bool(meta and meta["figures"]), grids=self.history.figure_grids
        )

    def _watched(self, results) -> list:
        """The layers the summary and the per-block/kind means rest on: those that train.

        Frozen matrices are analysed once (the baseline, typically) and carried forward, so
        averaging them in at the baseline only would make the means jump between the baseline
        and the next snapshot, and under LoRA a few adapters would drown among the frozen base
        weights. So the means cover the matrices that were trainable at the snapshot (the same
        set at the baseline and after, until a layer is frozen or unfrozen), and
        ``ww/summary/num_frozen`` counts the others. ``watch_frozen=True``: every layer, as
        every layer is analysed at every snapshot then."""
        return list(results) if self.watch_frozen else [r for r in results if not r.frozen]

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
        if dispatch_alerts(
            alerts,
            self.alert_tracker.config,
            tensorboard_writers=writers,
            on_alert=self.on_alert,
            rank=self._rank,
            active=active,
            layers=results,
        ):
            first = next(
                a for a in alerts if not a.resolved and "stop" in self.alert_tracker.config.actions_for(a.rule)
            )
            log.info("%s: stopping training on alert %s: %s", self.warning_prefix, first.rule, first.message)
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
        for step, images in self._figures.collect(
            lambda m: rank_zero_warn(f"{self.warning_prefix}: {m}", RuntimeWarning)
        ):
            self._writer.log_images(loggers, step, images)
