"""The attributes the engine's parts share, declared once with their types.

:class:`~ww_monitor.core.engine.MonitorEngine` is assembled from mixins (:mod:`.run_state`,
:mod:`.completion`, :mod:`.thinning`, :mod:`.selection_report`, :mod:`.planning`), each of which
reads attributes that the engine's ``__init__`` or another mixin sets. :class:`EngineState` is
their common base: it declares those attributes (annotations only: nothing is set here, so it
changes nothing at run time) so that each mixin type-checks on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..analysis.selection import AnalysisConfig
    from ..monitoring.alerts import Alert, AlertConfig, AlertTracker
    from ..monitoring.analysis_job import AnalysisOutput
    from ..monitoring.budget import CostBudget
    from ..monitoring.carry import FrozenCarry
    from ..monitoring.distributed import Collectives
    from ..monitoring.history import History
    from ..monitoring.snapshot import Snapshot
    from ..monitoring.worker import Worker
    from ..outputs.figure_pipeline import FigurePipeline
    from ..outputs.tensorboard_writer import LoggerWriter

__all__ = ["EngineState"]


class EngineState:
    """Declarations only (see the module docstring); where each attribute is set is said below."""

    # Class attributes of the front door (engine.MonitorEngine and its subclasses).
    warning_prefix: str
    no_logger_message: str

    # The validated arguments: settings.MonitorSettings' public fields, set by MonitorEngine.__init__.
    config: AnalysisConfig
    every_n_epochs: int | None
    every_n_train_steps: int | None
    background: bool
    blocking: bool
    worker_type: str
    worker_threads: int | None
    worker_nice: int
    worker_idle: bool
    max_pending: int
    on_lag: str
    log_histograms: bool
    log_text: bool
    log_callback_metrics: bool
    figures_every_n_snapshots: int | None
    figure_layers: tuple[str, ...] | None
    max_figure_layers: int
    figures_min_run_seconds: float
    figures_timeout: float
    analysis_device: str
    drain_timeout: float
    on_alert: Callable[[Alert], None] | None
    distance_from_init: bool
    esd_shift: bool
    summary_include_unreliable: bool
    max_overhead: float | None
    watch_frozen: bool
    ends_only: bool

    # Engine-wide state (MonitorEngine.__init__ and _start_run).
    _alert_config: AlertConfig
    _alerts_on: bool
    _figures: FigurePipeline
    _worker: Worker | None
    _active: bool
    _rank: int
    _world: int
    _collectives: Collectives
    _guard: Snapshot | None  # snapshot with in-flight CUDA copies

    # Per-run state (run_state.RunState._new_run).
    history: History
    alert_tracker: AlertTracker | None
    alerts_fired: list[Alert]
    latest_results: tuple[int, list] | None
    estimated_snapshot_seconds: float | None
    stats: dict[str, Any]
    _writer: LoggerWriter
    _next_index: int
    _last_step: int | None
    _checked_step: int | None
    _owed: tuple[int, int] | None
    _meta: dict[int, dict]
    _partials: dict[int, dict[int, AnalysisOutput]]
    _warned_layers: set[str]
    _reported_selection: bool
    _baseline: dict[str, torch.Tensor] | None
    _prev_esd: dict[str, Any]
    _schedule: dict[str, Any]
    _skipped_steps: set[int]
    _carry: FrozenCarry
    _budget: CostBudget

    # Methods one part calls on another (defined in engine.MonitorEngine and completion.Completion).
    _drain: Callable[..., None]
    _exchange: Callable[..., None]
