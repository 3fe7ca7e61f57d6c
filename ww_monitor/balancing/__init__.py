"""Act on the spectra: per-layer learning rates / weight decays from each layer's alpha.

* Pure mappings, alphas in, factors out (re-exported from :mod:`ww_monitor.functional.balancing`):
  :func:`linear_factors`, :func:`sqrt_factors`, :func:`log2_factors`, :func:`step_factors`,
  :func:`sigmoid_factors`, :func:`balance_factors`; the Hill estimator :func:`hill_alpha`.
* ``SpectralBalancer``, ``TempBalance``, ``AlphaDecay`` behind every front door, one core
  (:mod:`.core`) and the same arguments:

  - Lightning callbacks: here (built on first access for ``pytorch_lightning``; also
    ``ww_monitor.TempBalance`` ...), and in ``ww_monitor.lightning`` for ``lightning.pytorch``;
  - plain PyTorch loops: :mod:`ww_monitor.balancing.loop` (``attach`` / ``step`` / ``epoch_end``);
  - the Hugging Face ``Trainer``: ``ww_monitor.huggingface`` (``TrainerCallback`` s).
"""

from __future__ import annotations

from ..functional.balancing import (
    ALPHADECAY_RANGE,
    MAPPINGS,
    SIGMOID_SCALES,
    SIGMOID_TEMPERATURE,
    TEMPBALANCE_RANGE,
    balance_factors,
    linear_factors,
    log2_factors,
    sigmoid_factors,
    sqrt_factors,
    step_factors,
)
from ..functional.hill import hill_alpha

__all__ = [
    "ALPHADECAY_RANGE",
    "MAPPINGS",
    "SIGMOID_SCALES",
    "SIGMOID_TEMPERATURE",
    "TEMPBALANCE_RANGE",
    "AlphaDecay",
    "SpectralBalancer",
    "TempBalance",
    "balance_factors",
    "hill_alpha",
    "linear_factors",
    "log2_factors",
    "sigmoid_factors",
    "sqrt_factors",
    "step_factors",
]

_CALLBACKS = ("SpectralBalancer", "TempBalance", "AlphaDecay")


def __getattr__(name: str) -> type:
    if name in _CALLBACKS:
        from pytorch_lightning import Callback

        from .presets import build

        classes = build(Callback, __name__)
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
