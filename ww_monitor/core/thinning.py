"""Scheduled snapshots that are not taken, and what the user is told: :class:`Thinning`.

Two things thin a schedule (a base of :class:`~ww_monitor.core.engine.MonitorEngine`):

* the **cost budget** (``max_overhead``, :mod:`ww_monitor.monitoring.budget`) *defers* a snapshot
  that would make the monitor cost more than its share of the training time;
* a **lagging worker** (``max_pending`` snapshots still in flight) makes ``on_lag="skip"``
  *skip* one.

Under the budget (the default) both are the expected behaviour of a monitor that stays within
its share on a machine that cannot afford the whole schedule: counted in ``stats`` and logged
at INFO. With ``max_overhead=None`` the user asked for every scheduled snapshot, so a skip is a
warning, and so is a schedule the cost model says cannot keep up.
"""

from __future__ import annotations

import logging
import time

from .engine_state import EngineState
from .hooks import MAX_LISTED, rank_zero_warn

__all__ = ["Thinning"]

log = logging.getLogger(__name__)


class Thinning(EngineState):
    """Deferrals, skips and schedule warnings; the engine supplies the budget, stats and history."""

    def _defer(self, step: int) -> None:
        """A due snapshot not taken because it would exceed the cost budget (``max_overhead``)."""
        self._budget.defer()
        self.stats["snapshots_deferred"] += 1
        if self._budget.deferred == 1 and self._rank == 0:
            log.info(
                "ww_monitor: deferring the snapshot at step %d: the monitor has used %.2f s in %.1f s of "
                "training (max_overhead=%g); snapshots are thinned to stay within it (max_overhead=None "
                "takes every scheduled snapshot)",
                step,
                self._budget.spent,
                self._budget.elapsed(),
                self.max_overhead,
            )

    def _report_deferred(self) -> None:
        if self._budget.deferred and self._rank == 0:
            log.info(
                "ww_monitor: %d scheduled snapshot(s) were deferred to keep the monitor within "
                "max_overhead=%g of the training time; %d were analysed",
                self._budget.deferred,
                self.max_overhead,
                self.stats["snapshots_taken"],
            )

    def _skip(self, step: int) -> None:
        """Count a due snapshot not taken because the worker lags: once per step (the epoch and
        step schedules can both ask at one step), warned at the first skip of the run (at INFO
        under the cost budget, where a lagging worker is the same news as a deferral: the
        schedule is thinned to what the machine affords)."""
        if step in self._skipped_steps:
            return
        self._skipped_steps.add(step)
        self.stats["snapshots_skipped"] += 1
        if self._budget.enabled:
            log.debug("ww_monitor: snapshot at step %d skipped: the analysis lags", step)
        elif len(self._skipped_steps) == 1:
            rank_zero_warn(
                f"{self.warning_prefix}: skipped the snapshot at step {step} because "
                f"{self.max_pending} earlier snapshot(s) are still being analysed (max_pending="
                f"{self.max_pending}). Take snapshots less often, raise max_pending, on_lag='wait', or narrow "
                "the layer selection. Further skips are counted in stats['snapshots_skipped'] and listed at "
                "train end.",
                RuntimeWarning,
            )

    def _report_skipped_steps(self) -> None:
        missing = sorted(s for s in self._skipped_steps if not self.history.has_step(s))
        if len(missing) > 1:
            shown = ", ".join(map(str, missing[:MAX_LISTED])) + (" ..." if len(missing) > MAX_LISTED else "")
            if self._budget.enabled:
                log.info(
                    "ww_monitor: %d scheduled snapshots were skipped because the analysis lagged (steps %s)",
                    len(missing),
                    shown,
                )
                return
            rank_zero_warn(
                f"{self.warning_prefix}: {len(missing)} scheduled snapshots were skipped because the "
                f"analysis lagged (steps {shown}); the history holds {len(self.history)}.",
                RuntimeWarning,
            )

    def _check_schedule(self) -> None:
        """Warn once when snapshots fall due faster than one takes to analyse (:mod:`.cost`)."""
        now = time.monotonic()
        last, self._schedule["last_due"] = self._schedule["last_due"], now
        estimate = self.estimated_snapshot_seconds
        if estimate is None or last is None or self._schedule["warned"] or estimate <= now - last:
            return
        self._schedule["warned"] = True
        if self._budget.enabled:  # the budget thins the schedule to what this machine affords
            log.info(
                "ww_monitor: one snapshot takes about %.2f s to analyse here and snapshots are due %.2f s "
                "apart; max_overhead=%g thins them",
                estimate,
                now - last,
                self.max_overhead,
            )
            return
        rank_zero_warn(
            f"{self.warning_prefix}: one snapshot takes about {estimate:.2f} s to analyse here but snapshots are "
            f"due {now - last:.2f} s apart, so the analysis cannot keep up (snapshots will be skipped or training "
            f"will wait, see on_lag). Take snapshots less often or narrow the layer selection.",
            RuntimeWarning,
        )
