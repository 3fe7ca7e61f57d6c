"""``callback.plan(model)``: what this monitor will cost on a model, before the run.

A mixin of :class:`~ww_monitor.core.engine.MonitorEngine`, so every front door has it
(``WeightWatcherCallback``, ``ww_monitor.Monitor``, and the Hugging Face callback through its
engine). The plan is a pure function of the model's shapes and the monitor's settings
(:mod:`ww_monitor.outputs.plan`); nothing is copied or analysed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..functional.sampled import DEFAULT_SAMPLE_SIZE
from ..monitoring.device import resolve_analysis_device
from ..outputs.plan import CostPlan, plan_costs
from .engine_state import EngineState

__all__ = ["Planning"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Planning(EngineState):
    """The :meth:`plan` of a monitor (see the module docstring)."""

    def plan(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        ranks: int | None = None,
        *,
        device: str | None = None,
        step_seconds: float | None = None,
        steps_per_epoch: int | None = None,
        estimate_above: int | None = DEFAULT_SAMPLE_SIZE,
    ) -> CostPlan:
        """What one snapshot of ``model`` will cost under this monitor's settings, from its shapes alone.

        Example::

            ww = WeightWatcherCallback(every_n_train_steps=500)
            with torch.device("meta"):                    # no memory: shapes only
                model = AutoModelForCausalLM.from_config(config)
            print(ww.plan(model, ranks=8, step_seconds=2.0))

        Args:
            model: the module (on any device, the meta device included) or a state dict.
            ranks: processes sharing the analysis (default: the current ``torch.distributed``
                world size, else 1).
            device: ``"cpu"`` or ``"cuda"``: where the analysis runs (default: where
                ``analysis_device`` puts it for these weights). GPU times are not calibrated
                and reported as unmeasured.
            step_seconds: one training step's wall time, for the schedule (default: 1 s, said so).
            steps_per_epoch: to express the schedule in epochs too.
            estimate_above: also price ``wwm.analyze``'s sampled estimate for matrices whose
                smaller side exceeds this (``None``: no such column).

        Returns a :class:`~ww_monitor.outputs.plan.CostPlan` (``print`` it, or ``.to_dict()``).
        """
        if device is None:
            first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            device = resolve_analysis_device(self.analysis_device, None if first is None else first.device).type
        return plan_costs(
            model,
            self.config,
            ranks=_world_size() if ranks is None else ranks,
            device=device,
            threads=self.worker_threads,
            estimate_above=estimate_above,
            max_overhead=self.max_overhead,
            step_seconds=step_seconds,
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
            steps_per_epoch=steps_per_epoch,
            watch_frozen=self.watch_frozen,
            source=f"{type(model).__name__} ({self.warning_prefix}'s settings)",
        )
