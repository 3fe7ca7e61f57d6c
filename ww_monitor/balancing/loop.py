"""``SpectralBalancer`` / ``TempBalance`` / ``AlphaDecay`` for plain PyTorch loops (and Lightning
Fabric): the Lightning callbacks' arguments and core, driven by three calls.

Why this shape: a balancer changes the learning rate (or weight decay) over training, which is
what an LR scheduler does, so it is used like one: bound once to the model and the optimizer
(:meth:`attach`, where a scheduler takes its optimizer), then ``step`` after each
``optimizer.step()``. It does not wrap or replace the optimizer: the factor is applied inside
``optimizer.step()`` through torch's step hooks, so the optimizer object, its param groups, its
``state_dict`` and any LR scheduler stay exactly the user's. Imports neither Lightning nor
``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ..core.engine import MonitorEngine
from ..core.hooks import rank_zero_warn
from ..core.sinks import as_sinks
from ..errors import WWMonitorError
from ..monitoring.distributed import TorchCollectives, is_initialized
from ..validation import check_int
from .core import SpectralBalancerCore
from .presets import build

__all__ = ["LoopBalancerMixin", "SpectralBalancer", "TempBalance", "AlphaDecay"]


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)


class LoopBalancerMixin(SpectralBalancerCore):
    """Plain PyTorch loop. Example::

        from ww_monitor.balancing.loop import TempBalance

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        balancer = TempBalance().attach(model, optimizer)   # factors of the initial weights
        step = 0
        for epoch in range(1, epochs + 1):
            for x, y in loader:
                loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
                scheduler.step(); step += 1
                balancer.step(step)            # every_n_train_steps schedules
            balancer.epoch_end(epoch)          # every_n_epochs schedules (TempBalance: every epoch)
        balancer.close()
        torch.save(balancer.state_dict(), "balancer.pt")   # resume: load_state_dict, then attach

    With a :class:`ww_monitor.Monitor`, pass it to :meth:`attach` to reuse its analysis (call
    ``monitor.step(model, 0)`` before ``attach`` to share the baseline too, and ``monitor.step``
    before ``balancer.step`` at each step); the factors then go to the monitor's sinks unless
    ``sinks`` is given. Under ``torch.distributed`` every rank makes the same calls: rank 0
    computes, every rank applies the same factors. A sharded model (FSDP with
    ``use_orig_params=True``: attach the ``FullyShardedDataParallel`` model; FSDP2
    ``fully_shard``) is balanced with full weights gathered one layer at a time, each rank
    decomposing its share; DeepSpeed ZeRO raises a ``WWMonitorError`` (see :mod:`.sharded`).
    """

    _sinks: Sequence[Any] = ()
    _monitor = None
    _step: int | None = None
    _epoch = 0
    _epoch_ends = 0

    def attach(
        self,
        model: nn.Module,
        optimizer: Optimizer | Sequence[Optimizer],
        monitor: MonitorEngine | None = None,
        sinks: Any = None,
    ) -> LoopBalancerMixin:
        """Bind to ``model`` and ``optimizer`` (or a list of optimizers) before the first step, and
        compute the factors of the current weights (``at_train_start``) unless a state was loaded.
        ``monitor``: a running :class:`ww_monitor.Monitor` whose analyses to reuse. ``sinks``:
        where the ``ww/balance...`` scalars go (a ``SummaryWriter``, ``fn(metrics, step)``, a logger, or a
        list). Returns the balancer."""
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise WWMonitorError(f"{owner}: `model` must be a torch.nn.Module, got {type(model).__name__}.")
        if monitor is not None and not isinstance(monitor, MonitorEngine):
            raise WWMonitorError(f"{owner}: `monitor` must be a ww_monitor.Monitor, got {type(monitor).__name__}.")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        restored = self._restored
        # A Monitor's sinks; other engines (the Lightning/Hugging Face callbacks) log through their trainer.
        self._sinks = (
            as_sinks(sinks)
            if sinks is not None
            else (list(getattr(monitor, "sinks", ())) if monitor is not None else [])
        )
        self._monitor, self._model = monitor, model
        self._attach(model, optimizers, TorchCollectives(), *_rank_and_world())
        if not restored:
            self._new_run()
        self._step = self._last_step
        self._epoch_ends = 0
        if self.at_train_start and not len(self.history):
            self._loop_update(self._step or 0)
        return self

    def step(self, step: int) -> None:
        """Call after each optimizer step with the number of steps done (every rank alike):
        updates the factors when ``every_n_train_steps`` is due."""
        check_int("step", step, 0, owner=type(self).__name__)
        self._check_attached("step")
        self._step = step
        n = self.every_n_train_steps
        if n and step % n == 0 and step != self._last_step:
            self._loop_update(step)

    def epoch_end(self, epoch: int) -> None:
        """Call at the end of each epoch with the number of epochs done (1 after the first):
        updates the factors when ``every_n_epochs`` is due."""
        check_int("epoch", epoch, 1, owner=type(self).__name__)
        self._check_attached("epoch_end")
        self._epoch, self._epoch_ends = epoch, self._epoch_ends + 1
        n = self.every_n_epochs
        step = self._step or 0
        if n and epoch % n == 0 and step != self._last_step:
            self._loop_update(step)

    def close(self) -> None:
        """Stop applying the factors (the optimizer keeps its own groups). Warns when an epoch
        schedule was set but :meth:`epoch_end` was never called."""
        if not self._attached:
            return
        self._detach()
        if self.every_n_epochs and not self.every_n_train_steps and not self._epoch_ends and self._step:
            rank_zero_warn(
                f"{type(self).__name__}: `every_n_epochs`={self.every_n_epochs} but epoch_end() was never "
                "called, so the factors were not updated after train start; call balancer.epoch_end(epoch) "
                "at the end of each epoch, or set `every_n_train_steps`.",
                RuntimeWarning,
            )

    def __enter__(self) -> LoopBalancerMixin:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_attached(self, call: str) -> None:
        if not self._attached:
            raise WWMonitorError(f"{type(self).__name__}: call attach(model, optimizer) before {call}().")

    def _loop_update(self, step: int) -> None:
        self._update(self._model, step, self._epoch, monitor=self._monitor, loggers=self._sinks)


_classes = build(None, __name__, LoopBalancerMixin)
SpectralBalancer = _classes["SpectralBalancer"]
TempBalance = _classes["TempBalance"]
AlphaDecay = _classes["AlphaDecay"]
