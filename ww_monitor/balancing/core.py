"""The balancer every front door shares: arguments, factors, history and state; no framework.

:class:`SpectralBalancerCore` holds what a balancer decides and keeps, and three operations the
front doors call at their own events:

* ``_attach(model, optimizers, collectives, rank, world, root)``: find the balanced layers and hook
  each optimizer's step (:class:`~ww_monitor.balancing.groups.StepScaler`); ``_detach()``. A
  sharded model (FSDP1 ``use_orig_params=True``, FSDP2 / DTensor) gets a weight source that
  gathers one layer at a time (:mod:`.sharded`); a strategy that cannot have per-layer groups
  (DeepSpeed ZeRO) raises a ``WWMonitorError`` here.
* ``_update(model, step, epoch, monitor, loggers)``: the alphas (from a monitor's latest
  completed snapshot when one is given, else from the weights through the weight source: rank 0
  alone, or, with a collective source, every rank its share, gathered), mapped to factors on
  rank 0, and every rank applies rank 0's (identical factors under DDP and sharding); logged as
  ``ww/balance/<layer>`` and ``ww/balance_alpha/<layer>`` (weight decay: ``ww/balance_wd/...``,
  ``ww/balance_wd_alpha/...``).
* ``state_dict()`` / ``load_state_dict()``: factors and history, for resume.

The math is in :mod:`ww_monitor.functional.balancing` and :mod:`ww_monitor.functional.hill`,
the layer and group handling in :mod:`.groups`, the estimators in :mod:`.estimate`. The front
doors: :mod:`.callback` (Lightning), :mod:`.loop` (plain PyTorch), :mod:`.huggingface`
(``transformers.Trainer``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..analysis.layers import KINDS, LayerSelection
from ..core.hooks import rank_zero_warn
from ..core.settings import as_tuple
from ..errors import WWMonitorError
from ..functional.balancing import MAPPINGS, SIGMOID_SCALES, SIGMOID_TEMPERATURE, TEMPBALANCE_RANGE, balance_factors
from ..functional.hill import DEFAULT_XMIN_POS
from ..monitoring.distributed import Collectives, TorchCollectives
from ..monitoring.sharding import stand_in_view
from ..validation import check_bool, check_int, check_keywords, check_number, keyword_parameters
from .estimate import (
    ESTIMATORS,
    MIN_BALANCE_EVALS,
    EsdAlpha,
    LocalWeights,
    WeightSource,
    gathered_alphas,
    monitor_alphas,
    own_alphas,
    unit_alphas,
)
from .groups import BALANCE_KINDS, StepScaler, check_optimizer, find_units
from .records import BalanceHistory, BalanceRecord
from .sharded import ShardedWeights, check_strategy

__all__ = ["SpectralBalancerCore", "SCALES", "TAGS", "STATE_VERSION"]

log = logging.getLogger(__name__)

SCALES = ("lr", "weight_decay")
#: Tag prefix of each scale's factors (``<prefix>/<layer>``) and alphas (``<prefix>_alpha/<layer>``).
TAGS = {"lr": "ww/balance", "weight_decay": "ww/balance_wd"}
#: Layout of :meth:`SpectralBalancerCore.state_dict`. 2: the optimizer keeps the user's groups
#: (per-layer groups exist only during the step). 1 (earlier): per-layer groups were written into
#: the optimizer, and its saved state has them.
STATE_VERSION = 2


def _check_pair(name: str, value, owner: str) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise WWMonitorError(f"{owner}: `{name}` must be a pair of numbers (low, high), got {value!r}.") from None
    for v in (a, b):
        check_number(name, v, at_least=0.0, owner=owner)
    return float(a), float(b)


#: Names the other front doors use for an argument of the balancers (the monitors' step schedule).
_SIBLING_NAMES = {"every_n_steps": "every_n_train_steps"}


def _check_keywords(cls: type, kwargs: dict) -> None:
    """Unknown keyword arguments: a WWMonitorError naming the class and the closest valid name
    (instead of Python's TypeError naming an internal base class)."""
    # The class's own __init__ (with its subclass's keywords) is the one whose names are valid.
    check_keywords(cls.__name__, kwargs, keyword_parameters(cls.__init__)[1], suggest=_SIBLING_NAMES)  # type: ignore[misc]


class SpectralBalancerCore:
    """Per-layer learning rates (or weight decays) from each layer's power-law alpha.

    Every ``every_n_epochs`` epochs and/or ``every_n_train_steps`` optimizer steps (and at train
    start), the alpha of every balanced layer (Linear, Conv, attention, RNN; see ``kinds``) is
    estimated and mapped to a factor: larger alpha (lighter tail, under-trained) gives a larger
    factor. During each optimizer step, the layer's ``lr`` (``scale="lr"``) or ``weight_decay``
    (``scale="weight_decay"``) is ``factor x`` what the user's optimizer and LR scheduler give.
    Layers that are unreliable (fit failed, fewer than ``min_evals`` eigenvalues) and, with
    ``exclude_first_last``, the first and last layer keep factor 1; normalisation layers follow
    the layer registered before them.

    The optimizer and LR scheduler are configured as usual and stay as configured: the
    per-layer groups exist only inside ``optimizer.step()`` (see :mod:`.groups`), so
    ``param_group["lr"]`` always shows the schedule's value, schedulers compose without
    compounding, and checkpoints hold the optimizer's own layout. The factors are logged as
    ``ww/balance/<layer>`` and the alphas used as ``ww/balance_alpha/<layer>``
    (``scale="weight_decay"``: ``ww/balance_wd/<layer>``, ``ww/balance_wd_alpha/<layer>``, so an
    lr and a weight-decay balancer can log side by side).

    Args:
        scale: ``"lr"`` or ``"weight_decay"``: the param-group setting multiplied by the factor.
        mapping: ``"linear"`` (TempBalance, AlphaDecay), ``"sqrt"``, ``"log2"``, ``"step"`` (rank
            based) or ``"sigmoid"`` (Model Balancing); see :mod:`ww_monitor.functional.balancing`.
        factor_range: ``(low, high)`` factors of the smallest and largest alpha (``linear``,
            ``step``).
        every_n_epochs: update the factors at the end of every this many epochs (``None``: off).
        every_n_train_steps: update every this many optimizer steps (``None``: off).
        at_train_start: also compute factors before the first step (the papers do).
        estimator: ``"hill_median"`` (the papers' Hill estimator, xmin at the median eigenvalue)
            or ``"ww"`` (ww_monitor's weightwatcher-compatible fit).
        xmin_pos: Hill estimator's xmin index ``n / xmin_pos`` (2: the median).
        min_evals: layers with fewer eigenvalues keep factor 1.
        exclude_first_last: the first and last balanced layer keep factor 1 (the papers do).
        follow_norms: normalisation layers take the factor of the layer registered before them.
        include: regexes on layer names: only these layers are balanced.
        exclude: regexes on layer names: these layers are not balanced.
        kinds: balanced layer kinds (default: linear, conv, attention, rnn; not embeddings).
        sigmoid_scales: ``(s_min, s_max)`` of the ``sigmoid`` mapping.
        sigmoid_temperature: ``T`` of the ``sigmoid`` mapping.
        use_monitor: when a spectral monitor runs alongside (``WeightWatcherCallback`` before this
            callback, or the ``monitor`` given to ``attach``), take alphas from its latest completed
            analysis instead of decomposing the weights again (with its background analysis the
            snapshot may be one interval old).
        log_factors: log the factors and alphas (tags above).
    """

    def __new__(cls, *args, **kwargs):
        _check_keywords(cls, kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        scale: str = "lr",
        mapping: str = "linear",
        factor_range: tuple[float, float] = TEMPBALANCE_RANGE,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        at_train_start: bool = True,
        estimator: str = "hill_median",
        xmin_pos: float = DEFAULT_XMIN_POS,
        min_evals: int = MIN_BALANCE_EVALS,
        exclude_first_last: bool = True,
        follow_norms: bool = True,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        kinds: list[str] | None = None,
        sigmoid_scales: tuple[float, float] = SIGMOID_SCALES,
        sigmoid_temperature: float = SIGMOID_TEMPERATURE,
        use_monitor: bool = True,
        log_factors: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if scale not in SCALES:
            raise WWMonitorError(f"{owner}: `scale` must be one of {SCALES}, got {scale!r}.")
        if mapping not in MAPPINGS:
            raise WWMonitorError(f"{owner}: `mapping` must be one of {MAPPINGS}, got {mapping!r}.")
        if estimator not in ESTIMATORS:
            raise WWMonitorError(f"{owner}: `estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
        low, high = _check_pair("factor_range", factor_range, owner)
        if low > high:
            raise WWMonitorError(f"{owner}: `factor_range` must be (low, high) with low <= high, got {factor_range!r}.")
        s_min, s_max = _check_pair("sigmoid_scales", sigmoid_scales, owner)
        check_number("sigmoid_temperature", sigmoid_temperature, above=0.0, owner=owner)
        check_number("xmin_pos", xmin_pos, at_least=1.0, owner=owner)
        if every_n_epochs == 0 and not isinstance(every_n_epochs, bool):  # as the monitors' schedules
            raise WWMonitorError(
                f"{owner}: `every_n_epochs=0` is not a schedule: pass an int >= 1, or None to turn it off."
            )
        check_int("every_n_epochs", every_n_epochs, 1, allow_none=True, owner=owner)
        check_int("every_n_train_steps", every_n_train_steps, 1, allow_none=True, owner=owner)
        check_int("min_evals", min_evals, 2, allow_none=False, owner=owner)
        for name, flag in (
            ("at_train_start", at_train_start),
            ("exclude_first_last", exclude_first_last),
            ("follow_norms", follow_norms),
            ("use_monitor", use_monitor),
            ("log_factors", log_factors),
        ):
            check_bool(name, flag, owner=owner)
        if not every_n_epochs and not every_n_train_steps and not at_train_start:
            raise WWMonitorError(
                f"{owner}: `every_n_epochs`, `every_n_train_steps` and `at_train_start` are all off, "
                "so the factors would never be computed."
            )
        kinds_t = as_tuple(kinds, "kinds") if kinds is not None else BALANCE_KINDS
        if any(k not in KINDS for k in kinds_t):
            raise WWMonitorError(f"{owner}: `kinds` must be a subset of {list(KINDS)}, got {list(kinds_t)!r}.")
        self.include, self.exclude = as_tuple(include, "include"), as_tuple(exclude, "exclude")
        self.kinds = kinds_t
        LayerSelection.build(self.include, self.exclude, self.kinds)  # validates the regexes

        self.scale, self.mapping, self.estimator = scale, mapping, estimator
        self.factor_range = (low, high)
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.at_train_start = at_train_start
        self.xmin_pos, self.min_evals = float(xmin_pos), min_evals
        self.exclude_first_last, self.follow_norms = exclude_first_last, follow_norms
        self.sigmoid_scales, self.sigmoid_temperature = (s_min, s_max), float(sigmoid_temperature)
        self.use_monitor, self.log_factors = use_monitor, log_factors

        #: Current factor of every balanced layer (layers not listed: 1).
        self.factors: dict[str, float] = {}
        #: Every update (:class:`~ww_monitor.balancing.records.BalanceHistory`).
        self.history = BalanceHistory()
        self.stats: dict[str, Any] = {"updates": 0, "failures": 0, "seconds": 0.0}
        #: How the weights are read for the alphas (see :mod:`.estimate`). For a sharded model the
        #: default is replaced at attach by one that gathers one layer at a time (:mod:`.sharded`).
        self.weight_source: WeightSource = LocalWeights()
        self._source: WeightSource = self.weight_source  # the one in use this run
        self._root = None  # the strategy-wrapped model (FSDP1 units), when the front door knows it
        self._sharding: str | None = None
        self._scalers: list[StepScaler] = []  # of the current (or last) run: kept for group_layers()
        self._attached = False
        self._collectives: Collectives = TorchCollectives()
        self._rank, self._world = 0, 1
        self._restored = False  # load_state_dict ran since the last attach
        self._warned_coverage = False
        self._last_step: int | None = None
        self._monitor_step: int | None = None

    # ------------------------------------------------------------------ what users read
    def effective_values(self, optimizer_index: int = 0) -> list[float]:
        """Each per-layer group's ``lr``/``weight_decay`` as the next optimizer step will use it
        (factor x scheduled value), in the order of :meth:`group_layers`."""
        return self._scaler(optimizer_index).effective()

    def group_layers(self, optimizer_index: int = 0) -> list[str | None]:
        """The balanced layer of each group the optimizer steps with (None: other parameters)."""
        return self._scaler(optimizer_index).owners

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "factors": dict(self.factors),
            "history": self.history.state_dict(),
            "last_step": self._last_step,
            "monitor_step": self._monitor_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("plans"):
            raise WWMonitorError(
                f"{type(self).__name__}: this state was saved by an earlier ww_monitor balancer that wrote per-layer "
                "param groups into the optimizer, so the checkpoint's optimizer state has that layout and cannot be "
                "resumed by this version (which keeps the optimizer's own groups). Resume it with the version that "
                "wrote it, or start a new run from the checkpoint's weights."
            )
        self.factors = {str(k): float(v) for k, v in state_dict.get("factors", {}).items()}
        self.history = BalanceHistory()
        self.history.load_state_dict(state_dict.get("history", {}))
        self._last_step = state_dict.get("last_step")
        self._monitor_step = state_dict.get("monitor_step")
        self._restored = True

    # ------------------------------------------------------------------ for the front doors
    def _scaler(self, index: int) -> StepScaler:
        if not self._scalers:
            raise WWMonitorError(f"{type(self).__name__}: not attached to an optimizer yet (training has not started).")
        return self._scalers[index]

    def _new_run(self) -> None:
        """A balancer reused for a new run (no state restored): factor 1 and an empty history."""
        if len(self.history) or self.factors:
            log.info("%s: a new run: starting with factor 1 and an empty history.", type(self).__name__)
        self.factors, self.history, self._last_step, self._monitor_step = {}, BalanceHistory(), None, None

    def _attach(self, model, optimizers: Sequence, collectives: Collectives, rank: int, world: int, root=None) -> None:
        """Hook each optimizer's step with the per-layer groups of ``model``'s balanced layers.
        ``root``: the strategy-wrapped model where it is not ``model`` (FSDP1 units are looked up
        there). Raises a ``WWMonitorError`` where the strategy cannot have per-layer groups."""
        self._detach()
        self._root, self._rank, self._world = root, int(rank), int(world)
        self._sharding = check_strategy(type(self).__name__, model, optimizers, root)
        self._source = self.weight_source
        if self._sharding is not None and isinstance(self.weight_source, LocalWeights):
            self._source = ShardedWeights(model, self._sharding, rank, world, root)
        units = self._find_units(model)
        if not units:
            rank_zero_warn(
                f"{type(self).__name__}: no layer matches the selection (include/exclude/kinds); nothing is balanced.",
                RuntimeWarning,
            )
        for i, optimizer in enumerate(optimizers):
            check_optimizer(optimizer, self.scale, i)
        self._scalers = [StepScaler(opt, units, self.scale, lambda: self.factors) for opt in optimizers]
        if units and not any(s.owned() for s in self._scalers):
            rank_zero_warn(
                f"{type(self).__name__}: none of the optimizer's parameters belongs to a balanced layer (an "
                "optimizer over other parameters, or a wrapper that hands it copies); nothing is balanced.",
                RuntimeWarning,
            )
        self._collectives = collectives
        self._restored = False
        self._attached = True

    def _detach(self) -> None:
        for s in self._scalers:  # the factors stop applying; the optimizer has its own groups
            s.remove()
        self._attached = False

    def _update(self, model, step: int, epoch: int, monitor=None, loggers: Sequence = ()) -> BalanceRecord | None:
        """Rank 0 computes the factors; every rank applies rank 0's. Never raises: a failure keeps
        the factors, with a warning. Every rank must call it at the same step (a sync point)."""
        self._last_step = step
        record, error = None, None
        t0 = time.perf_counter()
        try:
            record = self._compute(model, step, epoch, monitor if self.use_monitor else None)
        except Exception as err:  # an analysis problem must never end the training run
            error = f"{type(err).__name__}: {err}"
        self.stats["seconds"] += time.perf_counter() - t0
        record, error = self._collectives.broadcast_object((record, error), self._world)
        if error is not None:
            self.stats["failures"] += 1
            rank_zero_warn(
                f"{type(self).__name__}: computing the factors at step {step} failed ({error}); the factors "
                "stay as they were.",
                RuntimeWarning,
            )
            return None
        if record is None:  # the monitor has no newer analysis: nothing new to act on
            return None
        self.factors = {n: f for n, f, b in zip(record.layers, record.factors, record.balanced) if b}
        self.history.add(record)
        self.stats["updates"] += 1
        if self.log_factors and self._rank == 0:
            self._log(loggers, record)
        return record

    # ------------------------------------------------------------------ internals
    def _find_units(self, model):
        """The balanced units; a sharded model's are found on its stand-in view (full shapes)."""
        view = stand_in_view(model, self._root) if self._sharding is not None else None
        return find_units(model, self.include, self.exclude, self.kinds, self.follow_norms, view=view)

    def _compute(self, model, step: int, epoch: int, monitor) -> BalanceRecord | None:
        """Rank 0: the record of this update (None: the monitor has nothing newer). Other ranks:
        None, after decomposing their share of the weights when the weight source is collective."""
        units = self._find_units(model)
        latest = getattr(monitor, "latest_results", None) if monitor is not None else None
        if self._rank == 0 and latest is not None and not self._covers(units, latest[1]):
            latest = None  # (warned) the monitor watches other layers: decompose here instead
        esds: list[EsdAlpha] | None = None
        if getattr(self._source, "collective", False) and self._world > 1:
            # rank 0 decides; then every rank reads in step, each decomposing what the source yields it
            if self._collectives.broadcast_object(latest is None, self._world):
                esds = gathered_alphas(
                    units,
                    self.estimator,
                    self.xmin_pos,
                    self.min_evals,
                    self._source,
                    self._collectives,
                    self._rank,
                    self._world,
                )
            if self._rank != 0:
                return None
        elif self._rank != 0:
            return None
        if esds is None and latest is not None:
            snap_step, results = latest
            if snap_step == self._monitor_step:
                return None
            self._monitor_step = snap_step
            esds = monitor_alphas(results, self.estimator, self.xmin_pos, self.min_evals)
            source = f"monitor:{self.estimator}@{snap_step}"
        else:
            if esds is None:  # not gathered above: rank 0 decomposes every layer
                esds = own_alphas(units, self.estimator, self.xmin_pos, self.min_evals, weights=self._source)
            source = self.estimator
        alphas, reliable = unit_alphas(units, esds)
        n = len(units)
        balanced = [ok and not (self.exclude_first_last and i in (0, n - 1)) for i, ok in enumerate(reliable)]
        factors = np.ones(n)
        idx = [i for i, b in enumerate(balanced) if b]
        if idx:
            factors[idx] = balance_factors(
                [alphas[i] for i in idx], self.mapping, self.factor_range, self.sigmoid_scales, self.sigmoid_temperature
            )
        return BalanceRecord(
            step=step,
            epoch=epoch,
            source=source,
            layers=tuple(u.name for u in units),
            alphas=tuple(float(a) for a in alphas),
            balanced=tuple(balanced),
            factors=tuple(float(f) for f in factors),
        )

    def _covers(self, units, results) -> bool:
        """Whether a monitor's results hold any balanced layer (else its selection or names differ:
        warned once, and the alphas are computed here)."""
        names = {r.name for r in results}
        if not units or any(m.name in names for u in units for m in u.matrices):
            return True
        if not self._warned_coverage:
            self._warned_coverage = True
            rank_zero_warn(
                f"{type(self).__name__}: the monitor's analysis has none of the balanced layers (e.g. "
                f"{units[0].name!r}; its selection or names differ); the alphas are computed here from "
                "the weights instead.",
                RuntimeWarning,
            )
        return False

    def _metrics(self, record: BalanceRecord) -> dict[str, float]:
        tag = TAGS[self.scale]
        metrics = {f"{tag}/{n}": f for n, f in zip(record.layers, record.factors)}
        metrics.update({f"{tag}_alpha/{n}": a for n, a in zip(record.layers, record.alphas) if math.isfinite(a)})
        return metrics

    def _log(self, loggers: Sequence, record: BalanceRecord) -> None:
        """Each logger's ``log_metrics(metrics, step)`` (Lightning loggers, ww_monitor sinks)."""
        metrics = self._metrics(record)
        for lg in list(loggers or []):
            try:
                lg.log_metrics(metrics, step=record.step)
            except Exception as err:
                warnings.warn(
                    f"{type(self).__name__}: {type(lg).__name__}.log_metrics failed ({type(err).__name__}: "
                    f"{err}); the factors are still in `balancer.history`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
