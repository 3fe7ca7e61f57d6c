"""``SpectralBalancer`` / ``TempBalance`` / ``AlphaDecay`` as ``transformers`` ``TrainerCallback`` s
(also importable from :mod:`ww_monitor.huggingface`): the Lightning callbacks' arguments and core.

The Trainer builds its optimizer and LR scheduler inside ``train()`` (``create_optimizer`` /
``create_scheduler``, then loads their state when resuming) and only then calls
``on_train_begin``, with the optimizer (accelerate's wrapper around the torch optimizer). The
balancer hooks the torch optimizer's step there: the per-layer groups exist only inside
``optimizer.step()`` (see :mod:`.groups`), so the Trainer's optimizer, its two weight-decay
groups, its scheduler and its ``optimizer.pt`` / ``scheduler.pt`` checkpoints stay as the Trainer
made them, whatever the order of creation and loading. Events: ``on_train_begin`` (attach; the
balancer's state from the checkpoint folder when resuming; factors at train start),
``on_step_end`` / ``on_epoch_end`` (scheduled updates), ``on_save`` (the state into the
checkpoint folder, :data:`STATE_FILE`), ``on_train_end`` (detach).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from ..core.engine import MonitorEngine
from ..core.hooks import rank_zero_warn
from ..errors import WWMonitorError
from ..monitoring.distributed import TorchCollectives
from .core import SpectralBalancerCore
from .loop import _rank_and_world
from .presets import build

__all__ = ["HuggingFaceBalancerMixin", "SpectralBalancer", "TempBalance", "AlphaDecay", "STATE_FILE"]

log = logging.getLogger(__name__)

#: The balancer's state in each Trainer checkpoint folder (``checkpoint-<step>/``), one per scale.
STATE_FILE = "ww_monitor_balance_{scale}.pt"
#: How far up the stack the Trainer's ``CallbackHandler.call_event`` is from our event method
#: (it calls us directly; one more level tolerates a wrapper).
_HANDLER_FRAMES = 3


def _output_dir(args: TrainingArguments) -> str:
    """``args.output_dir``: typed optional, but the Trainer always sets it (default ``"trainer_output"``)."""
    return cast(str, args.output_dir)


def _calling_handler(callback: object) -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` calling ``callback``'s event (None when called otherwise)."""
    frame: FrameType | None = sys._getframe(2)  # the caller of the event method that called us
    for _ in range(_HANDLER_FRAMES):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler) and callback in candidate.callbacks:
            return candidate
        frame = frame.f_back
    return None


class _Integration:
    """A ``report_to`` integration as a logger: the scalars go through its ``on_log``, as the
    Trainer's own logs do (TensorBoard writes them as ``train/ww/balance/<layer>``)."""

    def __init__(
        self,
        callback: TrainerCallback,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None,
    ) -> None:
        self.callback, self.args, self.state, self.control, self.model = callback, args, state, control, model

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.callback.on_log(self.args, self.state, self.control, logs=dict(metrics), model=self.model)


class HuggingFaceBalancerMixin(SpectralBalancerCore):
    """Hugging Face ``Trainer`` callback. Example::

        from transformers import Trainer, TrainingArguments
        from ww_monitor.huggingface import TempBalance, WeightWatcherCallback

        trainer = Trainer(model=model, args=TrainingArguments("out", report_to="tensorboard"),
                          train_dataset=ds, callbacks=[TempBalance(every_n_epochs=None, every_n_train_steps=100)])
        trainer.train()                  # resume: trainer.train(resume_from_checkpoint=True)
        trainer.callback_handler.callbacks[-1].history.to_pandas()

    Put it after a ``ww_monitor.huggingface.WeightWatcherCallback`` to reuse its analysis. The
    factors go to the ``report_to`` integrations (TensorBoard: ``train/ww/balance/<layer>``); the
    Trainer's logged ``learning_rate`` is the schedule's. Under FSDP (the Trainer hands its
    callbacks the wrapped model) the full weights are gathered one layer at a time; under
    DeepSpeed ZeRO it raises a ``WWMonitorError`` at train start (see
    :mod:`ww_monitor.balancing.sharded`).
    """

    _monitor = None
    _reporters: Sequence[Any] = ()

    # Trainer events ---------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Optimizer | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        name = type(self).__name__
        handler = _calling_handler(self)
        callbacks = handler.callbacks if handler is not None else []
        same = [c for c in callbacks if isinstance(c, SpectralBalancerCore) and c.scale == self.scale]
        if len(same) > 1:
            raise WWMonitorError(
                f"{len(same)} balancers scale {self.scale!r} ({', '.join(type(c).__name__ for c in same)});"
                " their factors would multiply. Use one per setting."
            )
        if optimizer is None or model is None:
            raise WWMonitorError(f"{name}: the Trainer gave no model or optimizer at on_train_begin.")
        if state.global_step > 0:
            self._load_checkpoint_state(args, state)
        elif not self._restored:
            self._new_run()
        self._monitor = next(
            (c.engine for c in callbacks if isinstance(getattr(c, "engine", None), MonitorEngine)), None
        )
        classes = tuple(_reporting_callbacks())
        self._reporters = [c for c in callbacks if classes and isinstance(c, classes)]
        self._attach(model, [optimizer], TorchCollectives(), *_rank_and_world())
        if self.at_train_start and not len(self.history):
            self._hf_update(args, state, control, model, int(round(state.epoch or 0)))
        return control

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        n = self.every_n_train_steps
        step = state.global_step
        if self._attached and n and step % n == 0 and step != self._last_step:
            self._hf_update(args, state, control, model, int(round(state.epoch or 0)))
        return control

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        n = self.every_n_epochs
        epoch = int(round(state.epoch or 0))
        if self._attached and n and epoch % n == 0 and state.global_step != self._last_step:
            self._hf_update(args, state, control, model, epoch)
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._attached and state.is_world_process_zero:
            folder = os.path.join(_output_dir(args), f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.state_dict(), os.path.join(folder, STATE_FILE.format(scale=self.scale)))
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self._detach()
        self._monitor, self._reporters = None, []
        return control

    # internals --------------------------------------------------------------
    def _hf_update(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None, epoch: int
    ) -> None:
        loggers = [_Integration(c, args, state, control, model) for c in self._reporters]
        self._update(model, state.global_step, epoch, monitor=self._monitor, loggers=loggers)

    def _load_checkpoint_state(self, args: TrainingArguments, state: TrainerState) -> None:
        """Resuming: the state saved in the checkpoint the Trainer resumed from (the folder of
        ``state.global_step``); without it, a warning and the factors are computed afresh."""
        path = os.path.join(_output_dir(args), f"checkpoint-{state.global_step}", STATE_FILE.format(scale=self.scale))
        if os.path.exists(path):
            self.load_state_dict(torch.load(path, weights_only=True))
            return
        if not self._restored:
            rank_zero_warn(
                f"{type(self).__name__}: resuming at step {state.global_step} without a balancer state "
                f"({path} not found); the factors are computed afresh.",
                RuntimeWarning,
            )
            self._new_run()


def _reporting_callbacks() -> list[type]:
    """The Trainer's ``report_to`` integration callback classes."""
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover - depends on the transformers version
        return []
    return list(INTEGRATION_TO_CALLBACK.values())


_classes = build(TrainerCallback, "ww_monitor.huggingface", HuggingFaceBalancerMixin)
SpectralBalancer = _classes["SpectralBalancer"]
TempBalance = _classes["TempBalance"]
AlphaDecay = _classes["AlphaDecay"]
