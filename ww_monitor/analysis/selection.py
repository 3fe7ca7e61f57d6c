"""Which matrices an analysis takes: :class:`AnalysisConfig` (every option, validated on
creation) and :func:`select_matrices` (a module or state dict -> the selected matrices and the
layers left out, each with its reason; tied weights once, with their aliases).

The layer finders live in :mod:`.layers`, the weight readers in :mod:`.weight_access`;
:mod:`.analyze` runs the analysis of what is selected here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from ..errors import WWMonitorError
from ..functional.eigenvalues import METHODS
from ..functional.fingers import DEFAULT_FINGER_THRESH, DEFAULT_MAX_FINGERS
from ..functional.sampled import DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLES
from . import options as _options
from .adapters import adapters_from_state_dict, check_peft, with_adapters
from .frozen import is_frozen
from .layers import (
    CONV_MODES,
    FoundLayer,
    LayerMatrix,
    LayerSelection,
    matrices_from_module,
    matrices_from_state_dict,
    nbytes_float64,
    size_problem,
)
from .results import SkippedLayer
from .weight_access import alias_key, analysable

__all__ = [
    "AnalysisConfig",
    "select_matrices",
    "find_layers",
    "DEFAULT_MIN_EVALS",
    "DEFAULT_MAX_EVALS",
    "DEFAULT_MAX_N",
]

#: weightwatcher's defaults: at least 8 eigenvalues, at most 15000, N at most 50000.
DEFAULT_MIN_EVALS = 8
DEFAULT_MAX_EVALS = 15000
DEFAULT_MAX_N = 50000


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that decides which matrices are analysed and how. Validated on creation."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] | None = None
    conv_mode: str = "pooled"
    min_evals: int = DEFAULT_MIN_EVALS
    max_evals: int | None = DEFAULT_MAX_EVALS
    max_n: int | None = DEFAULT_MAX_N
    max_matrix_bytes: int | None = None
    method: str = "auto"
    traps: bool = False
    seed: int = 0
    keep_eigenvalues: bool = True
    # weightwatcher 0.7.7's options (see :mod:`.options`); their columns stay None when off.
    detX: bool = False
    fix_fingers: str | None = None
    max_fingers: int = DEFAULT_MAX_FINGERS
    finger_thresh: float = DEFAULT_FINGER_THRESH
    xmin_max: float | None = None
    fit: str = "PL"
    randomize: bool = False
    peft: bool | str = False
    # Opt-in sampled estimate for matrices above a size budget (see :mod:`.estimate`).
    estimate_above: int | None = None
    estimate_size: int = DEFAULT_SAMPLE_SIZE
    estimate_samples: int = DEFAULT_SAMPLES

    def __post_init__(self):
        sel = LayerSelection.build(self.include, self.exclude, self.kinds)
        object.__setattr__(self, "include", sel.include)
        object.__setattr__(self, "exclude", sel.exclude)
        object.__setattr__(self, "kinds", sel.kinds)
        if self.conv_mode not in CONV_MODES:
            raise WWMonitorError(f"conv_mode must be one of {CONV_MODES}, got {self.conv_mode!r}")
        if self.method not in METHODS:
            raise WWMonitorError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.min_evals, int) or self.min_evals < 2:
            raise WWMonitorError(f"min_evals must be an int >= 2, got {self.min_evals!r}")
        for key in ("max_evals", "max_n", "max_matrix_bytes", "estimate_above"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise WWMonitorError(f"{key} must be a positive int or None, got {v!r}")
        _options.validate_options(self)
        check_peft(self.peft)
        for key, low in (("estimate_size", 2), ("estimate_samples", 1)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise WWMonitorError(f"{key} must be an int >= {low}, got {v!r}")

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(self.include, self.exclude, self.kinds)


def select_matrices(source, config: AnalysisConfig) -> tuple[list[LayerMatrix], list[SkippedLayer]]:
    """Find the matrices of ``source`` (module or state dict) that ``config`` selects.

    The returned :class:`LayerMatrix` objects reference (views of) the live weights, so the
    callback can select once and copy at every snapshot. Each is marked ``frozen`` when no
    parameter it reads requires grad (:mod:`.frozen`; never for a state dict's tensors).
    """
    found: Iterable[FoundLayer]
    if isinstance(source, nn.Module):
        found = find_layers(source, config)
    elif isinstance(source, Mapping):
        rest, adapters = adapters_from_state_dict(source, config.peft)
        found = [*matrices_from_state_dict(rest, config.conv_mode), *adapters]
    else:
        raise WWMonitorError(f"expected an nn.Module or a state dict, got {type(source).__name__}")

    selection = config.selection
    matrices: list[LayerMatrix] = []
    skipped: list[SkippedLayer] = []
    # alias key -> (owner: LayerMatrix or SkippedLayer index, the tensor). Holding the tensor keeps
    # its memory from being reused by a later computed weight (parametrizations), which would
    # otherwise give a false alias.
    owners: dict = {}
    for name, kind, item in found:
        if isinstance(item, str):
            if selection.why_not(name, kind) is None:
                skipped.append(SkippedLayer(name, kind, (), item))
            continue
        for m in item:
            why = selection.why_not(m.name, m.kind) if selection.why_not(name, kind) is not None else None
            if why is not None:
                continue  # deselected by the user: not a finding, so not listed
            if m.kind == "other" and not selection.explicitly_included(m.name):
                skipped.append(
                    SkippedLayer(
                        m.name,
                        m.kind,
                        tuple(m.weight.shape),
                        "module type not recognised as a layer; add its name to include= to analyse it",
                    )
                )
                continue
            key = alias_key(m.weight)
            if key is not None and key in owners:  # a tied/shared weight: analysed once, under its first name
                _add_alias(owners[key][0], m.name, matrices, skipped)
                continue
            original = m.weight
            problem = _selection_problem(m, config)
            if problem is None:
                form = analysable(m.weight)
                if isinstance(form, str):
                    problem = form
                else:
                    m.weight, m.stored_dtype = form[0], (form[1] if form[0] is not m.weight else None)
            if problem is not None:
                skipped.append(SkippedLayer(m.name, m.kind, tuple(m.weight.shape), problem))
                owner = ("skipped", len(skipped) - 1)
            else:
                m.frozen = is_frozen(m.reads)
                matrices.append(m)
                owner = ("matrix", len(matrices) - 1)
            if key is not None:
                owners[key] = (owner, original)
    return matrices, skipped


def find_layers(module: nn.Module, config: AnalysisConfig, tap=None) -> Iterator[FoundLayer]:
    """The layer finder's output for ``module`` under ``config``'s ``conv_mode`` and ``peft``:
    ``(layer name, kind, [LayerMatrix] or the reason it is unsupported)``, lazily, in model order.
    ``tap`` wraps the per-module finder's output before the adapters are applied (sharded models
    are walked with it one layer at a time, see ``ww_monitor.monitoring.sharded``)."""
    found = matrices_from_module(module, config.conv_mode)
    return with_adapters(tap(found) if tap is not None else found, module, config.peft)


def _selection_problem(m: LayerMatrix, config: AnalysisConfig) -> str | None:
    """Why ``m`` is outside the configured limits (size, memory, meta device), or None."""
    problem = size_problem(m, config.min_evals, config.max_evals, config.max_n)
    if problem is None and config.max_matrix_bytes is not None and nbytes_float64(m) > config.max_matrix_bytes:
        problem = f"float64 copy needs {nbytes_float64(m)} bytes > max_matrix_bytes={config.max_matrix_bytes}"
    if problem is None and m.weight.is_meta:
        problem = "weights on the meta device (not materialised)"
    return problem


def _add_alias(owner: tuple[str, int], alias: str, matrices: list[LayerMatrix], skipped: list[SkippedLayer]) -> None:
    where, i = owner
    if where == "matrix":
        matrices[i].aliases = (*matrices[i].aliases, alias)
    else:
        skipped[i] = dataclasses.replace(skipped[i], aliases=(*skipped[i].aliases, alias))
