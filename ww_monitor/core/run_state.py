"""Per-run state of a monitor: fresh at each run, saved in checkpoints, restored on resume.

:class:`RunState` (a base of :class:`~ww_monitor.core.engine.MonitorEngine`) holds what one
training run accumulates: the :class:`~ww_monitor.monitoring.history.History`, alert state,
counters (``stats``), the snapshot bookkeeping, and the resumable state dict. The state dict
holds tensors and plain types only, so checkpoints load with ``weights_only=True``; a snapshot
owed at the checkpoint's step is remembered and taken on resume (no gaps, no duplicates).
"""

from __future__ import annotations

from typing import Any

import torch

from ..monitoring.alerts import Alert, AlertTracker
from ..monitoring.analysis_job import AnalysisOutput
from ..monitoring.budget import CostBudget
from ..monitoring.carry import FrozenCarry
from ..monitoring.history import History
from ..outputs.tensorboard_writer import LoggerWriter
from .engine_state import EngineState
from .hooks import rank_zero_warn
from .sinks import Host

__all__ = ["RunState"]

#: Version of the state dict layout (bumped when a field changes meaning).
STATE_VERSION = 1


class RunState(EngineState):
    """The per-run state and its (de)serialisation; the engine supplies the worker and settings."""

    def _new_run(self) -> None:
        """The per-run state, fresh: history, alert state, counters (at construction, and when
        the callback is reused for a new run)."""
        #: Every analysed snapshot (:class:`ww_monitor.monitoring.history.History`).
        self.history = History()
        #: Alert state (``None`` when alerts are off); ``alerts_fired`` lists every alert raised.
        self.alert_tracker = AlertTracker(self._alert_config) if self._alerts_on else None
        self.alerts_fired: list[Alert] = []
        # Its once-per-logger warnings and layouts belong to a run.
        self._writer = LoggerWriter(self.warning_prefix, self.no_logger_message)
        self._next_index = 0
        self._last_step: int | None = None  # step of the last snapshot taken
        self._checked_step: int | None = None  # step-schedule check already done at this step
        self._owed: tuple[int, int] | None = None  # restored: (step, epoch) of a snapshot due at the checkpoint
        self._meta: dict[int, dict] = {}  # snapshot index -> step, epoch, owners, ... until complete
        self._partials: dict[int, dict[int, AnalysisOutput]] = {}  # DDP: index -> {rank: output}
        self._warned_layers: set[str] = set()
        self._reported_selection = False
        #: ``(step, results)`` of the latest completed snapshot (each ``LayerResult`` with its
        #: eigenvalues), e.g. for :class:`ww_monitor.SpectralBalancer`; None before the first.
        self.latest_results: tuple[int, list] | None = None
        self._baseline: dict[str, torch.Tensor] | None = None  # weights at snapshot 0 (distance_from_init)
        self._prev_esd: dict[str, Any] = {}  # layer -> eigenvalues of its previous snapshot (esd_shift)
        #: Estimated analysis seconds of one snapshot on this machine (CPU analysis; :mod:`.cost`).
        self.estimated_snapshot_seconds: float | None = None
        self._schedule = {"last_due": None, "warned": False}
        self._skipped_steps: set[int] = set()  # due steps not taken because the worker lagged
        #: Frozen matrices analysed once and carried forward (off with ``watch_frozen=True``).
        self._carry = FrozenCarry(enabled=not self.watch_frozen)
        # The cost budget (max_overhead). Blocking mode is for a deterministic schedule (tests,
        # debugging): no time-based thinning there.
        self._budget = CostBudget(None if self.blocking else self.max_overhead)
        self.stats: dict[str, Any] = {
            "snapshots_taken": 0,
            "snapshots_skipped": 0,
            "snapshots_failed": 0,
            "copy_seconds": 0.0,
            "analysis_seconds": 0.0,
            "snapshot_bytes": 0,
            "peak_inflight_bytes": 0,
            "layers_analysed_here": 0,
            "lag_waits": 0,
            "train_thread_seconds": 0.0,
            "baseline_bytes": 0,
            "snapshots_deferred": 0,
            "analysis_cpu_seconds": 0.0,
            # frozen matrices (monitoring.carry): how many at the latest snapshot, how many were
            # carried forward instead of copied over the run, and the bytes those copies would be
            "matrices_copied": 0,
            "frozen_layers": 0,
            "layers_carried": 0,
            "carried_bytes": 0,
        }

    def _check_reuse(self, step: int) -> None:
        """A monitor reused for a new run that starts before its history ends: start afresh."""
        last = self.history.steps[-1] if len(self.history) else self._last_step
        if last is not None and step < last:
            # The same callback object passed to a new Trainer: its snapshots would collide with
            # the earlier run's steps and be dropped as duplicates.
            rank_zero_warn(
                f"{self.warning_prefix}: this callback holds {len(self.history)} snapshot(s) up to step {last} "
                f"from an earlier run, and this run starts at step {step}. Starting a new history "
                "(the earlier one is discarded); use one callback per run, or keep `callback.history` before "
                "fitting again.",
                RuntimeWarning,
            )
            self._new_run()

    def _engine_state(self, host: Host | None, owed: tuple[int, int] | None) -> dict[str, Any]:
        """The resumable state; completes the history first (a sync point under DDP)."""
        if self._active and host is not None:
            self._drain(host, kinds=("analysis",), reason="checkpoint")
            self._exchange(host)
        return {
            "version": STATE_VERSION,
            "history": self.history.state_dict(),
            "next_index": self._next_index,
            "last_step": self._last_step,
            "owed": list(owed or []),
            "stats": {k: v for k, v in self.stats.items() if isinstance(v, (int, float))},
            "alerts": self.alert_tracker.state_dict() if self.alert_tracker is not None else {},
            # The previous ESDs, so esd_shift continues across a resume (tensors: weights_only loads).
            "prev_esd": {k: torch.as_tensor(v, dtype=torch.float64) for k, v in self._prev_esd.items()},
            "budget": self._budget.state_dict(),  # spent and elapsed: the budget is the whole run's
            "frozen": self._carry.state_dict(),  # frozen matrices carried forward (names)
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = History()
        self.history.load_state_dict(state_dict.get("history", {}))
        self._next_index = int(state_dict.get("next_index", len(self.history)))
        self._last_step = state_dict.get("last_step")
        owed = state_dict.get("owed") or None
        self._owed = (int(owed[0]), int(owed[1])) if owed else None
        if self.alert_tracker is not None and state_dict.get("alerts"):
            self.alert_tracker.load_state_dict(state_dict["alerts"])
        self._prev_esd = {k: torch.as_tensor(v).double().numpy() for k, v in state_dict.get("prev_esd", {}).items()}
        if state_dict.get("budget"):
            self._budget.load_state_dict(state_dict["budget"])
        self._carry.load_state_dict(state_dict.get("frozen", ()))
        for k in (
            "snapshots_taken",
            "snapshots_skipped",
            "snapshots_failed",
            "snapshots_deferred",
            "layers_carried",
            "carried_bytes",
        ):  # run totals, not per rank
            if k in state_dict.get("stats", {}):
                self.stats[k] = int(state_dict["stats"][k])
