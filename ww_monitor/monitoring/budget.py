"""The monitor's cost budget: what share of a run's time the monitor may take.

A monitor earns its place only if it can stay on in every run, so at the defaults its cost is
bounded by a share of the training's own time: after ``t`` seconds of training the monitor may
have spent at most

    allowance + max_overhead * t

seconds, where *spent* is what its snapshots cost: their copies, logging and any waits on the
training thread, plus the wall time of their background analyses: while one runs it competes with
training for cores, the interpreter lock and memory bandwidth, so its wall time bounds what it
costs (its CPU time alone undercounts). A scheduled snapshot
whose expected cost (that of the previous snapshot) does not fit is *deferred*: the next
scheduled step that fits takes it. The baseline and the final snapshot are always taken and not
charged: they are the run's fixed costs (and carry its one-time warm-ups, such as the first
analysis' imports), bounded on their own. On a
long run the schedule is what the user asked for; on a run whose steps are short next to one
analysis (a 10-second fit, a toy loop with a snapshot every epoch) snapshots thin out to the
budget instead of doubling the run's time.

The allowance lets a run take its first snapshots before it has trained long enough to earn
them (a small model's snapshot costs ~10 ms), so short tests and demos see their whole
schedule.
"""

from __future__ import annotations

import math
import time

__all__ = ["DEFAULT_MAX_OVERHEAD", "OVERHEAD_ALLOWANCE_SECONDS", "CostBudget"]

#: Default largest share of the training's wall time the monitor may cost, as accounted. What the
#: accounting cannot see (cache and memory-bandwidth contention, the trainer's handling of the
#: extra metrics) added about a third on top on a 2-core machine (10-second fit at 5%: 1.06-1.11x),
#: so 3% keeps short CPU runs under the 1.10x users accept for "always on" tooling.
DEFAULT_MAX_OVERHEAD = 0.03
#: Monitor seconds granted before any training time has accrued: the baseline plus the first
#: few snapshots of a small model, and a bound on what the budget adds to a 10-second fit
#: (0.25 s + 3% of 10 s stays well under 10%).
OVERHEAD_ALLOWANCE_SECONDS = 0.25


class CostBudget:
    """Accounts the monitor's cost against ``allowance + max_overhead * elapsed``.

    ``max_overhead=None`` switches the budget off (every scheduled snapshot is taken).
    The clock is injectable for tests.
    """

    def __init__(
        self,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        allowance: float = OVERHEAD_ALLOWANCE_SECONDS,
        clock=time.monotonic,
    ) -> None:
        self.max_overhead = max_overhead
        self.allowance = float(allowance)
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """A new run: no time elapsed, nothing spent."""
        self._start: float | None = None
        self.spent = 0.0
        self.last_cost: float | None = None  # cost of the latest completed snapshot
        self.deferred = 0

    @property
    def enabled(self) -> bool:
        return self.max_overhead is not None

    def start(self) -> None:
        """Training starts (or resumes) now; a resumed run keeps what it has spent."""
        if self._start is None:
            self._start = self._clock()

    def elapsed(self) -> float:
        return 0.0 if self._start is None else self._clock() - self._start

    def limit(self) -> float:
        """Seconds the monitor may have spent by now."""
        if self.max_overhead is None:  # not enabled
            return math.inf
        return self.allowance + self.max_overhead * self.elapsed()

    def charge(self, seconds: float) -> None:
        """Add monitor seconds (training-thread time, or an analysis' wall time)."""
        if seconds > 0:
            self.spent += float(seconds)

    def snapshot_cost(self, seconds: float) -> None:
        """The whole cost of the latest completed snapshot: the next one is expected to cost as much."""
        self.last_cost = float(seconds)

    def allows(self, expected: float | None = None) -> bool:
        """Whether a snapshot expected to cost ``expected`` seconds (default: the latest
        snapshot's cost, or nothing before the first is measured) fits the budget now."""
        if not self.enabled:
            return True
        cost = self.last_cost if expected is None else expected
        return self.spent + (cost or 0.0) <= self.limit()

    def defer(self) -> None:
        self.deferred += 1

    def state_dict(self) -> dict:
        return {"spent": self.spent, "elapsed": self.elapsed(), "deferred": self.deferred, "last_cost": self.last_cost}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the spent and elapsed time carry over, so the budget is that of the whole run."""
        self.spent = float(state.get("spent", 0.0))
        self.deferred = int(state.get("deferred", 0))
        last = state.get("last_cost")
        self.last_cost = None if last is None else float(last)
        self._start = self._clock() - float(state.get("elapsed", 0.0))
