"""Group layers by block and by kind, so that 50-200 layers read as a dozen curves.

* **Block** of a layer (:func:`block_of`): its dotted name up to and including the first numeric
  part that is not the last part: ``encoder.layer.11.attention.self.query`` -> ``encoder.layer.11``,
  ``blocks.3.fc1`` -> ``blocks.3`` (one transformer block, one residual block). A layer whose only
  number is its own index (``net.4`` in an ``nn.Sequential``) or that has no number belongs to its
  parent container (``net``, ``features``); a top-level layer to :data:`ROOT_BLOCK`.
* **Kind**: the layer's type as analysed (``linear``, ``conv2d``, ``embedding``, ...).

:func:`group_means` gives the mean of a metric per block and per kind over the layers whose fit
is reliable (:mod:`ww_monitor.analysis.reliability`), the same rule as the model-level summary; a group
with no reliable layer gets the mean of all its finite values, so a group of small layers still
has a curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["ROOT_BLOCK", "block_of", "group_names", "group_means", "group_scalars", "BLOCK_PREFIX", "KIND_PREFIX"]

#: Block of layers that sit directly on the model (no container).
ROOT_BLOCK = "(top level)"
#: Tag prefixes of the group scalars: their own TensorBoard section, apart from the per-layer ``ww/``.
BLOCK_PREFIX = "ww_by_block"
KIND_PREFIX = "ww_by_kind"


def block_of(name: str) -> str:
    """The block a layer belongs to (see the module docstring)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or ROOT_BLOCK


def group_names(names: Iterable[str], key=block_of) -> dict[str, list[str]]:
    """``{group: [layer, ...]}`` in first-seen (model) order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    return groups


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def group_means(results: Sequence, metric: str = "alpha") -> dict[str, dict[str, float]]:
    """``{"block": {block: mean}, "kind": {kind: mean}}`` of ``metric`` over reliable layers
    (all finite ones where a group has no reliable layer; NaN where it has none at all)."""
    out: dict[str, dict[str, float]] = {}
    for label, key in (("block", lambda r: block_of(r.name)), ("kind", lambda r: r.kind)):
        reliable: dict[str, list[float]] = {}
        finite: dict[str, list[float]] = {}
        for r in results:
            g = key(r)
            v = getattr(r, metric, math.nan)
            reliable.setdefault(g, [])
            finite.setdefault(g, [])
            if v is None or not math.isfinite(float(v)):
                continue
            finite[g].append(float(v))
            if getattr(r, "reliable", True):
                reliable[g].append(float(v))
        out[label] = {g: _mean(reliable[g] or finite[g]) for g in finite}
    return out


def group_scalars(results: Sequence, metric: str = "alpha") -> dict[str, float]:
    """``ww_by_block/<metric>/<block>`` and ``ww_by_kind/<metric>/<kind>`` scalars of one snapshot."""
    means = group_means(results, metric)
    out = {f"{BLOCK_PREFIX}/{metric}/{b}": v for b, v in means["block"].items()}
    out.update({f"{KIND_PREFIX}/{metric}/{k}": v for k, v in means["kind"].items()})
    return out
