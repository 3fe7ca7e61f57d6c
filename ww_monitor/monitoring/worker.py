"""Background analysis: run snapshot analyses (and figure rendering) off the training thread.

Three interchangeable workers share one small interface (``submit`` / ``poll`` / ``wait`` /
``close``):

* :class:`InlineWorker` runs each job at once on the calling (training) thread. Deterministic;
  used for ``background=False``.
* :class:`ThreadWorker` runs jobs in one daemon thread, FIFO. The heavy parts of the analysis
  (float64 GEMM, ``eigvalsh``, vectorised numpy) release the GIL, so training keeps running.
  On a machine with few cores the worker competes with training for CPU; by default it uses
  **one** intra-op thread and a raised nice value (lower scheduling priority) so that it takes
  what training leaves idle rather than slowing it down. ``torch.set_num_threads`` is
  process-wide in PyTorch's bookkeeping but OpenMP/MKL thread counts are per calling thread:
  :func:`configure_current_thread` sets the count for the worker thread only and restores the
  process-wide default for threads created later.
* :class:`ProcessWorker` runs jobs in one spawned daemon process (no GIL sharing at all). The
  snapshot buffers are allocated in shared memory, so sending one costs no copy. Scripts
  using it need the usual ``if __name__ == "__main__":`` guard.
* :class:`~ww_monitor.monitoring.subprocess_worker.SubprocessWorker` runs jobs in a child
  interpreter started with ``python -c`` (it never re-imports the user's script); used for
  figure rendering, which is pure-Python matplotlib work that would otherwise hold the GIL.

The job itself (one snapshot's analysis) is :mod:`ww_monitor.monitoring.analysis_job`.

Job exceptions never propagate: they come back as a :class:`JobResult` with ``error`` set,
which the callback turns into a warning.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

__all__ = [
    "JobResult",
    "InlineWorker",
    "ThreadWorker",
    "ProcessWorker",
    "configure_current_thread",
    "make_worker",
]

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    job_id: int
    kind: str
    key: Any
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    #: CPU time of the thread that ran the job: what it took from training's cores.
    cpu_seconds: float = 0.0


def _threads_for_new_threads() -> int:
    """The intra-op thread count a newly created thread starts with."""
    box = []
    t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
    t.start()
    t.join()
    return box[0]


def configure_current_thread(num_threads: int | None, nice: int | None, idle: bool = False) -> None:
    """Limit the calling thread's intra-op threads and lower its scheduling priority.

    Only the calling thread is affected: other threads keep their OpenMP/MKL thread counts,
    and the process-wide default that new threads start from is put back. ``nice`` raises the
    thread's nice value by that much on Linux (a thread-level attribute there); ``idle`` puts
    the thread in Linux's ``SCHED_IDLE`` class (it runs only on CPU time nothing else wants).
    Elsewhere, and on failure, these are ignored.
    """
    if num_threads is not None and num_threads > 0:
        default_for_new = _threads_for_new_threads()
        torch.get_num_threads()  # initialise this thread's pool size before changing it
        torch.set_num_threads(num_threads)
        if default_for_new != num_threads:
            t = threading.Thread(target=torch.set_num_threads, args=(default_for_new,))
            t.start()
            t.join()
    if nice:
        try:
            tid = threading.get_native_id()
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, current + int(nice)))
        except (AttributeError, OSError) as err:  # not Linux, or not permitted
            log.debug("could not lower the analysis thread's priority: %s", err)
    if idle:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError) as err:
            log.debug("could not put the analysis thread in SCHED_IDLE: %s", err)


def _run_job(job_id: int, kind: str, key: Any, fn: Callable, args: tuple) -> JobResult:
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        value = fn(*args)
        return JobResult(
            job_id, kind, key, value=value, seconds=time.perf_counter() - t0, cpu_seconds=time.thread_time() - c0
        )
    except Exception as err:  # reported to the training thread as a warning, never raised there
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        log.debug("background job %s %r failed:\n%s", kind, key, traceback.format_exc())
        return JobResult(
            job_id, kind, key, error=detail, seconds=time.perf_counter() - t0, cpu_seconds=time.thread_time() - c0
        )


class _BaseWorker:
    """Bookkeeping shared by the workers: pending counts by kind and bytes in flight."""

    mode = "base"

    def __init__(self):
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._pending: dict[int, tuple[str, int]] = {}  # job id -> (kind, bytes held)
        self._done: deque[JobResult] = deque()
        self.inflight_bytes = 0
        self.peak_inflight_bytes = 0
        self.closed = False

    def pending(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for k, _ in self._pending.values() if kind is None or k == kind)

    def _register(self, kind: str, nbytes: int) -> int:
        job_id = next(self._ids)
        with self._lock:
            self._pending[job_id] = (kind, nbytes)
            self.inflight_bytes += nbytes
            self.peak_inflight_bytes = max(self.peak_inflight_bytes, self.inflight_bytes)
        return job_id

    def _complete(self, result: JobResult) -> None:
        with self._lock:
            _, nbytes = self._pending.pop(result.job_id, (None, 0))
            self.inflight_bytes -= nbytes
            self._done.append(result)
            self._lock.notify_all()

    def poll(self, kinds: tuple[str, ...] | None = None) -> list[JobResult]:
        """Finished jobs (of ``kinds``, default all), oldest first; each is returned once."""
        self._pump()
        with self._lock:
            keep: deque[JobResult] = deque()
            out: list[JobResult] = []
            while self._done:
                r = self._done.popleft()
                (out if kinds is None or r.kind in kinds else keep).append(r)
            self._done = keep
        return out

    def _pump(self) -> None:
        """Move results from the transport into ``_done`` (process worker)."""

    def wait(self, timeout: float | None = None, kinds: tuple[str, ...] | None = None) -> bool:
        """Block until no job of ``kinds`` is pending; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._pump()
            with self._lock:
                busy = any(kinds is None or k in kinds for k, _ in self._pending.values())
                if not busy:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(0.05 if remaining is None else min(0.05, remaining))


class InlineWorker(_BaseWorker):
    """Runs every job immediately on the calling thread, with ``num_threads`` intra-op threads
    for its duration (the caller's count is restored afterwards)."""

    mode = "inline"

    def __init__(self, num_threads: int | None = None):
        super().__init__()
        self.num_threads = num_threads

    def submit(self, kind: str, key: Any, fn: Callable, args: tuple = (), nbytes: int = 0) -> int:
        job_id = self._register(kind, nbytes)
        previous = torch.get_num_threads()
        limit = self.num_threads is not None and self.num_threads != previous
        if limit and self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            result = _run_job(job_id, kind, key, fn, args)
        finally:
            if limit:
                torch.set_num_threads(previous)
        self._complete(result)
        return job_id

    def close(self, timeout: float = 0.0, cancel: bool = False) -> bool:
        self.closed = True
        return True


#: Lower runs first in the thread worker: analyses (which hold weight copies and which DDP
#: ranks wait for) go before figure rendering.
PRIORITY = {"analysis": 0}


class ThreadWorker(_BaseWorker):
    """One daemon thread running jobs by kind priority (analyses first), then in submission order."""

    mode = "thread"

    def __init__(
        self, num_threads: int | None = 1, nice: int | None = 10, name: str = "ww-monitor-worker", idle: bool = False
    ):
        super().__init__()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(num_threads, nice, idle), name=name, daemon=True)
        self._thread.start()

    def _loop(self, num_threads, nice, idle) -> None:
        try:
            configure_current_thread(num_threads, nice, idle)
        except Exception as err:  # never fatal
            log.debug("could not configure the analysis thread: %s", err)
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            job_id, kind, key, fn, args = item
            del item
            if self._cancel.is_set():
                result = JobResult(job_id, kind, key, error="cancelled")
            else:
                try:
                    result = _run_job(job_id, kind, key, fn, args)
                except BaseException as err:  # e.g. SystemExit from a library: must not kill the
                    # thread and leave the job pending until drain_timeout (the inline worker,
                    # on the training thread, lets these through so Ctrl-C still works).
                    result = JobResult(job_id, kind, key, error=f"{type(err).__name__}: {err}")
            del fn, args  # drop the snapshot before reporting, so its memory is free
            self._complete(result)

    def submit(self, kind: str, key: Any, fn: Callable, args: tuple = (), nbytes: int = 0) -> int:
        if self.closed:
            raise RuntimeError("worker is closed")
        job_id = self._register(kind, nbytes)
        self._queue.put((PRIORITY.get(kind, 1), job_id, (job_id, kind, key, fn, args)))
        return job_id

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0, cancel: bool = False) -> bool:
        """Stop the thread (after the queued jobs unless ``cancel``); True if it has ended."""
        if cancel:
            self._cancel.set()
        if not self.closed:
            self.closed = True
            self._queue.put((math.inf, math.inf, None))  # after every queued job
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _process_main(jobs, results, num_threads, nice, idle=False) -> None:  # pragma: no cover - in the child
    configure_current_thread(num_threads, None, idle)
    if nice:
        try:
            os.nice(int(nice))
        except OSError:
            pass
    while True:
        item = jobs.get()
        if item is None:
            return
        job_id, kind, key, fn, args = item
        results.put(_run_job(job_id, kind, key, fn, args))
        del item, fn, args


class ProcessWorker(_BaseWorker):
    """One spawned daemon process running jobs in submission order (no GIL contention)."""

    mode = "process"

    def __init__(self, num_threads: int | None = 1, nice: int | None = 10, idle: bool = False):
        super().__init__()
        import multiprocessing

        import torch.multiprocessing  # noqa: F401  registers shared-memory pickling of tensors

        ctx = multiprocessing.get_context("spawn")
        self._jobs = ctx.Queue()
        self._results = ctx.Queue()
        self._held: dict[int, tuple] = {}  # keep args alive until the child has answered
        self._proc = ctx.Process(
            target=_process_main,
            args=(self._jobs, self._results, num_threads, nice, idle),
            name="ww-monitor-worker",
            daemon=True,
        )
        self._proc.start()

    def submit(self, kind: str, key: Any, fn: Callable, args: tuple = (), nbytes: int = 0) -> int:
        if self.closed:
            raise RuntimeError("worker is closed")
        job_id = self._register(kind, nbytes)
        self._held[job_id] = args
        self._jobs.put((job_id, kind, key, fn, args))
        return job_id

    def _pump(self) -> None:
        while True:
            try:
                result = self._results.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                break
            self._held.pop(result.job_id, None)
            self._complete(result)
        if not self._proc.is_alive() and not self.closed:
            with self._lock:
                lost = [(i, k) for i, (k, _) in self._pending.items()]
            for job_id, kind in lost:
                self._held.pop(job_id, None)
                self._complete(
                    JobResult(job_id, kind, None, error=f"worker process died (exit code {self._proc.exitcode})")
                )

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self, timeout: float = 10.0, cancel: bool = False) -> bool:
        if not self.closed:
            self.closed = True
            try:
                self._jobs.put(None)
            except (OSError, ValueError):
                pass
        if cancel:
            self._proc.join(min(timeout, 1.0))
            if self._proc.is_alive():
                self._proc.terminate()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(1.0)
        self._held.clear()
        for q in (self._jobs, self._results):
            q.cancel_join_thread()
            q.close()
        return not self._proc.is_alive()


if TYPE_CHECKING:  # the subprocess worker imports this module
    from typing import TypeAlias

    from .subprocess_worker import SubprocessWorker

    #: Any worker :func:`make_worker` builds.
    Worker: TypeAlias = InlineWorker | ThreadWorker | ProcessWorker | SubprocessWorker


def make_worker(mode: str, num_threads: int | None = 1, nice: int | None = 10, idle: bool = False) -> Worker:
    """``"inline"`` | ``"thread"`` | ``"process"``."""
    if mode == "inline":
        return InlineWorker(num_threads=num_threads)
    if mode == "thread":
        return ThreadWorker(num_threads=num_threads, nice=nice, idle=idle)
    if mode == "process":
        return ProcessWorker(num_threads=num_threads, nice=nice, idle=idle)
    if mode == "subprocess":
        from .subprocess_worker import SubprocessWorker

        return SubprocessWorker(num_threads=num_threads, nice=nice)
    raise ValueError(f"unknown worker mode {mode!r}; choose 'inline', 'thread', 'process' or 'subprocess'")
