"""Which parameters a balanced layer owns, and how the optimizer steps with one group per layer.

* **Units.** A unit is one module with a weight matrix (Linear, ConvNd, Hugging Face Conv1D,
  attention, RNN): its own parameters (weight and bias), plus, with ``follow_norms``, the
  parameters of every normalisation layer registered after it and before the next unit
  (TempBalance's ``batchnorm_type='order'``: a BatchNorm follows the conv it normalises).
  Units come in the model's registration order, which decides the first and last layer.
  Ownership is per parameter (the optimizer's own parameter objects), so it holds for any
  optimizer layout and for per-parameter sharding (FSDP ``use_orig_params=True``, FSDP2 DTensors).
* **Per-layer groups, during the step only** (:class:`StepScaler`). Just before each
  ``optimizer.step()`` (torch's step pre-hook) the optimizer's param groups are replaced by one
  group per (user's group, unit) (:func:`layer_plan`): same settings as the user's group
  (``lr``, weight decay, betas, ``initial_lr`` ...: the values are shared, not copied), with
  ``lr`` (or ``weight_decay``) times the unit's factor, plus one group for the group's other
  parameters. Right after the step (post-hook) the user's own group dicts are put back. The
  optimizer state is keyed by parameter, so it is the same in either layout. Outside the step
  the optimizer is exactly what the user built: LR schedulers (closed-form, chainable,
  ``ReduceLROnPlateau``, the Hugging Face Trainer's) drive the user's groups and never see a
  factor, nothing compounds, and checkpoints (Lightning, the Trainer's ``optimizer.pt``, a
  plain ``torch.save``) hold the user's layout and unscaled values, so they load with or
  without a balancer, whenever it attaches.
* **Permanent split** (:func:`split_param_groups`, :func:`expand_schedulers`): the same layout
  written into the optimizer for good, with the schedulers' per-group lists expanded to match
  (kept as a utility; the balancers use the step-time groups).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..analysis.layers import LayerMatrix, LayerSelection, clean_name, matrices_from_module
from ..errors import WWMonitorError
from ..monitoring.distributed import strip_wrapper_names

__all__ = [
    "Unit",
    "find_units",
    "layer_plan",
    "split_param_groups",
    "expand_schedulers",
    "StepScaler",
    "unwrap_optimizer",
    "check_optimizer",
    "BALANCE_KINDS",
    "NORM_TYPES",
]

log = logging.getLogger(__name__)

#: Layer kinds balanced by default: the weight matrices TempBalance and AlphaDecay act on
#: (Linear, Conv) and their equivalents; embeddings are left alone (the papers do too).
BALANCE_KINDS = ("linear", "conv1d_hf", "conv1d", "conv2d", "conv3d", "attention", "rnn")

#: Normalisation layers that follow the unit before them.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

#: Per-param-group lists kept by torch's schedulers (LambdaLR/MultiplicativeLR: lr_lambdas,
#: ReduceLROnPlateau: min_lrs, CyclicLR: max_lrs/base_momentums/max_momentums, all: base_lrs,
#: _last_lr). SequentialLR and ChainedScheduler hold their schedulers in ``_schedulers``.
_PER_GROUP_ATTRS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")
#: Wrappers around the torch optimizer followed by :func:`unwrap_optimizer` (accelerate's
#: AcceleratedOptimizer, Lightning's LightningOptimizer; one or two levels in practice).
_MAX_WRAPPERS = 4


@dataclass
class Unit:
    """One balanced layer: its ESDs (live views of the weights) and the parameters it steers."""

    name: str
    kind: str
    matrices: list[LayerMatrix] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)

    @property
    def num_evals(self) -> int:
        return sum(m.num_evals for m in self.matrices)


def find_units(
    model: nn.Module,
    include=None,
    exclude=None,
    kinds: Sequence[str] | None = BALANCE_KINDS,
    follow_norms: bool = True,
    view: nn.Module | None = None,
) -> list[Unit]:
    """The balanced units of ``model`` in registration order (see the module docstring), named
    as the monitor names its layers (wrapper segments such as DDP's ``module.``, Fabric's
    ``_forward_module.`` or activation checkpointing's removed), so a monitor's results match.
    ``view``: where the layers' weights are read instead (a sharded model's
    :func:`~ww_monitor.monitoring.sharding.stand_in_view`: full shapes, no data); the parameters
    each unit steers are always ``model``'s own, found by the same names."""
    selection = LayerSelection.build(include, exclude, kinds)
    modules = {_name(raw): m for raw, m in model.named_modules()}
    units: dict[str, Unit] = {}
    for raw, kind, item in matrices_from_module(view if view is not None else model, "pooled"):
        name = strip_wrapper_names(raw)
        if isinstance(item, str) or selection.why_not(name, kind) is not None:
            continue
        for m in item:
            m.name = strip_wrapper_names(m.name)
        unit = units.setdefault(name, Unit(name, kind))
        unit.matrices.extend(item)
    claimed: set[int] = set()
    for unit in units.values():
        module = modules.get(unit.name)
        if module is None:  # out_proj of a MultiheadAttention is a real child module, so this is rare
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in claimed:
                claimed.add(id(p))
                unit.params.append(p)
    if follow_norms:
        current: Unit | None = None
        for raw, mod in model.named_modules():
            name = _name(raw)
            if name in units:
                current = units[name]
            elif isinstance(mod, NORM_TYPES) and current is not None:
                own = [p for p in mod.parameters(recurse=False) if id(p) not in claimed]
                if own:
                    claimed.update(id(p) for p in own)
                    current.params.extend(own)
                    current.followers.append(name)
    return [u for u in units.values() if u.params]


def _name(raw: str) -> str:
    return strip_wrapper_names(clean_name(raw))


def _copy_value(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def layer_plan(
    groups: Sequence[dict], owner: dict[int, str], order: dict[str, int]
) -> list[tuple[int, str | None, list[int]]]:
    """The per-layer layout of ``groups``: for every new group, (index of the user's group it
    comes from, unit name or None for the group's other parameters, indices of its parameters in
    the user's group). Deterministic: user's group order, then unit order, then the parameters'
    own order. ``owner`` maps ``id(parameter)`` to its unit, ``order`` a unit to its position."""
    plan: list[tuple[int, str | None, list[int]]] = []
    for gi, group in enumerate(groups):
        buckets: dict[str | None, list[int]] = {}
        for k, p in enumerate(group["params"]):
            buckets.setdefault(owner.get(id(p)), []).append(k)
        keys: list[str | None] = [*sorted((k for k in buckets if k is not None), key=order.__getitem__)]
        if None in buckets:
            keys.append(None)
        plan.extend((gi, key, buckets[key]) for key in keys)
    return plan


def _owners(units: Sequence[Unit]) -> tuple[dict[int, str], dict[str, int]]:
    return {id(p): u.name for u in units for p in u.params}, {u.name: i for i, u in enumerate(units)}


def _subgroup(group: dict, idx: Sequence[int], copy=_copy_value) -> dict:
    """A group holding the parameters ``idx`` of ``group``, with its settings."""
    ng = {k: copy(v) for k, v in group.items() if k not in ("params", "param_names")}
    ng["params"] = [group["params"][k] for k in idx]
    if "param_names" in group:
        ng["param_names"] = [group["param_names"][k] for k in idx]
    return ng


def split_param_groups(optimizer: torch.optim.Optimizer, units: Sequence[Unit]) -> list[tuple[int, str | None]]:
    """Split ``optimizer``'s groups into per-unit groups in place, for good; returns the plan: for
    every new group, (index of the user's group it came from, unit name or None for the rest)."""
    plan = layer_plan(optimizer.param_groups, *_owners(units))
    optimizer.param_groups[:] = [_subgroup(optimizer.param_groups[gi], idx) for gi, _, idx in plan]
    return [(gi, unit) for gi, unit, _ in plan]


def expand_schedulers(
    schedulers: Sequence, optimizer: torch.optim.Optimizer, origin: Sequence[int], old_count: int
) -> list[str]:
    """Expand the per-group lists of the schedulers driving ``optimizer`` after a split (new group
    ``i`` takes the entry of old group ``origin[i]``). Returns warnings for lists left unchanged."""
    problems: list[str] = []
    seen: set[int] = set()

    def expand(s) -> None:
        if id(s) in seen:
            return
        seen.add(id(s))
        for attr in _PER_GROUP_ATTRS:
            value = s.__dict__.get(attr)
            if isinstance(value, (list, tuple)):
                if len(value) == old_count:
                    s.__dict__[attr] = type(value)(_copy_value(value[o]) for o in origin)
                elif len(value) != len(origin):
                    problems.append(f"{type(s).__name__}.{attr} has {len(value)} entries for {old_count} groups")
        for sub in s.__dict__.get("_schedulers", ()) or ():
            expand(sub)

    for s in schedulers:
        if getattr(s, "optimizer", None) is optimizer:
            expand(s)
    return problems


def _shared(value):
    return value


def unwrap_optimizer(optimizer):
    """The torch optimizer inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): the one whose step hooks run and whose groups the step reads."""
    seen = 0
    while seen < _MAX_WRAPPERS:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer, seen = inner, seen + 1
    return optimizer


class StepScaler:
    """One group per layer, with ``group[key]`` times the layer's factor, inside ``optimizer.step()`` only.

    ``units`` decide which parameters each layer owns (:func:`layer_plan`); ``factors()``
    returns the current ``{unit: factor}`` (absent: 1). The user's group dicts are put back right
    after the step, and before the next one if a step raised. A setting that the optimizer itself
    changed in the per-layer groups during the step (optimizers that keep state in their groups)
    is written back to the user's group when all its layers agree, else with a warning.

    Several scalers on one optimizer (``TempBalance`` with ``AlphaDecay``) nest: the second splits
    the first's per-layer groups (so their selections may differ) and they are unwound last-in,
    first-out (torch runs post-hooks in registration order, so the first one unwinds them all).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, units: Sequence[Unit], key: str, factors: Callable[[], dict[str, float]]
    ):
        self.optimizer, self.key, self.factors = unwrap_optimizer(optimizer), key, factors
        self._owner, self._order = _owners(units)
        #: (groups, their parameter lists, their sizes, layer_plan of them): see ``plan``.
        self._layout: tuple[tuple, tuple, tuple[int, ...], list[tuple[int, str | None, list[int]]]] | None = None
        self._user: list[dict] | None = None  # the groups in place before this scaler's, during the step
        self._step_groups: list[dict] = []
        self._warned: set[str] = set()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre),
            self.optimizer.register_step_post_hook(self._post),
        ]

    @property
    def plan(self) -> list[tuple[int, str | None, list[int]]]:
        """The per-layer layout of the groups this scaler splits (cached while they are the same
        objects holding the same parameter lists; the cache keeps them alive, so ids stay valid)."""
        groups = tuple(self._user if self._user is not None else self.optimizer.param_groups)
        params = tuple(g["params"] for g in groups)
        sizes = tuple(len(p) for p in params)
        cached = self._layout
        if (
            cached is None
            or cached[2] != sizes
            or any(a is not b for a, b in zip(cached[0] + cached[1], groups + params))
        ):
            self._layout = cached = (groups, params, sizes, layer_plan(groups, self._owner, self._order))
        return cached[3]

    @property
    def owners(self) -> list[str | None]:
        """The unit of each group the step uses (None: the parameters of no balanced layer)."""
        return [unit for _, unit, _ in self.plan]

    def owned(self) -> int:
        """How many of the optimizer's parameters belong to a balanced layer."""
        return sum(len(idx) for _, unit, idx in self.plan if unit is not None)

    def _pre(self, optimizer, args, kwargs):
        stack = _ACTIVE.setdefault(optimizer, [])
        if self in stack:  # a step raised after our pre-hook: its groups are still in place
            _unwind(stack, self, write_back=False)
        factors, key = self.factors(), self.key
        self._user = list(optimizer.param_groups)
        groups = []
        for gi, unit, idx in self.plan:
            group = _subgroup(self._user[gi], idx, copy=_shared)
            f = factors.get(unit, 1.0) if unit is not None else 1.0
            if f != 1.0 and key in group:
                group[key] = group[key] * f
            groups.append(group)
        self._step_groups = groups
        optimizer.param_groups[:] = groups
        stack.append(self)
        return None

    def _post(self, optimizer, args, kwargs) -> None:
        _unwind(_ACTIVE.get(optimizer, []), self, write_back=True)

    def _write_back(self) -> None:
        """Settings the optimizer changed in the per-layer groups during the step, back into the user's."""
        user = self._user
        if user is None:  # not inside a step (only a scaler whose pre-hook ran is unwound)
            return
        changed: dict[tuple[int, str], list] = {}
        for (gi, _, _), group in zip(self.plan, self._step_groups):
            for k, v in group.items():
                if k not in ("params", "param_names", self.key) and v is not user[gi].get(k, _MISSING):
                    changed.setdefault((gi, k), []).append(v)
        for (gi, k), values in changed.items():
            if not all(_same(v, values[0]) for v in values) and k not in self._warned:
                self._warned.add(k)
                log.warning(
                    "SpectralBalancer: %s changed the param-group setting %r differently in different "
                    "layers during its step; the first layer's value is kept for the whole group.",
                    type(self.optimizer).__name__,
                    k,
                )
            user[gi][k] = values[0]

    def _restore(self) -> None:
        """Put back the groups that were in place before this scaler's (the same dicts, same list)."""
        if self._user is not None:
            self.optimizer.param_groups[:] = self._user
            self._user, self._step_groups = None, []

    def effective(self) -> list[float]:
        """What each per-layer group's ``key`` is during a step: factor x the user's group value."""
        factors = self.factors()
        groups = self._user if self._user is not None else self.optimizer.param_groups
        return [
            float(groups[gi][self.key]) * (factors.get(unit, 1.0) if unit is not None else 1.0)
            for gi, unit, _ in self.plan
        ]

    def remove(self) -> None:
        _unwind(_ACTIVE.get(self.optimizer, []), self, write_back=False)
        for h in self._handles:
            h.remove()
        self._handles = []


#: Scalers whose groups are in place, per optimizer, in the order they were applied.
_ACTIVE: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[StepScaler]] = weakref.WeakKeyDictionary()


def _unwind(stack: list[StepScaler], down_to: StepScaler, write_back: bool) -> None:
    """Restore the scalers applied after ``down_to`` and ``down_to`` itself, last first."""
    while down_to in stack:
        top = stack.pop()
        if write_back:
            top._write_back()
        top._restore()


_MISSING = object()


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else bool(torch.equal(a, b))
    except Exception:  # values that cannot be compared are treated as different
        return False


def check_optimizer(optimizer, key: str, index: int) -> None:
    """A torch optimizer whose every group has ``key``, and that steps its groups one by one."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise WWMonitorError(
            f"optimizer {index} must be a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}."
        )
    if isinstance(inner, torch.optim.LBFGS):
        raise WWMonitorError(
            f"optimizer {index} is LBFGS, which steps all parameters with its first group's "
            "settings: per-layer learning rates or weight decays cannot apply to it."
        )
    missing = [i for i, g in enumerate(inner.param_groups) if key not in g]
    if missing:
        raise WWMonitorError(
            f"`scale`={key!r}: optimizer {index} ({type(inner).__name__}) has no {key!r} setting in param "
            f"group(s) {missing}; balance a setting the optimizer has ('lr', or 'weight_decay' for SGD/Adam/AdamW)."
        )
