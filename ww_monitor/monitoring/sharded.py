"""Sharded parameters, materialised one layer at a time: DTensor (FSDP2 ``fully_shard``, tensor
parallel, both on a 2-D mesh) and DeepSpeed ZeRO-3.

A sharded parameter holds a piece of its weight on each rank, but its *global* shape is known on
every rank without communicating (``DTensor.shape``, ZeRO-3's ``ds_shape``). A snapshot of a
sharded model takes two walks of the layer finder over a view of the model
(:func:`.model_view.proxy`: shallow copies of its modules whose parameter and buffer reads are
served by a :class:`Materialiser`; the model itself is never modified).

1. **Plan** (:func:`plan_sharded`; no communication, no memory): every tensor reads as a
   stand-in, a meta tensor of its global shape, dtype and ``requires_grad`` that the selection
   takes for a real weight. The layer finder and the selection then run exactly as on the
   unsharded model: the same names, kinds, shapes, tied weights (views keep their strides and
   offsets), LoRA updates and skip reasons. Ownership, computed from shapes, is therefore the same
   on every rank (and the unsharded model's) before anything is gathered, and ``builder=None``
   (ownership without copies) works.
2. **Gather** (:func:`iter_full_matrices`; collective): the finder walks the view again, one
   layer at a time. While it produces a layer that has a selected matrix, each sharded parameter
   it reads is materialised on the ranks that get the layer, which compute on real tensors; the
   others read stand-ins throughout. The layer's matrices are handed to the caller, and the full
   weights are dropped before the next layer is read (the finder reads each weight while it
   produces the layer that uses it). Every rank runs the same sequence of collectives, and walks
   to the end even when a copy fails on it (the error is raised afterwards).

How a weight is materialised (:meth:`Materialiser.materialise`):

* A DTensor on a 1-D mesh with one ``Shard(d)`` placement (FSDP2 alone, tensor parallel alone),
  when a single rank owns the layer's matrices: ``torch.distributed.gather`` of the (padded)
  shards onto that rank only. The owner receives one layer, every other rank sends its shard and
  allocates nothing; the bytes moved are 1/world of an all-gather's
  (``benchmarks/bench_sharded.py`` measures both).
* Any other DTensor (2-D meshes, ``_StridedShard``, replicated) or a layer whose matrices have
  several owners (an attention ``in_proj`` split into q/k/v): ``DTensor.full_tensor()``, an
  all-gather over the parameter's mesh; ranks that own nothing of it drop it at once.
* ZeRO-3: ``deepspeed.zero.GatheredParameters([param])`` (an all-gather DeepSpeed runs), held
  open while the layer is read and copied, then the parameter is partitioned again.

Peak extra memory per rank: one layer's full weights (plus, kept, the copies of the matrices it
owns). :attr:`Materialiser.peak_bytes` counts the bytes of materialised weights alive at once.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..analysis.layers import FoundLayer, LayerMatrix
from ..analysis.results import SkippedLayer
from ..analysis.selection import AnalysisConfig, find_layers, select_matrices
from ..analysis.weight_access import analysable
from .model_view import is_stand_in, proxy, stand_in

__all__ = [
    "is_sharded",
    "has_sharded_parameters",
    "global_shape",
    "Materialiser",
    "Finder",
    "ShardedPlan",
    "plan_sharded",
    "iter_full_matrices",
]


def _dtensor_class():
    """``DTensor``, or None when ``torch.distributed.tensor`` was never imported (then no
    parameter can be one; checking costs no import)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_status") and hasattr(p, "ds_shape")


def is_sharded(p) -> bool:
    """Whether ``p`` holds a piece of its weight (a DTensor, a DeepSpeed ZeRO-3 parameter)."""
    if not isinstance(p, torch.Tensor):
        return False
    dtensor = _dtensor_class()
    return _is_zero3(p) or (dtensor is not None and isinstance(p, dtensor))


def has_sharded_parameters(module: nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def global_shape(p) -> torch.Size:
    """The full weight's shape, known on every rank without communicating."""
    return torch.Size(p.ds_shape) if _is_zero3(p) else p.shape


def _stand_in(p) -> torch.Tensor:
    return stand_in(global_shape(p), p.dtype, p.requires_grad)


def _single_shard_dim(p) -> int | None:
    """``d`` when ``p`` is a DTensor on a 1-D mesh with exactly one ``Shard(d)`` placement."""
    from torch.distributed.tensor import Shard

    placements: Sequence[Any] = getattr(p, "placements", ())
    if p.device_mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard:
        return None
    return placements[0].dim


def _in_mesh(p, rank: int) -> bool:
    return rank in p.device_mesh.mesh.flatten().tolist()


def _gather_to(p, dst: int) -> torch.Tensor | None:
    """The full weight of DTensor ``p`` (1-D mesh, ``Shard(d)``) on global rank ``dst``; None on
    the others, which only send their shard. Shards follow ``torch.chunk``: ``ceil(n / world)``
    rows each, the last ones shorter or empty; each is padded to that size so one contiguous
    buffer receives them all in order, and the full weight is a view of its first ``n`` rows."""
    import torch.distributed as dist

    mesh, d = p.device_mesh, _single_shard_dim(p)
    assert d is not None  # callers gather only DTensors with one Shard placement
    group, world = mesh.get_group(), mesh.size()
    n = p.shape[d]
    rows = -(-n // world)
    local = p.to_local().detach().movedim(d, 0)
    rest = tuple(local.shape[1:])
    send = local
    if local.shape[0] != rows or not local.is_contiguous():
        send = torch.zeros((rows, *rest), dtype=local.dtype, device=local.device)
        send[: local.shape[0]].copy_(local)
    if dist.get_rank() != dst:
        dist.gather(send, None, dst=dst, group=group)
        return None
    buf = torch.empty((world * rows, *rest), dtype=local.dtype, device=local.device)
    dist.gather(send, list(buf.split(rows)), dst=dst, group=group)
    return buf[:n].movedim(0, d)


class Materialiser:
    """Serves the layer finder's reads of a proxy's parameters and buffers.

    * Planning (:attr:`gather` off), or reading a layer nobody wants: a stand-in for every tensor
      (sharded or not), so the finder computes on shapes only.
    * Gathering a wanted layer: sharded parameters are materialised (:meth:`materialise`, a
      collective every rank runs); the ranks that get the layer (:attr:`target`, or every rank when
      None) read real tensors, the others stand-ins throughout, so no computation mixes the two.

    Full weights of the layer being read are kept until :meth:`release`. Counters:
    :attr:`peak_bytes` is the most bytes of materialised weights alive at once (tracked by weak
    references, so a full weight kept by mistake anywhere would show), :attr:`total_bytes` their
    sum over the walks, :attr:`gathers` the number of collectives.
    """

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.gather = False
        #: Global rank that gets the layer (gathered to it alone where possible); None: every rank.
        self.target: int | None = None
        self.peak_bytes = 0
        self.total_bytes = 0
        self.gathers = 0
        self._stand_ins: dict[int, torch.Tensor] = {}
        self._current: dict[int, torch.Tensor] = {}
        self._contexts = contextlib.ExitStack()
        self._live: list[tuple[Callable[[], object] | None, int]] = []

    def __call__(self, t):
        if not isinstance(t, torch.Tensor) or isinstance(t, nn.parameter.UninitializedTensorMixin):
            return t  # None, or a lazy module's parameter (the finder reports it as not materialised)
        if not self.gather:
            return self._stand_in(t)
        here = self.target is None or self.target == self.rank
        if not is_sharded(t):
            return t if here else self._stand_in(t)
        full = self._current.get(id(t))
        if full is None:
            full = self.materialise(t)
            self._current[id(t)] = full if here else self._stand_in(t)  # elsewhere dropped at once
        return self._current[id(t)]

    def _stand_in(self, t) -> torch.Tensor:
        s = self._stand_ins.get(id(t))
        if s is None:  # one per tensor for the plan's life: tied weights read as one tensor
            s = self._stand_ins[id(t)] = _stand_in(t)
        return s

    def materialise(self, p) -> torch.Tensor | None:
        """``p``'s full weight (collective: every rank of its mesh calls it); None on the ranks
        that only sent their shard."""
        self.gathers += 1
        if _is_zero3(p):
            import deepspeed  # a ZeRO-3 parameter means deepspeed is there

            self._contexts.enter_context(deepspeed.zero.GatheredParameters([p], modifier_rank=None))
            self._count(None, p.numel() * p.element_size())
            return p
        with torch.no_grad():
            if self.target is not None and _single_shard_dim(p) is not None and _in_mesh(p, self.target):
                full = _gather_to(p, self.target)
            else:
                full = p.full_tensor()
        if full is None:
            return None
        local = p.to_local()
        if full.numel() and local.numel() and full.data_ptr() == local.data_ptr():  # replicated: no new memory
            return full
        self._count(weakref.ref(full), full.numel() * full.element_size())
        return full

    def _count(self, ref, nbytes: int) -> None:
        self._live = [(r, b) for r, b in self._live if r is None or r() is not None]
        self._live.append((ref, nbytes))
        self.total_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, sum(b for _, b in self._live))

    def release(self) -> None:
        """Drop the current layer's full weights (ZeRO-3: partition them again)."""
        self._current.clear()
        self._contexts.close()
        self._contexts = contextlib.ExitStack()
        self._live = [(r, b) for r, b in self._live if r is not None and r() is not None]

    @property
    def live_bytes(self) -> int:
        """Bytes of materialised weights still alive (0 after :meth:`release` unless one leaked)."""
        return sum(b for r, b in self._live if r is None or r() is not None)


#: A layer finder other than the selection's: ``finder(module, tap)`` -> ``(layer name, kind,
#: [LayerMatrix] or reason)`` in model order, with ``tap`` wrapped around the per-module finder's
#: output (``lambda m, tap: tap(matrices_from_module(m))`` is the per-module finder alone).
Finder = Callable[[nn.Module, Callable], Iterator[FoundLayer]]


class _Walk:
    """One walk of the layer finder over a proxy, telling the :class:`Materialiser` which layer
    each weight read belongs to: the per-module finder's layer being produced (*inner* ``j``), or,
    when the adapters read LoRA factors, the walk's layer being produced (*outer* ``k``).
    ``policy(scope, index)`` -> ``(gather, target)`` sets how those reads are served."""

    def __init__(
        self,
        proxy: nn.Module,
        config: AnalysisConfig | None,
        read: Materialiser,
        policy: Callable[[str, int], tuple[bool, int | None]] | None = None,
        finder: Finder | None = None,
    ) -> None:
        self.read, self.policy = read, policy
        self.inner: list = []  # the per-module finder's layers, in order (their matrices renamed by the walk)
        self._k = 0
        if finder is not None:
            found = finder(proxy, self._tap)
        elif config is not None:
            found = find_layers(proxy, config, tap=self._tap)
        else:
            raise ValueError("a sharded walk needs a config or a finder")
        self._walk: Iterator[FoundLayer] = iter(found)

    def _set(self, scope: str, index: int) -> None:
        if self.policy is not None:
            self.read.gather, self.read.target = self.policy(scope, index)

    def _tap(self, found):
        it, j = iter(found), 0
        while True:
            self._set("inner", j)
            try:
                entry = next(it)
            except StopIteration:
                return
            finally:
                self._set("outer", self._k)
            if self.policy is None:  # planning: remember the layers (their weights are stand-ins)
                self.inner.append(entry[2])
            yield entry
            if self.policy is not None and not isinstance(entry[2], str):
                # The finder asks for the next layer, so it is done with this one; whoever still
                # holds the list (the adapters' loop variable) must not keep its full weights alive.
                for m in entry[2]:
                    m.weight, m.reads = None, ()
            del entry
            j += 1

    def close(self) -> None:
        """End the finder's walk now (its generators hold this walk: a cycle the collector would free later)."""
        close = getattr(self._walk, "close", None)  # a generator's (a finder may return any iterator)
        if close is not None:
            close()
        self._walk = iter(())

    def __iter__(self):
        return self

    def __next__(self):
        self._set("outer", self._k)
        entry = next(self._walk)
        self._k += 1
        return entry


@dataclass
class ShardedPlan:
    """The selection of a sharded model, from global shapes (see the module docs).

    ``matrices`` (stand-in weights) and ``skipped`` are what :func:`select_matrices` gives for the
    unsharded model (with a ``finder``: every matrix it finds, none skipped); callers may rename
    them. ``materialiser`` holds the memory counters."""

    matrices: list[LayerMatrix]
    skipped: list[SkippedLayer]
    materialiser: Materialiser
    _proxy: nn.Module
    _config: AnalysisConfig | None
    _outer: list[tuple[str, ...]]  # names of each layer of the walk
    _inner: list[tuple[str, ...]]  # names (after the walk) of each layer of the per-module finder
    _raw_names: list[str]
    _finder: Finder | None = None


def _names(item) -> tuple[str, ...]:
    return () if isinstance(item, str) else tuple(m.name for m in item)


def plan_sharded(module: nn.Module, config: AnalysisConfig | None = None, finder: Finder | None = None) -> ShardedPlan:
    """Select the matrices of ``module`` (sharded parameters read as stand-ins), by ``config``'s
    selection or, given a ``finder``, every matrix it finds. Local: no collective."""
    read = Materialiser()
    view = proxy(module, read)
    found: list = []
    walk = _Walk(view, config, read, finder=finder)
    outer = []
    for _, _, item in walk:
        outer.append(_names(item))
        if finder is not None and not isinstance(item, str):
            found.extend(item)
    inner = [_names(item) for item in walk.inner]
    walk.close()
    # Without a finder the walk above required a config.
    matrices, skipped = select_matrices(view, config) if finder is None and config is not None else (found, [])
    return ShardedPlan(matrices, skipped, read, view, config, outer, inner, [m.name for m in matrices], finder)


def iter_full_matrices(
    plan: ShardedPlan, owner: Callable[[LayerMatrix], int | None] | None = None, rank: int = 0
) -> Iterator[LayerMatrix]:
    """The plan's selected matrices with their full weights, one layer at a time (collective:
    every rank iterates to the end, in the same order; stopping early leaves the others waiting).

    ``owner`` (plan matrix -> global rank, or None: not wanted, e.g. frozen and carried forward):
    yield only this ``rank``'s matrices; a layer whose wanted matrices all have one owner is
    gathered to that rank alone where the placement allows, a layer with none is not gathered.
    None: every rank gets every matrix. A yielded weight is valid until the next one is
    requested; drop it before asking (``del m`` at the end of the loop body), or two layers are
    alive at once. A matrix that cannot be read is left out and reported in one error after the
    walk.
    """
    by_raw = dict(zip(plan._raw_names, plan.matrices))

    def wanted(raw: str) -> bool:
        return raw in by_raw and (owner is None or owner(by_raw[raw]) is not None)

    def serving(names: tuple[str, ...]) -> tuple[bool, int | None]:
        owners = {owner(by_raw[n]) for n in names if wanted(n)} if owner is not None else set()
        return any(wanted(n) for n in names), (next(iter(owners)) if len(owners) == 1 else None)

    served = {"outer": [serving(names) for names in plan._outer], "inner": [serving(names) for names in plan._inner]}

    def policy(scope: str, index: int) -> tuple[bool, int | None]:
        layers = served[scope]
        return layers[index] if index < len(layers) else (False, None)

    read = plan.materialiser
    read.rank = rank
    walk = _Walk(plan._proxy, plan._config, read, policy, plan._finder)
    problems: list[str] = []  # raised after the walk: stopping halfway would leave the other ranks waiting
    try:
        for names in plan._outer:
            _, _, item = next(walk)
            if _names(item) != names:  # the same on every rank (the same model): they all stop here
                raise RuntimeError("the model's layers changed between the plan and the gather of a snapshot")
            full = {m.name: m for m in item} if not isinstance(item, str) else {}
            del item
            for raw in names:
                if not wanted(raw):
                    continue
                ref = by_raw[raw]
                if owner is not None and owner(ref) != rank:
                    continue
                form = _full_form(full[raw].weight)
                if isinstance(form, str):
                    problems.append(f"{ref.name}: {form}")
                    continue
                yield LayerMatrix(
                    ref.name, ref.kind, form[0], ref.eig_scale, ref.aliases, ref.stored_dtype, frozen=ref.frozen
                )
                del form  # a full weight must not outlive its layer
            del full
            read.release()
    finally:
        walk.close()
        read.gather, read.target = False, None
        read.release()
    if problems:
        raise RuntimeError("; ".join(problems))


def _full_form(weight) -> tuple | str:
    """:func:`analysable` of a gathered weight, or why there is none."""
    if is_stand_in(weight):
        return "its weight was not gathered (the layer finder used a weight read for another layer)"
    return analysable(weight)  # a reason only if the dtype differs from the plan's, which cannot happen
