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
* :class:`SubprocessWorker` runs jobs in a child interpreter started with ``python -c`` (it
  never re-imports the user's script); used for figure rendering, which is pure-Python
  matplotlib work that would otherwise hold the GIL against the training loop.

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
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .device import analysis_stream, is_out_of_memory, on_stream, staging_budget
from ..analysis.results import LayerResult, SkippedLayer
from .snapshot import Snapshot

__all__ = [
    "AnalysisOutput",
    "JobResult",
    "InlineWorker",
    "ThreadWorker",
    "ProcessWorker",
    "SubprocessWorker",
    "analyze_snapshot",
    "analyze_on_device",
    "run_with_cpu_fallback",
    "configure_current_thread",
    "failed_analysis",
    "make_worker",
]

log = logging.getLogger(__name__)


@dataclass
class AnalysisOutput:
    """One rank's analysis of one snapshot (its share of the layers)."""

    index: int
    step: int
    epoch: int
    rank: int
    results: list[LayerResult] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    seconds: float = 0.0
    nbytes: int = 0
    error: str | None = None
    #: ESD histograms by layer name, binned here so the training thread only writes them.
    histograms: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    job_id: int
    kind: str
    key: Any
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


#: The analysis is fed groups of matrices whose float64 copies stay below this many bytes.
#: Small layers still share batched eigensolver calls, while the float64 working memory
#: (stacked copy, Gram matrix, eigensolver workspace) stays a small multiple of one group
#: instead of the whole model.
CHUNK_BYTES = 32 * 1024 * 1024


def _chunks(matrices, limit: int):
    group, size = [], 0
    for m in matrices:
        b = m.weight.numel() * 8
        if group and size + b > limit:
            yield group
            group, size = [], 0
        group.append(m)
        size += b
    if group:
        yield group


def analyze_snapshot(snapshot: Snapshot, config, rank: int = 0, chunk_bytes: int = CHUNK_BYTES,
                     histograms: bool = False, baseline: dict | None = None,
                     device: str | None = None) -> AnalysisOutput:
    """The analysis job: metrics of every matrix in ``snapshot`` (and, with ``histograms``, the
    binned ESD of each for TensorBoard); frees the snapshot's buffers when done. With
    ``baseline`` ({layer: weights at the baseline snapshot}) each result also gets
    ``distance_from_init = ||W - W_0||_F / ||W_0||_F``. ``device`` (e.g. ``"cuda:0"``) runs the
    eigensolves there (:func:`analyze_on_device`)."""
    from ..functional.distances import relative_distance
    from ..outputs.tensorboard_writer import esd_histogram

    t0 = time.perf_counter()
    nbytes = snapshot.nbytes
    try:
        with torch.no_grad():
            matrices = snapshot.matrices()
            results, skipped = analyze_on_device(matrices, config, torch.device(device or "cpu"), chunk_bytes)
            if baseline:
                current = {m.name: m.weight for m in matrices}
                for r in results:
                    ref = baseline.get(r.name)
                    if ref is not None and r.name in current and tuple(ref.shape) == tuple(current[r.name].shape):
                        r.distance_from_init = relative_distance(ref, current[r.name])
    finally:
        snapshot.release()
    hists = {r.name: esd_histogram(r.eigenvalues) for r in results} if histograms else {}
    return AnalysisOutput(
        index=snapshot.index, step=snapshot.step, epoch=snapshot.epoch, rank=rank, results=results,
        skipped=skipped, seconds=time.perf_counter() - t0, nbytes=nbytes, histograms=hists,
    )


def analyze_on_device(matrices, config, device: torch.device, chunk_bytes: int = CHUNK_BYTES):
    """Analyse ``matrices`` in groups on ``device``; only eigenvalues come back to the host.

    Groups are bounded by ``chunk_bytes`` of float64 copies and, on a GPU, by half of the
    staging budget (:func:`~ww_monitor.monitoring.device.staging_budget`: the copy plus its Gram and
    workspace). Each group is moved to the device (if the snapshot is elsewhere) and solved on
    the low-priority analysis stream. An out-of-memory failure sends that group and the rest of
    the snapshot to the CPU, with a warning.
    """
    from ..analysis.analyze import analyze_matrices

    budget = staging_budget(device)
    limit = chunk_bytes if budget is None else max(1, min(chunk_bytes * _DEVICE_CHUNK_FACTOR, budget // 2))
    stream = analysis_stream(device)
    cpu = torch.device("cpu")
    results, skipped = [], []
    for group in _chunks(matrices, limit):
        if device != cpu:
            def on_device(group=group):
                with on_stream(stream):
                    res, skip = analyze_matrices([_moved(m, device) for m in group], config)
                # analyze_matrices reports a failed eigensolve as a skipped layer: an OOM among them
                # means the group did not fit, not that the weights are bad.
                oom = [s.reason for s in skip if is_out_of_memory(s.reason)]
                if oom:
                    raise MemoryError(oom[0])
                return res, skip

            out = run_with_cpu_fallback(on_device, str(device))
            if out is None:
                device = cpu
        if device == cpu:
            out = analyze_matrices([_moved(m, cpu) for m in group], config)
        results.extend(out[0])
        skipped.extend(out[1])
    return results, skipped


#: On a GPU a group may hold this many times ``CHUNK_BYTES``: bigger batches keep the device busy
#: (within the staging budget, which bounds it first on small cards).
_DEVICE_CHUNK_FACTOR = 8


def run_with_cpu_fallback(job, where: str):
    """``job()``, or ``None`` with a warning when it ran out of memory (the caller goes to CPU)."""
    try:
        return job()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        warnings.warn(f"ww_monitor: the analysis ran out of memory on {where}; the rest of this snapshot is "
                      f"analysed on the CPU ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _moved(m, device: torch.device):
    from ..analysis.layers import LayerMatrix

    if m.weight.device == device:
        return m
    return LayerMatrix(m.name, m.kind, m.weight.to(device, non_blocking=True), m.eig_scale)


def failed_analysis(index: int, step: int, epoch: int, rank: int, error: str) -> AnalysisOutput:
    """The result of a snapshot that could not be taken (so every rank still reports it)."""
    return AnalysisOutput(index=index, step=step, epoch=epoch, rank=rank, error=error)


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
    t0 = time.perf_counter()
    try:
        value = fn(*args)
        return JobResult(job_id, kind, key, value=value, seconds=time.perf_counter() - t0)
    except Exception as err:  # reported to the training thread as a warning, never raised there
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        log.debug("background job %s %r failed:\n%s", kind, key, traceback.format_exc())
        return JobResult(job_id, kind, key, error=detail, seconds=time.perf_counter() - t0)


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
            keep, out = deque(), []
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
        if limit:
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

    def __init__(self, num_threads: int | None = 1, nice: int | None = 10, name: str = "ww-monitor-worker",
                 idle: bool = False):
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
            target=_process_main, args=(self._jobs, self._results, num_threads, nice, idle),
            name="ww-monitor-worker", daemon=True,
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
                self._complete(JobResult(job_id, kind, None, error=f"worker process died (exit code {self._proc.exitcode})"))

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


def _subprocess_main() -> None:  # pragma: no cover - runs in the child
    """Entry point of :class:`SubprocessWorker`'s child: pickled jobs on stdin, results on stdout."""
    import pickle
    import sys

    if len(sys.argv) > 1 and int(sys.argv[1]):
        try:
            os.nice(int(sys.argv[1]))
        except OSError:
            pass
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the result stream
    while True:
        try:
            item = pickle.load(stdin)
        except EOFError:
            return
        if item is None:
            return
        job_id, kind, key, payload = item
        try:
            fn, args = pickle.loads(payload)
        except Exception as err:  # e.g. a function this interpreter cannot import
            result = JobResult(job_id, kind, key, error=f"could not load the job: {type(err).__name__}: {err}")
        else:
            result = _run_job(job_id, kind, key, fn, args)
            del fn, args
        pickle.dump(result, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()
        del item, payload


class SubprocessWorker(_BaseWorker):
    """One child interpreter (``python -m ww_monitor.monitoring.worker``) running jobs in order.

    For GIL-heavy jobs that must not compete with the training loop for the interpreter
    (matplotlib figure rendering). Unlike :class:`ProcessWorker` it does not re-import the
    user's ``__main__`` module, so it is safe in scripts without a main guard. Jobs and
    results are pickled through pipes by two daemon threads, so :meth:`submit` never blocks.
    """

    mode = "subprocess"

    def __init__(self, num_threads: int | None = 1, nice: int | None = 10):
        super().__init__()
        import subprocess
        import sys

        import tempfile

        env = dict(os.environ)
        if num_threads:
            env.update(OMP_NUM_THREADS=str(num_threads), MKL_NUM_THREADS=str(num_threads))
        # The child's stderr (library warnings, e.g. matplotlib's) goes to a private file, not the
        # user's terminal; its tail is reported if the child dies.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from ww_monitor.monitoring.worker import _subprocess_main; _subprocess_main()",
             str(int(nice or 0))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
        )
        self._outbox: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="ww-monitor-subprocess-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="ww-monitor-subprocess-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    def _write_loop(self) -> None:
        import pickle

        while True:
            item = self._outbox.get()
            try:
                if item is not None:  # the job body separately, so the child can report what it cannot load
                    job_id, kind, key, fn, args = item
                    item = (job_id, kind, key, pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL))
                pickle.dump(item, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self._proc.stdin.flush()
                if item is None:
                    self._proc.stdin.close()
            except (OSError, ValueError, AttributeError, TypeError, pickle.PicklingError) as err:
                if item is not None:
                    self._complete(JobResult(item[0], item[1], item[2], error=f"could not send the job: {err}"))
            if item is None:
                return

    def _read_loop(self) -> None:
        import pickle

        while True:
            try:
                result = pickle.load(self._proc.stdout)
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                break
            self._complete(result)
        with self._lock:  # the child is gone: whatever is pending will not come back
            lost = [(i, k) for i, (k, _) in self._pending.items()]
        detail = self._stderr_tail() if lost else ""
        for job_id, kind in lost:
            self._complete(JobResult(job_id, kind, None, error="worker subprocess ended" + detail))

    def _stderr_tail(self, limit: int = 500) -> str:
        """The end of the child's stderr, for an error message ('' when empty or unreadable)."""
        try:
            self._proc.wait(1.0)
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            text = self._stderr.read().decode("utf-8", "replace").strip()
        except Exception:
            return ""
        return f": {text.splitlines()[-1]}" if text else ""

    def submit(self, kind: str, key: Any, fn: Callable, args: tuple = (), nbytes: int = 0) -> int:
        if self.closed:
            raise RuntimeError("worker is closed")
        job_id = self._register(kind, nbytes)
        self._outbox.put((job_id, kind, key, fn, args))
        return job_id

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self, timeout: float = 10.0, cancel: bool = False) -> bool:
        if not self.closed:
            self.closed = True
            self._outbox.put(None)
        if cancel:
            self._proc.kill()
        try:
            self._proc.wait(timeout)
        except Exception:
            self._proc.kill()
            try:
                self._proc.wait(1.0)
            except Exception:
                pass
        self._writer.join(1.0)
        self._reader.join(1.0)
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):  # no unclosed-file warnings
            try:
                if stream is not None:
                    stream.close()
            except Exception:
                pass
        return self._proc.poll() is not None


def make_worker(mode: str, num_threads: int | None = 1, nice: int | None = 10, idle: bool = False):
    """``"inline"`` | ``"thread"`` | ``"process"``."""
    if mode == "inline":
        return InlineWorker(num_threads=num_threads)
    if mode == "thread":
        return ThreadWorker(num_threads=num_threads, nice=nice, idle=idle)
    if mode == "process":
        return ProcessWorker(num_threads=num_threads, nice=nice, idle=idle)
    if mode == "subprocess":
        return SubprocessWorker(num_threads=num_threads, nice=nice)
    raise ValueError(f"unknown worker mode {mode!r}; choose 'inline', 'thread', 'process' or 'subprocess'")
