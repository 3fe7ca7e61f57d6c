"""What every front door's hooks share: rank-zero warnings (and how much one lists) and the
training-thread timer."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from ..user_warnings import warn_user

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["MAX_LISTED", "rank_zero_warn", "on_training_thread", "training_thread_time"]

#: Layer names / skipped steps listed in one warning at most (the rest are counted).
MAX_LISTED = 20


def rank_zero_warn(message: str, category=UserWarning) -> None:
    """Warn once per process group (rank 0), attributed to the user's line, not to ours. The rank
    is Lightning's where Lightning set it, else that of ``torch.distributed``'s default group
    (plain ``torchrun`` loops, the Hugging Face Trainer)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        warn_user(message, category)


def on_training_thread(hook: Callable[P, R]) -> Callable[P, R]:
    """Adds the hook's wall time to ``stats["train_thread_seconds"]``: what the monitor costs the
    training thread directly (copies, logging, waits), as opposed to CPU the worker shares."""

    @functools.wraps(hook)
    def timed(*args: P.args, **kwargs: P.kwargs) -> R:
        with training_thread_time(args[0]):  # args[0]: the engine (self)
            return hook(*args, **kwargs)

    return timed


@contextlib.contextmanager
def training_thread_time(engine):
    """Time a front door's work on the training thread into ``stats["train_thread_seconds"]``
    (:func:`on_training_thread` for hooks that are methods of the engine; this for front doors
    whose hooks are not, such as the Hugging Face callback). (The cost budget is charged where its decisions make a difference:
    a snapshot's copy, logging and waits, and its analysis; the per-step polling is a fixed cost
    no deferral would lower.)"""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        engine.stats["train_thread_seconds"] += time.perf_counter() - t0
