"""``SpectralBalancer`` as a Lightning callback, for both Lightning packages (its presets
``TempBalance`` / ``AlphaDecay`` and the class factory are in :mod:`.presets`; what it decides and
keeps is :class:`~ww_monitor.balancing.core.SpectralBalancerCore`).

Unlike :class:`~ww_monitor.WeightWatcherCallback` this callback *changes training*: that is its
purpose. What it touches, and only that: during every ``optimizer.step()`` the optimizer steps
with one param group per layer, each layer's ``lr`` (or ``weight_decay``) multiplied by the
layer's factor, and gets its own groups back right after (see :mod:`.groups`). Weights,
gradients, RNG, autograd, the optimizer's groups outside the step and the LR schedulers are
never touched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import WWMonitorError
from ..integrations.lightning_callback import Trainer, WeightWatcherMixin
from ..monitoring.distributed import LightningCollectives
from .core import SCALES, SpectralBalancerCore

__all__ = ["SpectralBalancerMixin", "SCALES"]


class SpectralBalancerMixin(SpectralBalancerCore):
    """Lightning callback. Example::

        import pytorch_lightning as pl          # or lightning.pytorch, with ww_monitor.lightning
        from ww_monitor import TempBalance, AlphaDecay, SpectralBalancer

        balancer = TempBalance()                # lr factors in [0.5, 1.5], every epoch
        # or AlphaDecay() (weight decay, every 500 steps), SpectralBalancer(mapping="sigmoid") ...
        trainer = pl.Trainer(max_epochs=50, callbacks=[balancer])
        trainer.fit(model, datamodule=dm)      # configure_optimizers / schedulers unchanged
        balancer.history.to_pandas()            # step, name, alpha, factor of every update

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: ww_monitor.TempBalance
              init_args: {every_n_epochs: 1}

    Put it after a :class:`~ww_monitor.WeightWatcherCallback` to reuse its analysis. The factors go
    to the trainer's loggers; ``LearningRateMonitor`` shows the schedule. Sharded models
    (``FSDPStrategy``, ``ModelParallelStrategy``) are balanced with full weights gathered one layer
    at a time (:mod:`.sharded`); ``DeepSpeedStrategy`` raises a ``WWMonitorError`` at train start
    (its optimizer steps flattened groups).
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scale=self.scale, mapping=self.mapping)  # type: ignore[attr-defined]  # Lightning Callback's, the base at run time

    def setup(self, trainer: Trainer, pl_module: nn.Module, stage: str) -> None:
        same = [c for c in trainer.callbacks if isinstance(c, SpectralBalancerCore) and c.scale == self.scale]
        if len(same) > 1:
            raise WWMonitorError(
                f"{len(same)} balancers scale {self.scale!r} ({', '.join(type(c).__name__ for c in same)});"
                " their factors would multiply. Use one per setting (e.g. TempBalance for 'lr' with "
                "AlphaDecay for 'weight_decay')."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: nn.Module) -> None:
        if not self._restored:  # (a checkpoint's state is loaded before this hook)
            self._new_run()

    def on_train_start(self, trainer: Trainer, pl_module: nn.Module) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        self._attach(
            pl_module,
            trainer.optimizers,
            LightningCollectives(trainer.strategy),
            trainer.global_rank,
            trainer.world_size,
            root=getattr(trainer.strategy, "model", None),
        )
        if self.at_train_start and not len(self.history):
            self._lightning_update(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if self._attached and n and step % n == 0 and step != self._last_step:
            self._lightning_update(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: nn.Module) -> None:
        n = self.every_n_epochs
        if self._attached and n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step:
            self._lightning_update(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def teardown(self, trainer: Trainer, pl_module: nn.Module, stage: str) -> None:
        self._detach()

    def on_exception(self, trainer: Trainer, pl_module: nn.Module, exception: BaseException) -> None:
        self._detach()

    def _lightning_update(self, trainer: Trainer, pl_module: nn.Module, epoch: int | None = None) -> None:
        self._update(
            pl_module,
            trainer.global_step,
            trainer.current_epoch if epoch is None else epoch,
            monitor=next((c for c in trainer.callbacks if isinstance(c, WeightWatcherMixin)), None),
            loggers=list(getattr(trainer, "loggers", []) or []),
        )
