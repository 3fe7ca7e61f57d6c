"""``WeightWatcherCallback`` for the unified ``lightning`` package (``lightning.pytorch``).

Use this one with ``import lightning.pytorch as pl`` / ``import lightning as L``; use
``ww_monitor.WeightWatcherCallback`` with ``import pytorch_lightning as pl``. Lightning does not
support mixing the two packages (``isinstance`` checks against the other package's ``Callback``
fail, e.g. in LightningCLI's type validation or ``Trainer(callbacks=cb)``), and importing both
doubles the import cost. This module imports ``lightning.pytorch`` only, never
``pytorch_lightning``. Everything else, including the
arguments, is shared: see :class:`ww_monitor.integrations.lightning_callback.WeightWatcherMixin`.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from .balancing.presets import build as _build_balancers
from .integrations import alpha_drift
from .integrations.lightning_callback import WeightWatcherMixin, _build  # noqa: F401  (the shared logic, re-exported)

__all__ = ["WeightWatcherCallback", "AlphaDriftEarlyStopping", "SpectralBalancer", "TempBalance", "AlphaDecay"]

WeightWatcherCallback = _build(Callback, __name__)
AlphaDriftEarlyStopping = alpha_drift._build(Callback, __name__)
_balancers = _build_balancers(Callback, __name__)
SpectralBalancer = _balancers["SpectralBalancer"]
TempBalance = _balancers["TempBalance"]
AlphaDecay = _balancers["AlphaDecay"]
