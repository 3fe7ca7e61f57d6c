"""Which strategy shards a model, and a view of it with every weight at its full shape.

* :func:`sharding_of`: FSDP1 units, DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)
  or DeepSpeed ZeRO-3 partitioned parameters; the one detection the monitor
  (:func:`.distributed.parallelism`) and the balancers (:mod:`ww_monitor.balancing.sharded`) use.
* :func:`stand_in_view`: the model as the layer finder would see it unsharded (names, kinds,
  shapes), with no communication and no memory: every tensor reads as a stand-in
  (:func:`.model_view.stand_in`) of its full shape. DTensor and ZeRO-3 parameters know their
  global shape; an FSDP1 original parameter (``use_orig_params=True``) is, outside
  ``summon_full_params``, a 1-D view of this rank's piece of its flat parameter, so its shape is
  taken from the flat parameter's metadata (:func:`fsdp_full_shapes`).
"""

from __future__ import annotations

import torch
from torch import nn

from .model_view import proxy, stand_in
from .sharded import Materialiser, _dtensor_class, _is_zero3

__all__ = ["FSDP1", "DTENSOR", "ZERO3", "sharding_of", "fsdp_full_shapes", "stand_in_view"]

#: What :func:`sharding_of` returns: FSDP1 units, DTensor parameters (FSDP2, tensor parallel), ZeRO-3.
FSDP1, DTENSOR, ZERO3 = "fsdp", "dtensor", "zero3"


def sharding_of(module: nn.Module, root: nn.Module | None = None) -> str | None:
    """What shards ``module``'s parameters: :data:`FSDP1` (a ``FullyShardedDataParallel`` unit in
    ``root``, the strategy-wrapped model, or else in ``module``), :data:`DTENSOR`, :data:`ZERO3`,
    or None (plain or replicated parameters)."""
    for m in (root if root is not None else module).modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return FSDP1
    dtensor = _dtensor_class()
    for p in module.parameters():
        if _is_zero3(p):
            return ZERO3
        if dtensor is not None and isinstance(p, dtensor):
            return DTENSOR
    return None


def fsdp_full_shapes(root: nn.Module) -> dict[int, torch.Size]:
    """FSDP1 with ``use_orig_params=True``: ``{id(original parameter): its full shape}`` from each
    unit's flat-parameter metadata (the shapes it was flattened from; no communication). Units
    without original parameters (``use_orig_params=False``, or no parameters) add nothing."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    shapes: dict[int, torch.Size] = {}
    for unit in FSDP.fsdp_modules(root):
        flat = getattr(getattr(unit, "_handle", None), "flat_param", None)
        params = getattr(flat, "_params", None)
        if flat is None or params is None:
            continue
        by_slot = {}
        for p, info, shape in zip(params, flat._param_infos, flat._shapes):
            shapes[id(p)] = by_slot[(id(info.module), info.param_name)] = torch.Size(shape)
        for p, info in zip(flat._shared_params or (), flat._shared_param_infos):  # tied: the primary's shape
            shapes.setdefault(id(p), by_slot[(id(info.prim_module), info.prim_param_name)])
    return shapes


def stand_in_view(module: nn.Module, root: nn.Module | None = None) -> nn.Module:
    """A view of ``module`` (:func:`.model_view.proxy`; FSDP1 wrappers removed) whose every
    parameter and buffer reads as a stand-in of its full shape. ``root``: the strategy-wrapped
    model, where FSDP1 units are looked up (default ``module``)."""
    if sharding_of(module, root) != FSDP1:
        return proxy(module, Materialiser())  # a materialiser that is not gathering serves stand-ins
    shapes = fsdp_full_shapes(root if root is not None else module)
    made: dict[int, torch.Tensor] = {}  # one stand-in per tensor, so tied weights stay one

    def read(t):
        if not isinstance(t, torch.Tensor) or isinstance(t, nn.parameter.UninitializedTensorMixin):
            return t
        if id(t) not in made:
            made[id(t)] = stand_in(shapes.get(id(t), t.shape), t.dtype, t.requires_grad)
        return made[id(t)]

    return proxy(module, read, unwrap=True)
