"""Which parameters a balanced layer owns, and how the optimizer is split into per-layer groups.

* **Units.** A unit is one module with a weight matrix (Linear, ConvNd, Hugging Face Conv1D,
  attention, RNN): its own parameters (weight and bias), plus, with ``follow_norms``, the
  parameters of every normalisation layer registered after it and before the next unit
  (TempBalance's ``batchnorm_type='order'``: a BatchNorm follows the conv it normalises).
  Units come in the model's registration order, which decides the first and last layer.
* **Split.** Each of the user's param groups is split into one group per unit it holds (same
  settings: lr, weight decay, betas, ``initial_lr`` ...) plus one group for its remaining
  parameters. Optimizer state is keyed by parameter, so moving a parameter to another group
  moves its state with it. The split is deterministic (user's group order, then unit order,
  then the parameters' own order), so a resumed run rebuilds exactly the saved layout and
  Lightning can load the saved optimizer state into it.
* **Schedulers** attached to a split optimizer get their per-group lists (``base_lrs``,
  ``lr_lambdas``, ``_last_lr``, ...) expanded the same way, so every new group follows the
  schedule of the group it came from.
* **Applying factors** (:class:`StepScaler`): the factor multiplies ``group[key]`` only for the
  duration of ``optimizer.step()`` (torch's optimizer step pre/post hooks) and the scheduled
  value is put back right after. Outside the step every group holds exactly what the schedule
  gives, so any scheduler (closed-form or chainable, reading ``group['lr']`` or ``base_lrs``)
  composes without compounding, and checkpoints store the unscaled values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import WWMonitorError
from ..analysis.layers import LayerMatrix, LayerSelection, clean_name, matrices_from_module

__all__ = ["Unit", "find_units", "split_param_groups", "expand_schedulers", "StepScaler", "BALANCE_KINDS",
           "NORM_TYPES"]

log = logging.getLogger(__name__)

#: Layer kinds balanced by default: the weight matrices TempBalance and AlphaDecay act on
#: (Linear, Conv) and their equivalents; embeddings are left alone (the papers do too).
BALANCE_KINDS = ("linear", "conv1d_hf", "conv1d", "conv2d", "conv3d", "attention", "rnn")

#: Normalisation layers that follow the unit before them.
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

#: Per-param-group lists kept by torch's schedulers (LambdaLR/MultiplicativeLR: lr_lambdas,
#: ReduceLROnPlateau: min_lrs, CyclicLR: max_lrs/base_momentums/max_momentums, all: base_lrs,
#: _last_lr). SequentialLR and ChainedScheduler hold their schedulers in ``_schedulers``.
_PER_GROUP_ATTRS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")


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


def find_units(model: nn.Module, include=None, exclude=None, kinds: Sequence[str] | None = BALANCE_KINDS,
               follow_norms: bool = True) -> list[Unit]:
    """The balanced units of ``model`` in registration order (see the module docstring)."""
    selection = LayerSelection.build(include, exclude, kinds)
    modules = {clean_name(raw): m for raw, m in model.named_modules()}
    units: dict[str, Unit] = {}
    for name, kind, item in matrices_from_module(model, "pooled"):
        if isinstance(item, str) or selection.why_not(name, kind) is not None:
            continue
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
        for raw, module in model.named_modules():
            name = clean_name(raw)
            if name in units:
                current = units[name]
            elif isinstance(module, NORM_TYPES) and current is not None:
                own = [p for p in module.parameters(recurse=False) if id(p) not in claimed]
                if own:
                    claimed.update(id(p) for p in own)
                    current.params.extend(own)
                    current.followers.append(name)
    return [u for u in units.values() if u.params]


def _copy_value(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def split_param_groups(optimizer: torch.optim.Optimizer, units: Sequence[Unit]) -> list[tuple[int, str | None]]:
    """Split ``optimizer``'s groups into per-unit groups in place; returns the plan: for every
    new group, (index of the user's group it came from, unit name or None for the rest)."""
    owner = {id(p): u.name for u in units for p in u.params}
    order = {u.name: i for i, u in enumerate(units)}
    new_groups, plan = [], []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        buckets: dict[str | None, list[int]] = {}
        for k, p in enumerate(group["params"]):
            buckets.setdefault(owner.get(id(p)), []).append(k)
        keys = sorted((k for k in buckets if k is not None), key=order.__getitem__)
        if None in buckets:
            keys.append(None)
        for key in keys:
            idx = buckets[key]
            ng = {k: _copy_value(v) for k, v in group.items() if k not in ("params", "param_names")}
            ng["params"] = [group["params"][k] for k in idx]
            if names is not None:
                ng["param_names"] = [names[k] for k in idx]
            new_groups.append(ng)
            plan.append((gi, key))
    optimizer.param_groups[:] = new_groups
    return plan


def expand_schedulers(schedulers: Sequence, optimizer: torch.optim.Optimizer, origin: Sequence[int],
                      old_count: int) -> list[str]:
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


class StepScaler:
    """Multiplies ``group[key]`` by its unit's factor during ``optimizer.step()`` only.

    ``plan[i] = (user's group index, unit)`` for param group ``i`` (unit None: not balanced); ``factors()`` returns the
    current ``{unit: factor}``. The original value objects are put back after the step (no
    division, so no rounding drift), and also before the next step if a step raised.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: Sequence[tuple[int, str | None]], key: str,
                 factors: Callable[[], dict[str, float]]):
        self.optimizer, self.plan, self.key, self.factors = optimizer, list(plan), key, factors
        self.owners = [owner for _, owner in self.plan]
        self._saved: list[tuple[dict, object]] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer, args, kwargs):
        self.restore()
        factors = self.factors()
        for group, owner in zip(optimizer.param_groups, self.owners):
            f = factors.get(owner, 1.0) if owner is not None else 1.0
            if f != 1.0 and self.key in group:
                self._saved.append((group, group[self.key]))
                group[self.key] = group[self.key] * f
        return None

    def _post(self, optimizer, args, kwargs) -> None:
        self.restore()

    def restore(self) -> None:
        for group, value in self._saved:
            group[self.key] = value
        self._saved.clear()

    def effective(self) -> list[float]:
        """What each group's ``key`` is during a step: factor x scheduled value."""
        factors = self.factors()
        out = []
        for group, owner in zip(self.optimizer.param_groups, self.owners):
            f = factors.get(owner, 1.0) if owner is not None else 1.0
            out.append(float(group[self.key]) * f)
        return out

    def remove(self) -> None:
        self.restore()
        for h in self._handles:
            h.remove()
        self._handles = []


def check_key(optimizer: torch.optim.Optimizer, key: str, index: int) -> None:
    missing = [i for i, g in enumerate(optimizer.param_groups) if key not in g]
    if missing:
        raise WWMonitorError(
            f"`scale`={key!r}: optimizer {index} ({type(optimizer).__name__}) has no {key!r} setting in param "
            f"group(s) {missing}; balance a setting the optimizer has ('lr', or 'weight_decay' for SGD/Adam/AdamW).")
