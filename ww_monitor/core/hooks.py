"""What every front door's hooks share: rank-zero warnings (and how much one lists) and the
training-thread timer."""

from __future__ import annotations

import contextlib
import functools
import time

from ..user_warnings import warn_user

__all__ = ["MAX_LISTED", "rank_zero_warn", "on_training_thread", "periodic_cost", "periodic_hook"]

#: Layer names / skipped steps listed in one warning at most (the rest are counted).
MAX_LISTED = 20


def rank_zero_warn(message: str, category=UserWarning) -> None:
    """Warn once per process group (rank 0), attributed to the user's line, not to ours."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        warn_user(message, category)


def on_training_thread(hook):
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


@contextlib.contextmanager
def periodic_cost(engine):
    """Time a front door's work during training (after a step, at an epoch's end) on the
    training thread: added to ``stats["train_thread_seconds"]`` and charged to the cost budget
    (:mod:`ww_monitor.monitoring.budget`): polling, copies, logging and waits alike. A call that
    starts or ends the run is not charged: those are the run's fixed costs."""
    t0, active = time.perf_counter(), engine._active
    try:
        yield
    finally:
        spent = time.perf_counter() - t0
        engine.stats["train_thread_seconds"] += spent
        if active and engine._active:
            engine._budget.charge(spent)


def periodic_hook(hook):
    """:func:`periodic_cost` around a front door's method (``self`` is the engine)."""

    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        with periodic_cost(self):
            return hook(self, *args, **kwargs)

    return timed
