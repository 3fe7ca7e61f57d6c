"""ww_monitor: watch the eigenvalue spectra of a network's weights while it trains.

Importing this package configures nothing global (no logging handlers, no warning filters) and
does not import Lightning; :class:`WeightWatcherCallback` is loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .analysis.analyze import analyze
from .analysis.model_distances import Distances, LayerDistance, distances
from .analysis.phases import Phase
from .analysis.results import LayerResult, Report, SkippedLayer
from .errors import CheckpointError, WWMonitorError
from .functional.power_law import PowerLawFit, fit_power_law
from .monitoring.alerts import Alert, AlertConfig, AlertError, WWMonitorAlert

if TYPE_CHECKING:  # the names loaded on first access, for type checkers (nothing is imported at run time)
    from .analysis.phases import classify_phase
    from .balancing import AlphaDecay, SpectralBalancer, TempBalance
    from .core.monitor import Monitor
    from .integrations.alpha_drift import AlphaDriftEarlyStopping
    from .integrations.lightning_callback import WeightWatcherCallback

__version__ = "0.2.0"

__all__ = [
    "Alert",
    "AlertConfig",
    "AlertError",
    "AlphaDecay",
    "AlphaDriftEarlyStopping",
    "CheckpointError",
    "Distances",
    "LayerDistance",
    "LayerResult",
    "Monitor",
    "Phase",
    "PowerLawFit",
    "Report",
    "SkippedLayer",
    "SpectralBalancer",
    "TempBalance",
    "WWMonitorAlert",
    "WWMonitorError",
    "WeightWatcherCallback",
    "analyze",
    "distances",
    "classify_phase",
    "fit_power_law",
]

_LAZY = {
    "Monitor": ("ww_monitor.core.monitor", "Monitor"),
    "WeightWatcherCallback": ("ww_monitor.integrations.lightning_callback", "WeightWatcherCallback"),
    "AlphaDriftEarlyStopping": ("ww_monitor.integrations.alpha_drift", "AlphaDriftEarlyStopping"),
    "classify_phase": ("ww_monitor.analysis.phases", "classify_phase"),
    "SpectralBalancer": ("ww_monitor.balancing", "SpectralBalancer"),
    "TempBalance": ("ww_monitor.balancing", "TempBalance"),
    "AlphaDecay": ("ww_monitor.balancing", "AlphaDecay"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ww_monitor' has no attribute {name!r}")
