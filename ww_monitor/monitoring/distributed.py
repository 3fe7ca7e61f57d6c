"""Distributed snapshots: shard the per-layer analysis across ranks and gather the results.

* **Sharding.** Every rank finds the same selected matrices in the same order (the model is
  the same on every rank), so each can compute the same owner for every matrix without
  communicating: a greedy balance of the estimated eigensolve cost (N * M^2 per slice, largest
  first, ties to the lowest rank). A rank copies and analyses only the matrices it owns.
* **Gathering** goes through a small interface, :class:`Collectives` (``is_initialized``,
  ``all_gather_object``, ``broadcast_object``), so the engine does not depend on one
  communication layer: :class:`TorchCollectives` (the default process group of
  ``torch.distributed``, gloo or NCCL: plain loops, ``torchrun``, ``accelerate``, the Hugging Face
  Trainer) and :class:`LightningCollectives` (a Lightning ``Strategy``'s own collectives,
  chosen by the Lightning callback). The engine calls them only at hook points every rank reaches
  at the same time (sync points), never from the worker thread.
* **Sharded parameters** are never gathered whole on one rank.

  - DTensor parameters (FSDP2 ``fully_shard``, Lightning's ``ModelParallelStrategy``, tensor
    parallel ``parallelize_module``, both on a 2-D mesh) and DeepSpeed ZeRO-3 partitioned
    parameters: the selection and the ownership come from the global shapes, with no
    communication (so ``collect_into(builder=None)`` works), and the same greedy balance as an
    unsharded model gives the same owners; then the layers are materialised one at a time, to
    their owner where the placement allows, copied by it and freed (:mod:`.sharded`).
  - FSDP1 (``FullyShardedDataParallel``): the full weights exist only inside
    ``summon_full_params``; units are summoned one at a time (``recurse=False``), except that the
    units holding one LoRA layer (base weight, A, B) are summoned together, and the layers newly
    visible in each are selected through a view without the FSDP wrappers. Ownership is balanced
    unit by unit (shapes are unknown before a unit is summoned). With ``use_orig_params=False``
    the whole model is summoned at once, offloaded to CPU.

  Materialising is collective: every rank runs the same sequence.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..analysis.analyze import AnalysisConfig, select_matrices
from ..analysis.layers import LayerMatrix
from ..analysis.results import SkippedLayer
from .model_view import without_wrappers
from .sharded import iter_full_matrices, plan_sharded
from .sharding import FSDP1, sharding_of
from .snapshot import SnapshotBuilder

__all__ = [
    "Collectives",
    "TorchCollectives",
    "LightningCollectives",
    "is_initialized",
    "all_gather_object",
    "assign_owners",
    "matrix_cost",
    "parallelism",
    "collect_into",
    "fsdp_views",
    "strip_wrapper_names",
]

log = logging.getLogger(__name__)

#: Name segments added by wrappers (FSDP, activation checkpointing, Lightning, torch.compile, DDP).
_WRAPPER_SEGMENTS = frozenset(
    {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module", "_orig_mod", "module"}
)


def strip_wrapper_names(name: str) -> str:
    """Remove FSDP / activation-checkpointing / Lightning / DDP wrapper segments from a name."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def is_initialized() -> bool:
    """Whether ``torch.distributed``'s default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather_object(obj: Any, world_size: int) -> list:
    """Every rank's ``obj``, indexed by rank, over ``torch.distributed`` (``[obj]`` when not distributed)."""
    if world_size <= 1 or not is_initialized():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class Collectives(Protocol):
    """The collectives a distributed monitor needs; every rank calls them together (a sync point)."""

    def is_initialized(self) -> bool:
        """Whether the communication layer is up (else a ``world_size > 1`` run analyses locally)."""

    def all_gather_object(self, obj: Any, world_size: int) -> list:
        """Every rank's picklable ``obj``, indexed by rank (``[obj]`` when ``world_size <= 1``)."""

    def broadcast_object(self, obj: Any, world_size: int, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (``obj`` when ``world_size <= 1``)."""


class TorchCollectives:
    """:class:`Collectives` over ``torch.distributed``'s default process group (the default)."""

    def is_initialized(self) -> bool:
        return is_initialized()

    def all_gather_object(self, obj: Any, world_size: int) -> list:
        return all_gather_object(obj, world_size)

    def broadcast_object(self, obj: Any, world_size: int, src: int = 0) -> Any:
        if world_size <= 1 or not is_initialized():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


class LightningCollectives:
    """:class:`Collectives` through a Lightning ``Strategy``, so the monitor talks over whatever
    the strategy uses (DDP, FSDP, DeepSpeed, XLA, a custom strategy).

    ``Strategy.broadcast(obj, src)`` is the strategy's collective for picklable objects (its
    ``all_gather`` takes tensors only), so gathering is one broadcast from each rank in turn:
    ``world_size`` small messages per sync point, which come a few times per epoch at most.
    """

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def is_initialized(self) -> bool:
        if int(getattr(self.strategy, "world_size", 1)) <= 1:
            return False
        # Strategies over torch.distributed (DDP, FSDP, DeepSpeed: they name a process-group
        # backend) are connected once its default group exists; others (XLA) once launched.
        return is_initialized() if hasattr(self.strategy, "process_group_backend") else True

    def all_gather_object(self, obj: Any, world_size: int) -> list:
        if world_size <= 1:
            return [obj]
        rank = int(getattr(self.strategy, "global_rank", 0))
        return [self.strategy.broadcast(obj if src == rank else None, src=src) for src in range(world_size)]

    def broadcast_object(self, obj: Any, world_size: int, src: int = 0) -> Any:
        if world_size <= 1:
            return obj
        return self.strategy.broadcast(obj, src=src)


def matrix_cost(m: LayerMatrix) -> float:
    """Relative eigensolve cost: Gram product plus eigvalsh, ~ N * M^2 + M^3 per slice."""
    n, mm = m.N, m.M
    return float(m.num_slices) * (n * mm * mm + mm**3)


def assign_owners(costs: Sequence[float], world_size: int, loads: list[float] | None = None) -> list[int]:
    """Greedy balanced owner rank for each cost (largest first, ties to the lowest rank).

    Deterministic: the same costs give the same owners on every rank. ``loads`` (one per rank)
    carries the balance across calls (FSDP assigns one unit at a time) and is updated in place.
    """
    if world_size <= 1:
        return [0] * len(costs)
    if loads is None:
        loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += costs[i]
    return owners


def parallelism(root: nn.Module | None, module: nn.Module) -> str:
    """``"fsdp"`` (FSDP1 units), ``"sharded"`` (DTensor or DeepSpeed ZeRO-3 parameters: FSDP2,
    tensor parallel, ZeRO-3; see :mod:`.sharded`) or ``"plain"`` (:func:`.sharding.sharding_of`)."""
    kind = sharding_of(module, root)
    return "plain" if kind is None else "fsdp" if kind == FSDP1 else "sharded"


def _rename(matrices: list[LayerMatrix], skipped: list[SkippedLayer]) -> tuple[list[LayerMatrix], list[SkippedLayer]]:
    for m in matrices:
        m.name = strip_wrapper_names(m.name)
        m.aliases = tuple(strip_wrapper_names(a) for a in m.aliases)
    skipped = [
        SkippedLayer(
            strip_wrapper_names(s.name), s.kind, s.shape, s.reason, tuple(strip_wrapper_names(a) for a in s.aliases)
        )
        for s in skipped
    ]
    return matrices, skipped


def _add_owned(
    builder: SnapshotBuilder | None,
    matrices: list[LayerMatrix],
    rank: int,
    world: int,
    loads: list[float],
    owners_out: dict[str, int],
    carry=None,
) -> None:
    if carry is not None:  # carried forward (frozen): neither owned nor copied, on every rank alike
        matrices = [m for m in matrices if not carry(m)]
    owners = assign_owners([matrix_cost(m) for m in matrices], world, loads)
    mine = []
    for m, r in zip(matrices, owners):
        owners_out[m.name] = r
        if r == rank:
            mine.append(m)
    if builder is not None:
        builder.add(mine)


def collect_into(
    builder: SnapshotBuilder | None,
    module: nn.Module,
    config: AnalysisConfig,
    rank: int = 0,
    world_size: int = 1,
    root: nn.Module | None = None,
    carry=None,
) -> tuple[dict[str, int], list[SkippedLayer]]:
    """Copy this rank's share of the selected matrices of ``module`` into ``builder``.

    ``root`` is the strategy-wrapped model (FSDP units are looked up there). ``carry``: a
    predicate on a selected :class:`LayerMatrix`; matrices it accepts are left out before
    ownership is assigned (frozen ones carried forward, :mod:`.carry`). Returns
    ``({layer: owner rank} for every selected matrix not carried, layers skipped by the selection)``.
    With ``builder=None`` only the selection and ownership are computed (no copies; not
    available for FSDP1 units, whose shapes are unknown until summoned).
    """
    kind = parallelism(root, module)
    loads = [0.0] * max(1, world_size)
    owners: dict[str, int] = {}
    if kind == "plain":
        matrices, skipped = _rename(*select_matrices(module, config))
        _add_owned(builder, matrices, rank, world_size, loads, owners, carry)
        return owners, skipped
    if kind == "sharded":
        return _collect_sharded(builder, module, config, rank, world_size, loads, owners, carry)
    if builder is None:
        raise RuntimeError(
            "ownership without copying is not available for FSDP1 units, whose shapes are unknown until gathered"
        )
    return _collect_fsdp(builder, module, root or module, config, rank, world_size, loads, owners, carry)


def _collect_sharded(builder, module, config, rank, world, loads, owners, carry=None):
    """DTensor / ZeRO-3: plan from global shapes, then gather one layer at a time (see :mod:`.sharded`)."""
    plan = plan_sharded(module, config)
    matrices, skipped = _rename(plan.matrices, plan.skipped)
    _add_owned(None, matrices, rank, world, loads, owners, carry)
    if builder is None:
        return owners, skipped
    error = None
    try:  # one buffer per dtype for this rank's matrices, filled as their layers are gathered
        builder.reserve([m for m in matrices if owners.get(m.name) == rank], source=_weights_device(module))
    except Exception as err:
        error = err
    # carried (frozen) matrices have no owner: they are not gathered
    for m in iter_full_matrices(plan, owner=lambda m: owners.get(m.name), rank=rank):
        if error is None:  # after a failure, walk on: the other ranks wait for this one's gathers
            try:
                builder.fill(m)
            except Exception as err:
                error = err
        del m  # copied: free the full weight before the next layer is gathered
    if error is not None:
        raise error
    if builder.unfilled:
        raise RuntimeError(f"layers not gathered: {', '.join(builder.unfilled)}")
    return owners, skipped


def _weights_device(module: nn.Module) -> torch.device:
    """The device sharded weights are gathered on (their shards' device)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _collect_fsdp(builder, module, root, config, rank, world, loads, owners, carry=None):
    """For each group of FSDP1 units summoned together, add the newly visible full matrices.
    Matrices already seen (parameters no wrapper manages) count once."""
    all_skipped: dict[str, SkippedLayer] = {}
    for view in fsdp_views(module, root):
        matrices, skipped = _rename(*select_matrices(view, config))
        new = [m for m in matrices if m.name not in owners]
        _add_owned(builder, new, rank, world, loads, owners, carry)
        for s in skipped:
            all_skipped.setdefault(s.name, s)
    return owners, [s for name, s in all_skipped.items() if name not in owners]


def fsdp_views(module: nn.Module, root: nn.Module | None = None):
    """FSDP1 (collective: every rank iterates to the end): for each group of units summoned
    together (one unit, ``recurse=False``; a LoRA layer's units together), a view of ``module``
    without the FSDP wrappers (:func:`.model_view.without_wrappers`) in which that group's
    parameters are full; valid until the next one is requested. Parameters of the units not
    summoned read as this rank's 1-D pieces. With ``use_orig_params=False`` the whole model is
    summoned once (offloaded to CPU from a GPU). ``root``: the strategy-wrapped model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = root if root is not None else module
    units = FSDP.fsdp_modules(root)
    orig = all(getattr(u, "_use_orig_params", True) for u in units)
    groups: Iterable[contextlib.AbstractContextManager]
    if orig:
        groups = (_summoned(FSDP, group) for group in _unit_groups(units, module))
    else:  # original parameters are not 1-D shards outside the context: gather everything once
        on_gpu = any(p.is_cuda for p in root.parameters())
        groups = [FSDP.summon_full_params(root, recurse=True, writeback=False, offload_to_cpu=on_gpu)]
    for ctx in groups:
        with ctx:
            yield without_wrappers(module)


def _unit_groups(units: list, module: nn.Module) -> list[list]:
    """FSDP1 units summoned together: one each, except that the units holding a LoRA layer's
    parameters (base weight, A and B factors, often wrapped apart) go together, since its
    adapter update is computed from all of them. In model order; the same on every rank."""
    from ..analysis.adapters import lora_layers

    inside = {id(u): {id(m) for m in u.modules()} for u in units}
    params = {id(u): {id(p) for p in u.parameters()} for u in units}
    own = {
        id(u): params[id(u)].difference(*(params[id(v)] for v in units if v is not u and id(v) in inside[id(u)]))
        for u in units
    }
    group_of: dict[int, list] = {}
    for layer in lora_layers(module).values():
        ids = {id(p) for p in layer.parameters()}
        group = [u for u in units if own[id(u)] & ids]
        for u in group:
            group_of.setdefault(id(u), group)
    groups: list[list] = []
    done: set[int] = set()
    for u in units:
        if id(u) not in done:
            group = group_of.get(id(u), [u])
            done.update(id(v) for v in group)
            groups.append(group)
    return groups


@contextlib.contextmanager
def _summoned(fsdp_class, units: list):
    """Every unit of ``units`` summoned (its own parameters, ``recurse=False``), nested."""
    with contextlib.ExitStack() as stack:
        for u in units:
            stack.enter_context(fsdp_class.summon_full_params(u, recurse=False, writeback=False))
        yield
