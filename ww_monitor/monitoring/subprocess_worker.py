"""A worker in a child interpreter started with ``python -c``: :class:`SubprocessWorker`.

It never re-imports the user's script (unlike a spawned process), so it is what renders figures:
pure-Python matplotlib work that would otherwise hold the GIL against the training loop. Jobs
are pickled to its stdin and results read from its stdout, one at a time, in order.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import IO, Any, cast

from .worker import JobResult, _BaseWorker, _run_job

__all__ = ["SubprocessWorker"]


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
    """One child interpreter (``python -c``) running jobs in order.

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
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the child; closed in close())
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from ww_monitor.monitoring.subprocess_worker import _subprocess_main; _subprocess_main()",
                str(int(nice or 0)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
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
                stdin = cast(IO[bytes], self._proc.stdin)  # stdin=PIPE: never None
                pickle.dump(item, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.flush()
                if item is None:
                    stdin.close()
            except (OSError, ValueError, AttributeError, TypeError, pickle.PicklingError) as err:
                if item is not None:
                    self._complete(JobResult(item[0], item[1], item[2], error=f"could not send the job: {err}"))
            if item is None:
                return

    def _read_loop(self) -> None:
        import pickle

        while True:
            try:
                result = pickle.load(cast(IO[bytes], self._proc.stdout))  # stdout=PIPE: never None
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
