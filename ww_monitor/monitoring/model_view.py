"""Shallow views of a model whose tensor reads go through a callback, for reading a model's
weights without modifying it: :func:`proxy` (every parameter and buffer read is served by a
function, e.g. as a stand-in or a gathered full weight) and :func:`without_wrappers` (FSDP1 /
activation-checkpointing wrappers replaced by what they wrap).

A view shares everything with the model (classes, buffers, hooks, the tensors themselves) except
the modules' parameter and buffer tables and their children tables; building one costs a dict
copy per module. :func:`stand_in` makes the tensors a shape-only read returns: meta tensors the
layer selection takes for real weights (see :mod:`.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["stand_in", "is_stand_in", "proxy", "without_wrappers"]

#: Bit shift that keeps a stand-in's fake address (storage identity, byte offset) unique: no
#: weight has 2**64 bytes, so distinct storages never meet however far a view is offset.
_ADDRESS_SHIFT = 64


class _StandIn(torch.Tensor):
    """A meta tensor that the selection takes for a real weight: shape, strides, storage offset
    and dtype, no memory. ``is_meta`` reads False (else the selection would skip it as "not
    materialised"); ``data_ptr`` is a fake address unique to its storage and offset, so tied
    weights (one stand-in per parameter) are recognised and views of one weight (q/k/v) are not."""

    @property
    def is_meta(self) -> bool:  # type: ignore[override]  # an attribute in torch's stubs, a property here
        return False

    def data_ptr(self) -> int:
        storage = self.untyped_storage()
        base = getattr(storage, "_cdata", None) or id(storage)
        return (base << _ADDRESS_SHIFT) + int(self.storage_offset()) * self.element_size()


def stand_in(shape, dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` without memory that the selection takes for a weight."""
    meta = torch.empty(shape, dtype=dtype, device="meta")
    return torch.Tensor._make_subclass(_StandIn, meta, bool(requires_grad and dtype.is_floating_point))


def is_stand_in(t) -> bool:
    return isinstance(t, _StandIn)


class _TensorTable(dict):
    """A view's ``_parameters`` / ``_buffers``: every read goes through the callback, lazily
    (iterating reads one entry at a time, so each is read while the layer finder produces the
    layer that uses it)."""

    def __init__(self, tensors, read: Callable) -> None:
        super().__init__(tensors)
        self._read = read

    def __getitem__(self, key):
        return self._read(dict.__getitem__(self, key))

    def get(self, key, default=None):
        # Not self.get (that is this method): the lookup must go through __getitem__'s read.
        return self[key] if key in self else default  # noqa: SIM401

    def items(self):
        return ((k, self[k]) for k in list(dict.keys(self)))

    def values(self):
        return (self[k] for k in list(dict.keys(self)))


#: Wrapper modules (FSDP1 units, activation checkpointing, CPU offload) and the attribute holding
#: what they wrap. They forward attribute reads to it, so the finder would see each weight twice.
_WRAPPERS = {
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
}


def _unwrap(module: nn.Module) -> nn.Module:
    while type(module).__name__ in _WRAPPERS:
        module = getattr(module, _WRAPPERS[type(module).__name__])
    return module


def proxy(
    module: nn.Module, read: Callable, memo: dict[int, nn.Module] | None = None, unwrap: bool = False
) -> nn.Module:
    """A shallow copy of ``module`` and its children (same classes, buffers, hooks; a module
    registered twice stays one) whose parameter and buffer reads go through ``read``. ``unwrap``:
    FSDP1 / activation-checkpointing wrappers are replaced by the modules they wrap."""
    memo = {} if memo is None else memo
    if unwrap:
        module = _unwrap(module)
    clone = memo.get(id(module))
    if clone is not None:
        return clone
    clone = object.__new__(type(module))  # not type(module)(): FSDP2's classes override __new__
    memo[id(module)] = clone
    clone.__dict__.update(module.__dict__)
    clone.__dict__["_parameters"] = _TensorTable(module._parameters, read)
    clone.__dict__["_buffers"] = _TensorTable(module._buffers, read)
    clone.__dict__["_modules"] = {
        k: (None if c is None else proxy(c, read, memo, unwrap)) for k, c in module._modules.items()
    }
    return clone


def without_wrappers(module: nn.Module) -> nn.Module:
    """A view of ``module`` (shallow copies of its modules, the same tensors) with FSDP1 units and
    activation-checkpointing wrappers replaced by the modules they wrap: names without
    ``_fsdp_wrapped_module``, each layer seen once (LoRA layers whose parts are wrapped apart
    included). Take it while the parameters to read are materialised (FSDP1 swaps them in)."""
    return proxy(module, lambda t: t, unwrap=True)
