"""When and where :class:`~ww_monitor.WeightWatcherCallback` renders figures, at a bounded cost.

Rendering (alpha per layer, ESDs with fits, phase heatmap) is pure-Python matplotlib work: in a
thread of the training process it would hold the GIL against the training loop (measured: it
doubled the quickstart's training time), so it runs in a child interpreter
(:class:`~ww_monitor.monitoring.subprocess_worker.SubprocessWorker`), or in the analysis process when
``worker_type="process"``. The rules that keep its cost bounded:

* **Only when the figures can be stored**: rank 0, with a TensorBoard logger (CSV, MLflow and
  W&B loggers receive scalars only, so rendering for them would be wasted work).
* **Only in runs long enough to pay for it** (``min_run_seconds``, default 60 s): the child's
  start-up (Python, torch and matplotlib imports) costs 3-5 CPU-seconds, as much as a short
  run's whole training on a small machine. Figures of the snapshots before that are not drawn
  (``ww-monitor report`` draws them offline from the logs). Once the time has passed the
  renderer is started in advance, at low priority, so it is warm when a figure is due.
* **Bounded wait at train end**: the final snapshot's figures are waited for at most
  ``figures_timeout`` seconds (default :data:`FINAL_FIGURES_TIMEOUT`, or ``drain_timeout`` if
  smaller); what is not done by then is dropped with a warning.
* **Blocking mode** renders in the child as well and waits for each render, so matplotlib's
  caches grow in the child, not in the training process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .tensorboard_writer import choose_figure_layers, is_tensorboard_logger, render_figures, strip_eigenvalues

if TYPE_CHECKING:
    from ..monitoring.subprocess_worker import SubprocessWorker

__all__ = ["FigurePipeline", "FINAL_FIGURES_TIMEOUT", "DEFAULT_MIN_RUN_SECONDS"]

log = logging.getLogger(__name__)

#: Default ``figures_timeout``: most seconds the training thread waits at train end for the final
#: figures. A warm renderer needs about 1-2 s for them; a cold one (start-up included) 3-6 s on a
#: busy 2-core machine.
FINAL_FIGURES_TIMEOUT = 10.0
#: Default ``figures_min_run_seconds``: with ~5 CPU-seconds of renderer start-up and ~1-2 s per
#: render, figures then cost at most a few percent of a run's CPU time on two cores.
DEFAULT_MIN_RUN_SECONDS = 60.0


class FigurePipeline:
    """Schedules figure renders for one run (see the module docs for the rules)."""

    def __init__(
        self,
        every_n_snapshots: int | None,
        layers,
        max_layers: int,
        min_run_seconds: float,
        nice: int,
        blocking: bool,
        drain_timeout: float,
        timeout: float = FINAL_FIGURES_TIMEOUT,
    ):
        self.every_n_snapshots = every_n_snapshots
        self.layers = layers
        self.max_layers = max_layers
        self.min_run_seconds = float(min_run_seconds)
        self.nice = nice
        self.blocking = blocking
        self.drain_timeout = drain_timeout
        self.timeout = timeout
        self._renderer: SubprocessWorker | None = None  # the child interpreter, started on demand
        self._process_worker: Any = None  # the analysis worker, when it is a process (renders there)
        #: (step, results, esd layers) of the latest snapshot without figures
        self._pending: tuple[int, list, list[str]] | None = None
        self._t0 = time.monotonic()

    # run lifecycle ---------------------------------------------------------
    def start(self, analysis_worker) -> None:
        self._t0 = time.monotonic()
        self._pending = None
        mode = getattr(analysis_worker, "mode", None)
        self._process_worker = analysis_worker if mode == "process" else None

    def close(self, cancel: bool) -> None:
        renderer, self._renderer = self._renderer, None
        self._process_worker = None
        if renderer is not None:
            renderer.close(timeout=5.0, cancel=cancel)

    @property
    def started(self) -> bool:
        return self._renderer is not None

    # decisions -------------------------------------------------------------
    def wanted(self, loggers) -> bool:
        """Figures are on and a logger can store them."""
        return bool(self.every_n_snapshots) and any(is_tensorboard_logger(lg) for lg in loggers)

    def ripe(self) -> bool:
        """The run has trained long enough for figures to be cheap relative to it."""
        return time.monotonic() - self._t0 >= self.min_run_seconds

    def due(self, index: int, final: bool) -> bool:
        n = self.every_n_snapshots
        if not n:
            return False
        return final or index % n == 0

    def _worker(self, start: bool):
        if self._process_worker is not None:
            return self._process_worker
        if self._renderer is None and start:
            from ..monitoring.subprocess_worker import SubprocessWorker

            self._renderer = SubprocessWorker(num_threads=1, nice=self.nice)
        return self._renderer

    def warm_up(self, loggers) -> None:
        """Start the renderer ahead of the first figure snapshot once figures are worth it
        (cheap to call at every hook)."""
        if self._renderer is None and self._process_worker is None and self.ripe() and self.wanted(loggers):
            self._worker(start=True)

    # work ------------------------------------------------------------------
    def offer(self, step: int, results, loggers, submit: bool, grids: Callable) -> None:
        """A complete snapshot: keep it as the latest without figures; render it when ``submit``."""
        if not results or not self.wanted(loggers):
            return
        esd = choose_figure_layers([r.name for r in results], self.layers, self.max_layers, results)
        self._pending = (step, strip_eigenvalues(results, esd), esd)
        if submit:
            self.submit(grids)

    def submit(self, grids: Callable) -> None:
        """Render the latest snapshot without figures (if figures are worth it by now);
        ``grids(layer_names)`` gives the heatmaps' ``(phase_grid, alpha_grid)`` over the history."""
        if self._pending is None or not self.ripe():
            return
        worker = self._worker(start=True)
        step, results, esd = self._pending
        self._pending = None
        worker.submit("figures", step, render_figures, (results, esd, *grids([r.name for r in results])))
        if self.blocking:
            worker.wait(timeout=self.drain_timeout, kinds=("figures",))

    def finish(self) -> bool:
        """Wait (bounded) for outstanding renders; False if some did not finish in time."""
        worker = self._worker(start=False)  # never start a renderer just to wait on it
        if worker is None:
            return True
        return worker.wait(timeout=min(self.drain_timeout, self.timeout), kinds=("figures",))

    def collect(self, warn: Callable[[str], None]):
        """Finished renders as ``(step, images)``; failures go to ``warn``."""
        worker = self._worker(start=False)
        if worker is None:
            return []
        out = []
        for job in worker.poll(("figures",)):
            if job.error is not None:
                warn(f"rendering figures for step {job.key} failed: {job.error}")
                continue
            images, errors = job.value
            for e in errors:
                warn(f"figure failed at step {job.key}: {e}")
            out.append((job.key, images))
        return out
