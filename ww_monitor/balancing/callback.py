"""``SpectralBalancer``: per-layer learning rates or weight decays from the layers' spectra, as a
Lightning callback for both Lightning packages (its presets ``TempBalance`` / ``AlphaDecay`` and
the class factory are in :mod:`.presets`).

Unlike :class:`~ww_monitor.WeightWatcherCallback` this callback *changes training*: that is its
purpose. What it touches, and only that: the optimizer's param groups are split into one group
per layer (once, before the first step; settings and state kept), and during every
``optimizer.step()`` each layer's group has its ``lr`` (or ``weight_decay``) multiplied by the
layer's factor (see :mod:`.groups`). Weights, gradients, RNG and autograd are never touched.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import numpy as np

from ..core.hooks import rank_zero_warn as _rank_zero_warn
from ..core.settings import as_tuple as _as_tuple
from ..integrations.lightning_callback import WeightWatcherMixin
from ..validation import check_bool as _check_bool
from ..validation import check_int as _check_int
from ..monitoring.distributed import LightningCollectives
from ..errors import WWMonitorError
from ..functional.balancing import MAPPINGS, SIGMOID_SCALES, SIGMOID_TEMPERATURE, TEMPBALANCE_RANGE, balance_factors
from ..functional.hill import DEFAULT_XMIN_POS
from ..analysis.layers import KINDS, LayerSelection
from .estimate import ESTIMATORS, MIN_BALANCE_EVALS, monitor_alphas, own_alphas, unit_alphas
from .groups import BALANCE_KINDS, StepScaler, check_key, expand_schedulers, find_units, split_param_groups
from .records import BalanceHistory, BalanceRecord

__all__ = ["SpectralBalancerMixin", "SCALES"]

log = logging.getLogger(__name__)

SCALES = ("lr", "weight_decay")
_STATE_VERSION = 1
#: Strategies whose modules hold sharded flat parameters: per-layer param groups cannot be formed.
_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed")


def _check_number(name: str, value, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            low is not None and value < low):
        bound = f" >= {low:g}" if low is not None else ""
        raise WWMonitorError(f"`{name}` must be a finite number{bound}, got {value!r}.")
    return float(value)


def _check_pair(name: str, value) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise WWMonitorError(f"`{name}` must be a pair of numbers (low, high), got {value!r}.") from None
    a, b = _check_number(name, a, 0.0), _check_number(name, b, 0.0)
    return a, b


class SpectralBalancerMixin:
    """Per-layer learning rates (or weight decays) from each layer's power-law alpha.

    Every ``every_n_epochs`` epochs and/or ``every_n_train_steps`` optimizer steps (and at train
    start), the alpha of every balanced layer (Linear, Conv, attention, RNN; see ``kinds``) is
    estimated and mapped to a factor: larger alpha (lighter tail, under-trained) gives a larger
    factor. During each optimizer step, the layer's ``lr`` (``scale="lr"``) or ``weight_decay``
    (``scale="weight_decay"``) is ``factor x`` what the user's optimizer and LR scheduler give.
    Layers that are unreliable (fit failed, fewer than ``min_evals`` eigenvalues) and, with
    ``exclude_first_last``, the first and last layer keep factor 1; normalisation layers follow
    the layer registered before them.

    The optimizer is configured as usual; the callback splits its param groups into one group
    per layer before the first step (settings and optimizer state kept) and expands the LR
    schedulers' per-group lists to match. ``param_group["lr"]`` always shows the schedule's
    value; the factor is applied only inside ``optimizer.step()``, so schedulers compose without
    compounding (LearningRateMonitor shows the schedule; the factors are logged as
    ``ww/balance/<layer>`` and the alphas used as ``ww/balance_alpha/<layer>``).

    Example::

        import pytorch_lightning as pl          # or lightning.pytorch, with ww_monitor.lightning
        from ww_monitor import TempBalance, AlphaDecay, SpectralBalancer

        balancer = TempBalance()                # lr factors in [0.5, 1.5], every epoch
        # or AlphaDecay() (weight decay, every 500 steps), SpectralBalancer(mapping="sigmoid") ...
        trainer = pl.Trainer(max_epochs=50, callbacks=[balancer])
        trainer.fit(model, datamodule=dm)      # configure_optimizers / schedulers unchanged
        balancer.history.to_pandas()            # step, layer, alpha, factor of every update

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: ww_monitor.TempBalance
              init_args: {every_n_epochs: 1}

    Args:
        scale: ``"lr"`` or ``"weight_decay"``: the param-group setting multiplied by the factor.
        mapping: ``"linear"`` (TempBalance, AlphaDecay), ``"sqrt"``, ``"log2"``, ``"step"`` (rank
            based) or ``"sigmoid"`` (Model Balancing); see :mod:`ww_monitor.functional.balancing`.
        factor_range: ``(low, high)`` factors of the smallest and largest alpha (``linear``,
            ``step``).
        every_n_epochs: update the factors at the end of every this many epochs (``None``/0: off).
        every_n_train_steps: update every this many optimizer steps (``None``: off).
        at_train_start: also compute factors before the first step (the papers do).
        estimator: ``"hill_median"`` (the papers' Hill estimator, xmin at the median eigenvalue)
            or ``"ww"`` (ww_monitor's weightwatcher-compatible fit).
        xmin_pos: Hill estimator's xmin index ``n / xmin_pos`` (2: the median).
        min_evals: layers with fewer eigenvalues keep factor 1.
        exclude_first_last: the first and last balanced layer keep factor 1 (the papers do).
        follow_norms: normalisation layers take the factor of the layer registered before them.
        include / exclude: regexes on layer names restricting the balanced layers.
        kinds: balanced layer kinds (default: linear, conv, attention, rnn; not embeddings).
        sigmoid_scales: ``(s_min, s_max)`` of the ``sigmoid`` mapping.
        sigmoid_temperature: ``T`` of the ``sigmoid`` mapping.
        use_monitor: when a :class:`~ww_monitor.WeightWatcherCallback` is attached, take alphas
            from its latest completed analysis instead of computing them again (put this callback
            after it; with its background analysis the snapshot may be one interval old).
        log_factors: log ``ww/balance/<layer>`` and ``ww/balance_alpha/<layer>`` to the loggers.
    """

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
        if scale not in SCALES:
            raise WWMonitorError(f"`scale` must be one of {SCALES}, got {scale!r}.")
        if mapping not in MAPPINGS:
            raise WWMonitorError(f"`mapping` must be one of {MAPPINGS}, got {mapping!r}.")
        if estimator not in ESTIMATORS:
            raise WWMonitorError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
        low, high = _check_pair("factor_range", factor_range)
        if low > high:
            raise WWMonitorError(f"`factor_range` must be (low, high) with low <= high, got {factor_range!r}.")
        s_min, s_max = _check_pair("sigmoid_scales", sigmoid_scales)
        _check_number("sigmoid_temperature", sigmoid_temperature)
        if not sigmoid_temperature > 0:
            raise WWMonitorError(f"`sigmoid_temperature` must be > 0, got {sigmoid_temperature!r}.")
        _check_number("xmin_pos", xmin_pos, 1.0)
        _check_int("every_n_epochs", every_n_epochs, 0, allow_none=True)
        _check_int("every_n_train_steps", every_n_train_steps, 1, allow_none=True)
        _check_int("min_evals", min_evals, 2, allow_none=False)
        for name, flag in (("at_train_start", at_train_start), ("exclude_first_last", exclude_first_last),
                           ("follow_norms", follow_norms), ("use_monitor", use_monitor), ("log_factors", log_factors)):
            _check_bool(name, flag)
        if not every_n_epochs and not every_n_train_steps and not at_train_start:
            raise WWMonitorError("SpectralBalancer: `every_n_epochs`, `every_n_train_steps` and `at_train_start` are "
                                 "all off, so the factors would never be computed.")
        kinds_t = _as_tuple(kinds, "kinds") if kinds is not None else BALANCE_KINDS
        if any(k not in KINDS for k in kinds_t):
            raise WWMonitorError(f"`kinds` must be a subset of {list(KINDS)}, got {list(kinds_t)!r}.")
        self.include, self.exclude = _as_tuple(include, "include"), _as_tuple(exclude, "exclude")
        self.kinds = kinds_t
        LayerSelection.build(self.include, self.exclude, self.kinds)  # validates the regexes

        self.scale, self.mapping, self.estimator = scale, mapping, estimator
        self.factor_range = (low, high)
        self.every_n_epochs = every_n_epochs or None
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
        self._plans: list[list[tuple[int, str | None]]] | None = None  # per optimizer, from a checkpoint
        self._scalers: list[StepScaler] = []
        self._units = None
        self._rank, self._world = 0, 1
        self._disabled = False
        self._split_done = False
        self._last_step: int | None = None
        self._monitor_step: int | None = None
        self._trainer = None

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(scale=self.scale, mapping=self.mapping)  # type: ignore[attr-defined]

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        same = [c for c in trainer.callbacks if isinstance(c, SpectralBalancerMixin) and c.scale == self.scale]
        if len(same) > 1:
            raise WWMonitorError(f"{len(same)} balancers scale {self.scale!r} ({', '.join(type(c).__name__ for c in same)});"
                                 " their factors would multiply. Use one per setting (e.g. TempBalance for 'lr' with "
                                 "AlphaDecay for 'weight_decay').")

    def on_fit_start(self, trainer, pl_module) -> None:
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _SHARDED_STRATEGIES):
            self._disabled = True
            _rank_zero_warn(f"SpectralBalancer: the {strategy} strategy shards parameters, so per-layer param groups "
                            "cannot be formed; balancing is off for this run.", RuntimeWarning)
            return
        self._rank, self._world = int(trainer.global_rank), int(trainer.world_size)
        self._scalers, self._split_done = [], False
        if self._plans is None and not trainer.ckpt_path and (len(self.history) or self.factors):
            log.info("SpectralBalancer: a new run (no checkpoint): starting with factor 1 and an empty history.")
            self.factors, self.history, self._last_step, self._monitor_step = {}, BalanceHistory(), None, None
        # The optimizer state of a checkpoint written with this callback has per-layer groups and
        # is loaded after this hook: split now. A checkpoint without our state has the user's
        # groups: split after it is loaded (on_train_start).
        if self._plans is not None or not trainer.ckpt_path:
            self._split(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._disabled or getattr(trainer, "sanity_checking", False):
            return
        if not self._split_done:
            self._split(trainer, pl_module)
        if self.at_train_start and not len(self.history):
            self._update(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if not self._disabled and n and step % n == 0 and step != self._last_step:
            self._update(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if not self._disabled and n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step:
            self._update(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s in self._scalers:  # the groups stay split (harmless); the factors stop applying
            s.remove()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "factors": dict(self.factors),
            "history": self.history.state_dict(),
            "plans": [[list(p) for p in plan] for plan in self._current_plans()],
            "last_step": self._last_step,
            "monitor_step": self._monitor_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factors = {str(k): float(v) for k, v in state_dict.get("factors", {}).items()}
        self.history = BalanceHistory()
        self.history.load_state_dict(state_dict.get("history", {}))
        plans = state_dict.get("plans")
        self._plans = [[(int(o), u) for o, u in plan] for plan in plans] if plans else None
        self._last_step = state_dict.get("last_step")
        self._monitor_step = state_dict.get("monitor_step")

    # ------------------------------------------------------------------ public helpers
    def effective_values(self, optimizer_index: int = 0) -> list[float]:
        """Each param group's ``lr``/``weight_decay`` as the next optimizer step will use it
        (factor x scheduled value), in param-group order."""
        return self._scalers[optimizer_index].effective()

    def group_layers(self, optimizer_index: int = 0) -> list[str | None]:
        """The balanced layer of each param group (None: a group of other parameters)."""
        return list(self._scalers[optimizer_index].owners)

    # ------------------------------------------------------------------ internals
    def _current_plans(self) -> list[list[tuple[int, str | None]]]:
        if self._split_done:
            return [s.plan for s in self._scalers]
        return self._plans or []

    def _split(self, trainer, pl_module) -> None:
        self._units = find_units(pl_module, self.include, self.exclude, self.kinds, self.follow_norms)
        if not self._units:
            _rank_zero_warn("SpectralBalancer: no layer matches the selection (include/exclude/kinds); nothing is "
                            "balanced.", RuntimeWarning)
        schedulers = [cfg.scheduler for cfg in getattr(trainer, "lr_scheduler_configs", [])]
        plans = []
        for i, optimizer in enumerate(trainer.optimizers):
            check_key(optimizer, self.scale, i)
            old_count = len(optimizer.param_groups)
            plan = split_param_groups(optimizer, self._units)
            for problem in expand_schedulers(schedulers, optimizer, [o for o, _ in plan], old_count):
                _rank_zero_warn(f"SpectralBalancer: {problem}; that scheduler may not drive the per-layer groups.",
                                RuntimeWarning)
            self._scalers.append(StepScaler(optimizer, plan, self.scale, lambda: self.factors))
            plans.append(plan)
        if self._plans is not None and self._plans != plans:
            _rank_zero_warn("SpectralBalancer: the per-layer param groups differ from the checkpoint's (the model, "
                            "the optimizer or the selection changed); the optimizer state may not load.",
                            RuntimeWarning)
        self._plans = None
        self._split_done = True

    def _update(self, trainer, pl_module, epoch: int | None = None) -> None:
        """Rank 0 computes the factors; every rank applies rank 0's (identical factors under DDP)."""
        step = trainer.global_step
        epoch = trainer.current_epoch if epoch is None else epoch
        self._last_step = step
        record, error = None, None
        if self._rank == 0:
            t0 = time.perf_counter()
            try:
                record = self._compute(trainer, pl_module, step, epoch)
            except Exception as err:  # an analysis problem must never end the training run
                error = f"{type(err).__name__}: {err}"
            self.stats["seconds"] += time.perf_counter() - t0
        record, error = LightningCollectives(trainer.strategy).broadcast_object((record, error), self._world)
        if error is not None:
            self.stats["failures"] += 1
            _rank_zero_warn(f"SpectralBalancer: computing the factors at step {step} failed ({error}); the factors stay "
                            "as they were.", RuntimeWarning)
            return
        if record is None:  # the monitor has no newer analysis: nothing new to act on
            return
        self.factors = {n: f for n, f, b in zip(record.layers, record.factors, record.balanced) if b}
        self.history.add(record)
        self.stats["updates"] += 1
        if self.log_factors and self._rank == 0:
            self._log(trainer, record)

    def _monitor(self, trainer):
        if not self.use_monitor:
            return None
        return next((c for c in trainer.callbacks if isinstance(c, WeightWatcherMixin)), None)

    def _compute(self, trainer, pl_module, step: int, epoch: int) -> BalanceRecord | None:
        units = find_units(pl_module, self.include, self.exclude, self.kinds, self.follow_norms)
        monitor = self._monitor(trainer)
        latest = getattr(monitor, "latest_results", None) if monitor is not None else None
        if latest is not None:
            snap_step, results = latest
            if snap_step == self._monitor_step:
                return None
            self._monitor_step = snap_step
            esds = monitor_alphas(results, self.estimator, self.xmin_pos, self.min_evals)
            source = f"monitor:{self.estimator}@{snap_step}"
        else:
            esds = own_alphas(units, self.estimator, self.xmin_pos, self.min_evals)
            source = self.estimator
        alphas, reliable = unit_alphas(units, esds)
        n = len(units)
        balanced = [ok and not (self.exclude_first_last and i in (0, n - 1)) for i, ok in enumerate(reliable)]
        factors = np.ones(n)
        idx = [i for i, b in enumerate(balanced) if b]
        if idx:
            factors[idx] = balance_factors([alphas[i] for i in idx], self.mapping, self.factor_range,
                                           self.sigmoid_scales, self.sigmoid_temperature)
        return BalanceRecord(step=step, epoch=epoch, source=source, layers=tuple(u.name for u in units),
                             alphas=tuple(float(a) for a in alphas), balanced=tuple(balanced),
                             factors=tuple(float(f) for f in factors))

    def _log(self, trainer, record: BalanceRecord) -> None:
        metrics = {f"ww/balance/{n}": f for n, f in zip(record.layers, record.factors)}
        metrics.update({f"ww/balance_alpha/{n}": a for n, a in zip(record.layers, record.alphas) if math.isfinite(a)})
        for lg in list(getattr(trainer, "loggers", []) or []):
            try:
                lg.log_metrics(metrics, step=record.step)
            except Exception as err:
                warnings.warn(f"SpectralBalancer: {type(lg).__name__}.log_metrics failed ({type(err).__name__}: {err}); "
                              "the factors are still in `callback.history`.", RuntimeWarning, stacklevel=2)
