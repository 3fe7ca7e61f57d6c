"""``wwm.distances(a, b)``: how far apart two versions of a model are, layer by layer
(weightwatcher 0.7.7 ``WeightWatcher.distances``; formulas in :mod:`.functional.distances`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import WWMonitorError
from ..functional.distances import cka_similarity, euclidean_distance, relative_distance
from .layers import clean_name
from .loading import ModelSource, load_state_dict
from .results import SkippedLayer

if TYPE_CHECKING:
    import pandas as pd

    from .layers import LayerMatrix
    from .selection import AnalysisConfig

__all__ = ["LayerDistance", "Distances", "distances", "subtract_base", "IDENTICAL_REASON"]

#: Reason a layer is skipped by ``analyze(..., base_model=...)`` when it equals the base exactly.
IDENTICAL_REASON = "identical to base_model (the difference is exactly zero)"


@dataclass
class LayerDistance:
    """Distances between the two versions of one layer (``delta_b``: None without biases)."""

    name: str
    kind: str
    N: int
    M: int
    euclidean: float
    relative: float
    cka: float
    delta_b: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Distances:
    """What :func:`distances` returns: one :class:`LayerDistance` per layer found in both models."""

    layers: list[LayerDistance] = field(default_factory=list)
    unmatched: list[SkippedLayer] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerDistance:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; compared: {[l.name for l in self.layers]}")

    def mean(self) -> dict[str, float]:
        """Means over layers (weightwatcher's ``avg_dW``/``avg_db`` are ``euclidean``/``delta_b``)."""
        out = {}
        for key in ("euclidean", "relative", "cka", "delta_b"):
            vals = [getattr(l, key) for l in self.layers if getattr(l, key) is not None]
            out[key] = float(np.mean(vals)) if vals else math.nan
        return out

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([l.to_dict() for l in self.layers], columns=[f for f in LayerDistance.__dataclass_fields__])


def _tensors(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        named: dict[str, torch.Tensor] = dict(source.named_parameters())
        named.update(dict(source.named_buffers()))
    else:
        named = dict(source)
    return {clean_name(k): v for k, v in named.items() if isinstance(v, torch.Tensor)}


def distances(
    a: ModelSource,
    b: ModelSource,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    kinds: Sequence[str] | None = None,
    conv_mode: str = "pooled",
    weights_only: bool = True,
) -> Distances:
    """Per-layer euclidean distance, relative distance and CKA overlap between two models.

    Example::

        d = wwm.distances(model_before, model_after)
        print(d.mean()["relative"], d.to_pandas())

    Args:
        a: ``nn.Module``, state dict, or checkpoint path/folder (loaded with ``weights_only``).
        b: the other model, in any of the same forms.
        include: layer selection, as for :func:`ww_monitor.analyze` (no size limits: every
            selected matrix is compared); so are ``exclude``, ``kinds`` and ``conv_mode``.
        exclude: as for :func:`ww_monitor.analyze`.
        kinds: as for :func:`ww_monitor.analyze`.
        conv_mode: as for :func:`ww_monitor.analyze`.
    Layers missing from one model, or of different shapes, are listed in ``unmatched``.
    """
    from .analyze import AnalysisConfig, select_matrices

    # AnalysisConfig.__post_init__ normalises a str, a list or None into the fields' tuples.
    config = AnalysisConfig(
        include=include,  # type: ignore[arg-type]
        exclude=exclude,  # type: ignore[arg-type]
        kinds=kinds,  # type: ignore[arg-type]
        conv_mode=conv_mode,
        min_evals=2,
        max_evals=None,
        max_n=None,
    )
    sources = [_as_source(src, weights_only) for src in (a, b)]
    out = Distances()
    with torch.no_grad():
        (ma, _), (mb, _) = (select_matrices(s, config) for s in sources)
        ta, tb = (_tensors(s) for s in sources)
        by_name = {m.name: m for m in mb}
        for m1 in ma:
            m2 = by_name.pop(m1.name, None)
            if m2 is None or tuple(m2.weight.shape) != tuple(m1.weight.shape):
                why = "not in the second model" if m2 is None else f"shape {tuple(m2.weight.shape)} in the second model"
                out.unmatched.append(SkippedLayer(m1.name, m1.kind, tuple(m1.weight.shape), why))
                continue
            b1, b2 = ta.get(m1.name + ".bias"), tb.get(m1.name + ".bias")
            delta_b = None
            if isinstance(b1, torch.Tensor) and isinstance(b2, torch.Tensor) and b1.shape == b2.shape:
                delta_b = float(torch.linalg.vector_norm(b1.double() - b2.double()))
            out.layers.append(
                LayerDistance(
                    name=m1.name,
                    kind=m1.kind,
                    N=m1.N,
                    M=m1.M,
                    euclidean=euclidean_distance(m1.weight, m2.weight),
                    relative=relative_distance(m1.weight, m2.weight),
                    cka=cka_similarity(m1.weight, m2.weight),
                    delta_b=delta_b,
                )
            )
        for m2 in by_name.values():
            out.unmatched.append(SkippedLayer(m2.name, m2.kind, tuple(m2.weight.shape), "not in the first model"))
    return out


def _as_source(src: ModelSource, weights_only: bool) -> nn.Module | Mapping[str, torch.Tensor]:
    if isinstance(src, (str, os.PathLike)):
        src = load_state_dict(src, weights_only=weights_only)
    if not isinstance(src, (nn.Module, Mapping)):
        raise WWMonitorError(
            f"distances()/base_model expects an nn.Module, a state dict or a path, got {type(src).__name__}"
        )
    return src


def subtract_base(
    matrices: list[LayerMatrix], base_model: ModelSource, config: AnalysisConfig, *, weights_only: bool = True
) -> tuple[list[LayerMatrix], list[SkippedLayer]]:
    """``analyze(model, base_model=...)``: each selected matrix minus the same layer of ``base_model``
    (weightwatcher 0.7.7's ``base_model``: the fine-tuning or training delta is analysed).

    Returns (delta matrices, skipped): layers missing from the base or of another shape, and
    deltas that are exactly zero, are skipped with the reason.
    """
    from .analyze import select_matrices
    from .layers import LayerMatrix

    base, _ = select_matrices(_as_source(base_model, weights_only), config)
    by_name = {m.name: m for m in base}
    out, skipped = [], []
    for m in matrices:
        ref = by_name.get(m.name)
        shape = tuple(m.weight.shape)
        if ref is None or tuple(ref.weight.shape) != shape:
            why = (
                "no layer of that name in base_model"
                if ref is None
                else f"shape {tuple(ref.weight.shape)} in base_model"
            )
            skipped.append(SkippedLayer(m.name, m.kind, shape, why))
            continue
        delta = m.weight.detach() - ref.weight.detach().to(device=m.weight.device, dtype=m.weight.dtype)
        if not bool(delta.any()):
            skipped.append(SkippedLayer(m.name, m.kind, shape, IDENTICAL_REASON))
            continue
        out.append(LayerMatrix(m.name, m.kind, delta, m.eig_scale))
    return out, skipped
