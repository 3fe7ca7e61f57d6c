"""Balancing a sharded model: which strategies allow per-layer groups, and the alphas from full
weights gathered one layer at a time.

* **Per-layer groups** (:mod:`.groups`) need the optimizer to step the model's own parameters,
  one object per original weight, so that a layer's parameters can get a group of their own during
  the step. FSDP1 with ``use_orig_params=True`` (each original parameter is a view of this rank's
  piece of the flat parameter; the default of Lightning's ``FSDPStrategy`` and the Hugging Face
  Trainer) and FSDP2 / tensor parallel (DTensor parameters) do. :func:`check_strategy` raises a
  ``WWMonitorError`` at attach where they do not: DeepSpeed's ZeRO (stages 1 to 3) and fp16/bf16
  optimizers flatten each param group into one partitioned buffer that their inner optimizer steps
  as a single parameter; FSDP1 with ``use_orig_params=False`` steps its flat parameters.
* **Units** of a sharded model are found on its
  :func:`~ww_monitor.monitoring.sharding.stand_in_view` (every weight at its full shape, no
  communication), so every rank finds the same units, in the same order, as for the unsharded
  model, and steers the parameters registered under those names.
* **Alphas** (:class:`ShardedWeights`, a collective weight source): each balanced matrix gets an
  owner rank by the monitor's greedy balance of the eigensolve cost
  (:func:`~ww_monitor.monitoring.distributed.assign_owners`, from the shapes, the same on every
  rank); layers are materialised one at a time and each rank decomposes only the matrices it owns;
  the balancer then gathers the alphas and rank 0 broadcasts the factors
  (:meth:`~ww_monitor.balancing.core.SpectralBalancerCore._update`), so every rank applies the
  same factors. DTensor: :func:`~ww_monitor.monitoring.sharded.iter_full_matrices` (a layer whose
  matrices have one owner is gathered to that rank alone). FSDP1:
  :func:`~ww_monitor.monitoring.distributed.fsdp_views` (``summon_full_params`` per unit; an
  all-gather, as FSDP1 offers no gather to one rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..analysis.layers import LayerMatrix, matrices_from_module
from ..errors import WWMonitorError
from ..monitoring.distributed import assign_owners, fsdp_views, matrix_cost, strip_wrapper_names
from ..monitoring.sharded import iter_full_matrices, plan_sharded
from ..monitoring.sharding import DTENSOR, FSDP1, ZERO3, sharding_of

__all__ = ["check_strategy", "ShardedWeights"]

#: How many ``.optimizer`` wrappers to look through for DeepSpeed's optimizer (accelerate's
#: ``AcceleratedOptimizer`` around DeepSpeed's around torch's, Lightning's on top).
_MAX_WRAPPERS = 4
#: DeepSpeed's optimizer classes and the strategy each stands for in the error message.
_DEEPSPEED_NAMES = {
    "DeepSpeedZeroOptimizer_Stage3": "ZeRO stage 3",
    "DeepSpeedZeroOptimizer": "ZeRO stage 1/2",
    "BF16_Optimizer": "bf16 optimizer",
    "FP16_Optimizer": "fp16 optimizer",
    "FP16_UnfusedOptimizer": "fp16 optimizer",
}
_ALTERNATIVE = (
    "FSDP (use_orig_params=True) and FSDP2 (fully_shard) keep the model's parameters in the optimizer and are supported"
)


def _deepspeed(optimizer) -> str | None:
    """The DeepSpeed optimizer inside ``optimizer``'s wrappers, as ``"ClassName (strategy)"``."""
    for _ in range(_MAX_WRAPPERS + 1):
        if optimizer is None:
            return None
        for cls in type(optimizer).__mro__:
            if cls.__name__ == "DeepSpeedOptimizer" and cls.__module__.startswith("deepspeed"):
                name = type(optimizer).__name__
                return f"{name} ({_DEEPSPEED_NAMES.get(name, 'a flattening optimizer')})"
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def check_strategy(owner: str, model: nn.Module, optimizers: Sequence, root: nn.Module | None = None) -> str | None:
    """What shards ``model`` (:func:`~ww_monitor.monitoring.sharding.sharding_of`: ``"fsdp"``,
    ``"dtensor"``, or None when nothing does); raises a ``WWMonitorError`` naming the strategy where
    per-layer groups cannot be formed. ``root``: the strategy-wrapped model (FSDP1 units)."""
    why = (
        "flattens each param group's parameters into one partitioned buffer that its inner optimizer steps as a "
        "single parameter, so a layer's parameters cannot get a learning rate or weight decay of their own"
    )
    for opt in optimizers:
        found = _deepspeed(opt)
        if found is not None:
            raise WWMonitorError(
                f"{owner}: per-layer balancing cannot run under DeepSpeed ({found}): DeepSpeed {why}. {_ALTERNATIVE}."
            )
    kind = sharding_of(model, root)
    if kind == ZERO3:
        raise WWMonitorError(
            f"{owner}: per-layer balancing cannot run under DeepSpeed ZeRO-3 (the model's parameters "
            f"are partitioned): DeepSpeed's ZeRO optimizer {why}. {_ALTERNATIVE}."
        )
    if kind == FSDP1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not all(
            getattr(u, "_use_orig_params", False) for u in FSDP.fsdp_modules(root if root is not None else model)
        ):
            raise WWMonitorError(
                f"{owner}: FSDP with use_orig_params=False hands the optimizer flat parameters (one per "
                "unit), so a layer's parameters cannot get a group of their own; wrap the model with "
                "FullyShardedDataParallel(..., use_orig_params=True) (Lightning's FSDPStrategy and "
                "the Hugging Face Trainer do by default)."
            )
    elif any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        raise WWMonitorError(
            f"{owner}: the model's parameters are FSDP pieces but no FullyShardedDataParallel unit "
            "wraps it; attach the FSDP-wrapped model (the one you called FullyShardedDataParallel on)."
        )
    return kind


def _finder(module: nn.Module, tap):
    """The balancers' layer finder (:func:`~ww_monitor.analysis.layers.matrices_from_module`, conv
    kernels pooled) for :func:`~ww_monitor.monitoring.sharded.plan_sharded`."""
    return tap(matrices_from_module(module, "pooled"))


class ShardedWeights:
    """Collective weight source (see :mod:`.estimate`) of a sharded model: yields this rank's share
    of the requested matrices with their full weights, one layer at a time (FSDP1: one group of
    summoned units at a time); every rank must iterate it to the end, in step.

    ``model`` and ``root`` as for :func:`check_strategy`, ``kind`` what it returned; ``rank`` /
    ``world``: this process in the balancer's process group."""

    collective = True

    def __init__(self, model: nn.Module, kind: str, rank: int, world: int, root: nn.Module | None = None) -> None:
        if kind not in (FSDP1, DTENSOR):
            raise ValueError(f"no sharded weight source for {kind!r}")
        self.model, self.kind, self.rank, self.world, self.root = model, kind, int(rank), int(world), root
        #: Matrices decomposed here at the last read (how the work was shared; for tests and logs).
        self.last_owned: list[str] = []
        #: DTensor: the most bytes of gathered full weights alive at once on this rank during the
        #: last read (:attr:`~ww_monitor.monitoring.sharded.Materialiser.peak_bytes`); FSDP1: None.
        self.last_peak_bytes: int | None = None

    def owners(self, matrices: Sequence[LayerMatrix]) -> dict[str, int]:
        """Owner rank of each matrix (by name): the monitor's greedy balance of the eigensolve cost."""
        return dict(zip((m.name for m in matrices), assign_owners([matrix_cost(m) for m in matrices], self.world)))

    def __call__(self, matrices: Sequence[LayerMatrix]) -> Iterator[list[tuple[LayerMatrix, torch.Tensor]]]:
        wanted = {m.name: m for m in matrices}
        owners = self.owners(matrices)
        self.last_owned = []
        walk = self._fsdp(wanted, owners) if self.kind == FSDP1 else self._dtensor(wanted, owners)
        for batch in walk:
            self.last_owned.extend(m.name for m, _ in batch)
            yield batch
            del batch  # a full weight must not outlive its layer

    def _dtensor(self, wanted: dict[str, LayerMatrix], owners: dict[str, int]):
        plan = plan_sharded(self.model, finder=_finder)
        self.last_peak_bytes = 0

        def owner(m: LayerMatrix) -> int | None:  # None: not balanced, so not gathered
            return owners.get(strip_wrapper_names(m.name))

        for full in iter_full_matrices(plan, owner=owner, rank=self.rank):
            yield [(wanted[strip_wrapper_names(full.name)], full.weight)]
            del full
            self.last_peak_bytes = plan.materialiser.peak_bytes

    def _fsdp(self, wanted: dict[str, LayerMatrix], owners: dict[str, int]):
        shapes = {n: tuple(m.weight.shape) for n, m in wanted.items()}
        done: set[str] = set()
        for view in fsdp_views(self.model, self.root):
            batch = []
            for _, _, item in matrices_from_module(view, "pooled"):
                for m in () if isinstance(item, str) else item:
                    name = strip_wrapper_names(m.name)
                    # full here (the units of this group; a unit's pieces are 1-D) and not taken before
                    if name in wanted and name not in done and tuple(m.weight.shape) == shapes[name]:
                        done.add(name)
                        if owners[name] == self.rank:
                            batch.append((wanted[name], m.weight.detach()))
            if batch:
                yield batch  # decomposed while the group is summoned
            del batch, view
