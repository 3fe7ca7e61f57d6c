"""Result containers: one :class:`LayerResult` per analysed ESD, a :class:`Report` per model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .phases import Phase

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LayerResult",
    "SkippedLayer",
    "Report",
    "SUMMARY_METRICS",
    "SUMMARY_COUNTS",
    "LAYER_COLUMNS",
    "strict_json_dumps",
    "to_strict_json",
]

#: Model-level means; failed fits and (by default) unreliable layers are excluded from the
#: fit-based ones (:mod:`ww_monitor.analysis.reliability`).
SUMMARY_METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank")
#: Counts that come with every summary (how many layers the means rest on, and why not more).
SUMMARY_COUNTS = (
    "num_layers",
    "num_failed_fits",
    "num_unreliable",
    "num_undetermined",
    "num_random_like",
    "num_skipped",
    "num_frozen",
)
_FIT_DEPENDENT = {"alpha", "alpha_weighted", "log_alpha_norm"}


@dataclass
class LayerResult:
    """Metrics of one layer's ESD; every metric has its weightwatcher name."""

    name: str
    kind: str
    N: int
    M: int
    Q: float
    num_evals: int
    # norm metrics
    lambda_max: float = math.nan
    log_norm: float = math.nan
    log_spectral_norm: float = math.nan
    stable_rank: float = math.nan
    matrix_rank: int = 0
    rank_loss: int = 0
    entropy: float = math.nan
    # power-law fit
    alpha: float = math.nan
    xmin: float = math.nan
    xmax: float = math.nan
    D: float = math.nan
    sigma: float = math.nan
    num_pl_spikes: int = 0
    alpha_weighted: float = math.nan
    log_alpha_norm: float = math.nan
    fit_ok: bool = False
    fit_reason: str = ""
    #: The fit rests on enough eigenvalues (``num_evals``) and tail points (``num_pl_spikes``):
    #: :func:`ww_monitor.analysis.reliability.is_reliable`. Set by the analysis.
    reliable: bool = True
    # random-matrix diagnostics and phase
    lambda_plus: float = math.nan
    mp_sigma: float = math.nan
    mp_ks: float = math.nan
    num_spikes: int = 0
    mp_softrank: float = math.nan
    num_traps: int | None = None
    phase: Phase | None = None
    # weightwatcher 0.7.7 options (None when not computed; see ww_monitor.analysis.options)
    detX_num: int | None = None
    detX_val: float | None = None
    ERG_gap: int | None = None
    num_fingers: int | None = None
    raw_alpha: float | None = None
    Lambda: float | None = None
    rand_distance: float | None = None
    max_rand_eval: float | None = None
    rand_num_spikes: int | None = None
    ww_softrank: float | None = None
    ww_maxdist: float | None = None
    # training-time only (the callback): relative distance to the baseline snapshot, ESD shift
    distance_from_init: float | None = None
    esd_shift: float | None = None
    # bookkeeping
    num_slices: int = 1
    dtype: str = ""
    #: "full" (exact eigendecomposition) or "sampled" (alpha estimated from submatrices, see
    #: ww_monitor.analysis.estimate: no rank, entropy, MP fit or phase).
    method: str = "full"
    #: Other names of this same tensor (tied/shared weights, e.g. GPT-2's ``lm_head`` of ``wte``):
    #: the matrix is analysed, counted and copied once, under ``name``.
    aliases: tuple[str, ...] = ()
    #: No parameter this matrix reads requires grad (:mod:`ww_monitor.analysis.frozen`): training
    #: cannot change it. The training-time monitors analyse it once and carry it forward.
    frozen: bool = False
    eigenvalues: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self, *, eigenvalues: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eigenvalues"}
        if d["phase"] is not None:
            d["phase"] = str(d["phase"].value)
        d["aliases"] = list(d["aliases"])
        if eigenvalues and self.eigenvalues is not None:
            d["eigenvalues"] = self.eigenvalues.tolist()
        return d


LAYER_COLUMNS = tuple(f.name for f in fields(LayerResult) if f.name != "eigenvalues")


@dataclass(frozen=True)
class SkippedLayer:
    """A layer that was found but not analysed, and why (nothing is dropped silently)."""

    name: str
    kind: str
    shape: tuple
    reason: str
    aliases: tuple[str, ...] = ()  # other names of the same (tied) tensor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["aliases"] = list(self.aliases)
        return d


@dataclass
class Report:
    """What :func:`ww_monitor.analyze` returns."""

    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no analysed layer named {name!r}; analysed: {[l.name for l in self.layers]}")

    def summary(self, include_unreliable: bool = False) -> dict[str, float]:
        """Means over analysed layers, with the counts they rest on.

        The fit-based means (alpha, alpha_weighted, log_alpha_norm) leave out layers whose
        power-law fit failed (``num_failed_fits``) and, unless ``include_unreliable``, layers
        whose fit rests on too few eigenvalues (``num_unreliable``, see
        :mod:`ww_monitor.analysis.reliability`). The norm means use every analysed layer (exact at any
        size). ``num_undetermined`` counts layers without a phase, ``num_random_like`` those
        still in the random-like phase, ``num_frozen`` those whose parameters do not require grad
        (they are in the means here; the training-time monitors leave them out, see
        ``WeightWatcherCallback(watch_frozen=...)``).
        """
        out: dict[str, float] = {}
        fitted = [l for l in self.layers if l.fit_ok and (l.reliable or include_unreliable)]
        for metric in SUMMARY_METRICS:
            pool = fitted if metric in _FIT_DEPENDENT else self.layers
            vals = [getattr(l, metric) for l in pool]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            out[metric] = float(np.mean(vals)) if vals else math.nan
        out["num_layers"] = len(self.layers)
        out["num_failed_fits"] = sum(not l.fit_ok for l in self.layers)
        out["num_unreliable"] = sum(not l.reliable for l in self.layers)
        out["num_undetermined"] = sum(l.phase is None for l in self.layers)
        out["num_random_like"] = sum(l.phase is not None and Phase(l.phase) == Phase.RANDOM_LIKE for l in self.layers)
        out["num_skipped"] = len(self.skipped)
        out["num_frozen"] = sum(bool(l.frozen) for l in self.layers)
        return out

    def to_dicts(self) -> list[dict[str, Any]]:
        return [l.to_dict() for l in self.layers]

    def to_pandas(self) -> pd.DataFrame:
        """One row per layer. Requires pandas (``pip install ww-monitor[pandas]``)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - exercised only without pandas
            raise ImportError("Report.to_pandas() needs pandas: pip install pandas") from err
        return pd.DataFrame(self.to_dicts(), columns=list(LAYER_COLUMNS))

    def to_json(self, **kwargs: Any) -> str:
        payload = {
            "layers": self.to_dicts(),
            "skipped": [s.to_dict() for s in self.skipped],
            "summary": self.summary(),
        }
        return strict_json_dumps(payload, **kwargs)


def to_strict_json(obj: Any) -> Any:
    """``obj`` with non-finite floats (NaN, +-Inf) as None and numpy scalars/arrays as Python
    values, so ``json.dumps(..., allow_nan=False)`` succeeds: standard JSON has no NaN, and
    strict parsers (JavaScript's ``JSON.parse``, jq, Go) reject the bare ``NaN`` Python writes."""
    if isinstance(obj, dict):
        return {k: to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_strict_json` (``null`` for non-finite values, never ``NaN``)."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kwargs)
