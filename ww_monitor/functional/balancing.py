"""Per-layer factors from per-layer alphas: the mappings of the spectral balancing methods.

Each function takes the alphas of the layers being balanced (one number per layer) and returns
one multiplicative factor per layer, to be applied to that layer's learning rate (TempBalance,
Model Balancing) or weight decay (AlphaDecay): ``value_i = factor_i * value``. Larger alpha
(lighter tail, less trained) gives a larger factor in every mapping, so under-trained layers get
a larger learning rate and heavy-tailed layers less weight decay.

Sources (formulas read from the authors' public code):

* TempBalance, Zhou et al., "Temperature Balancing, Layer-wise Weight Analysis, and Neural
  Network Training", NeurIPS 2023 (github.com/YefanZhou/TempBalance, ``get_layer_temps``):
  ``tb_linear_map`` -> :func:`linear_factors`, ``tb_sqrt`` -> :func:`sqrt_factors`,
  ``tb_log2`` -> :func:`log2_factors`, ``tb_step`` -> :func:`step_factors`.
* AlphaDecay, He et al., NeurIPS 2025 (github.com/hed-ucas/AlphaDecay): the same linear map
  applied to weight decay with the range [0.666, 3] (:data:`ALPHADECAY_RANGE`).
* Model Balancing, Liu et al., "Model Balancing Helps Low-data Training and Fine-tuning",
  EMNLP 2024 (github.com/ZihangHLiu/ModelBalancing, ``tb_std_sigmoid``) -> :func:`sigmoid_factors`.

Degenerate input: with fewer than two layers, or when every alpha is the same, there is no
spread to balance and every factor is 1 (``np.interp`` on an empty range would return the top
of the range instead). Alphas must be finite and > 1 (a power-law exponent); filter unreliable
layers out before calling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MAPPINGS",
    "TEMPBALANCE_RANGE",
    "ALPHADECAY_RANGE",
    "SIGMOID_SCALES",
    "SIGMOID_TEMPERATURE",
    "linear_factors",
    "sqrt_factors",
    "log2_factors",
    "step_factors",
    "sigmoid_factors",
    "balance_factors",
]

MAPPINGS = ("linear", "sqrt", "log2", "step", "sigmoid")

#: TempBalance's ``lr_min_ratio=0.5``, ``lr_max_ratio=1.5``.
TEMPBALANCE_RANGE = (0.5, 1.5)
#: AlphaDecay's ``wd_min_ratio=0.666``, ``wd_max_ratio=3`` (its README's and scripts' setting).
ALPHADECAY_RANGE = (0.666, 3.0)
#: Model Balancing's ``sigmoid_min=2``, ``sigmoid_max=1`` (the defaults of its training arguments;
#: its GLUE scripts also sweep (0.25, 0.25), (1, 1) and (1.25, 1.25)).
SIGMOID_SCALES = (2.0, 1.0)
#: Model Balancing's ``exp_temp=10``.
SIGMOID_TEMPERATURE = 10.0


def _alphas(alphas: Sequence[float]) -> np.ndarray:
    a = np.asarray(alphas, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError(f"alphas must be finite, got {a.tolist()}")
    return a


def _check_range(low: float, high: float) -> None:
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
        raise ValueError(f"factor range must satisfy 0 <= low <= high, got ({low!r}, {high!r})")


def _flat(a: np.ndarray) -> bool:
    return a.size < 2 or float(a.max()) == float(a.min())


def linear_factors(
    alphas: Sequence[float], low: float = TEMPBALANCE_RANGE[0], high: float = TEMPBALANCE_RANGE[1]
) -> np.ndarray:
    """``f_i = low + (high - low) * (alpha_i - min alpha) / (max alpha - min alpha)``.

    TempBalance's ``tb_linear_map`` (``np.interp(alpha, [min, max], [low, high])``), and
    AlphaDecay's weight-decay map with ``(low, high) = (0.666, 3)``.
    """
    a = _alphas(alphas)
    _check_range(low, high)
    if _flat(a):
        return np.ones_like(a)
    lo, hi = float(a.min()), float(a.max())
    return low + (high - low) * (a - lo) / (hi - lo)


def sqrt_factors(alphas: Sequence[float]) -> np.ndarray:
    """``f_i = sqrt(alpha_i) / mean_j sqrt(alpha_j)`` (TempBalance's ``tb_sqrt``: mean factor 1)."""
    a = _alphas(alphas)
    if _flat(a):
        return np.ones_like(a)
    r = np.sqrt(a)
    return r / r.mean()


def log2_factors(alphas: Sequence[float]) -> np.ndarray:
    """``f_i = log2(alpha_i) / mean_j log2(alpha_j)`` (TempBalance's ``tb_log2``: mean factor 1).

    Needs alpha > 1 (log2 > 0) for every layer, else ValueError.
    """
    a = _alphas(alphas)
    if _flat(a):
        return np.ones_like(a)
    if np.any(a <= 1.0):
        raise ValueError(f"log2 mapping needs every alpha > 1, got {a.tolist()}")
    r = np.log2(a)
    return r / r.mean()


def step_factors(
    alphas: Sequence[float], low: float = TEMPBALANCE_RANGE[0], high: float = TEMPBALANCE_RANGE[1]
) -> np.ndarray:
    """``f_i = low + (high - low) * rank_i / n``, rank 0 for the smallest alpha.

    TempBalance's ``tb_step`` (rank-based: only the order of the alphas matters; the largest
    alpha gets ``low + (high - low) * (n - 1) / n``, not ``high``). Ties keep the layers' order.
    """
    a = _alphas(alphas)
    _check_range(low, high)
    if _flat(a):
        return np.ones_like(a)
    n = a.size
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(a, kind="stable")] = np.arange(n)
    return low + (high - low) * ranks / n


def sigmoid_factors(
    alphas: Sequence[float], scales: tuple[float, float] = SIGMOID_SCALES, temperature: float = SIGMOID_TEMPERATURE
) -> np.ndarray:
    """Model Balancing's ``tb_std_sigmoid``: ``f_i = 10 ** g(alpha_i - mean alpha)`` with

        g(d) = s_max * (sigmoid(T * d) - 1/2)   for d > 0,
        g(d) = s_min * (sigmoid(T * d) - 1/2)   for d <= 0,

    ``(s_min, s_max) = scales``, ``T = temperature``. Factors lie in
    ``(10 ** (-s_min / 2), 10 ** (s_max / 2))``; a layer at the mean alpha gets 1.
    """
    a = _alphas(alphas)
    s_min, s_max = (float(s) for s in scales)
    if not (s_min >= 0 and s_max >= 0 and np.isfinite(s_min) and np.isfinite(s_max)):
        raise ValueError(f"sigmoid scales must be finite and >= 0, got {scales!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"sigmoid temperature must be > 0, got {temperature!r}")
    if a.size == 0:
        return a
    d = a - a.mean()
    centred = 1.0 / (1.0 + np.exp(-temperature * d)) - 0.5
    g = np.where(d > 0, s_max * centred, s_min * centred)
    return np.power(10.0, g)


def balance_factors(
    alphas: Sequence[float],
    mapping: str = "linear",
    factor_range: tuple[float, float] = TEMPBALANCE_RANGE,
    sigmoid_scales: tuple[float, float] = SIGMOID_SCALES,
    sigmoid_temperature: float = SIGMOID_TEMPERATURE,
) -> np.ndarray:
    """Dispatch on ``mapping`` (one of :data:`MAPPINGS`); ``factor_range`` is used by
    ``linear`` and ``step``, ``sigmoid_*`` by ``sigmoid``."""
    if mapping == "linear":
        return linear_factors(alphas, *factor_range)
    if mapping == "step":
        return step_factors(alphas, *factor_range)
    if mapping == "sqrt":
        return sqrt_factors(alphas)
    if mapping == "log2":
        return log2_factors(alphas)
    if mapping == "sigmoid":
        return sigmoid_factors(alphas, sigmoid_scales, sigmoid_temperature)
    raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
