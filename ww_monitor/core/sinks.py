"""Where a monitor's results go when no framework brings loggers, and the host it reports to.

A *sink* is anything with ``log_metrics(metrics: dict[str, float], step: int)``, the method
Lightning's loggers have (so a Lightning logger is a sink as it is). Sinks marked
``writes_tensorboard`` also receive what only TensorBoard can store: ESD histograms
``ww/esd/<layer>``, the ``ww/layers`` table, the custom-scalars layout and figures, through
their ``experiment`` (a ``SummaryWriter``). :func:`as_sinks` turns what users pass
(a ``SummaryWriter``, a callable, a logger, a list of those) into sinks.

The *host* is what :class:`~ww_monitor.core.engine.MonitorEngine` reads from and tells the
training loop; a Lightning ``Trainer`` has these attributes already, :class:`LoopHost` provides
them for plain loops and other frameworks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..errors import WWMonitorError

__all__ = ["Host", "LoopHost", "SummaryWriterSink", "CallableSink", "as_sinks"]


class Host(Protocol):
    """What the engine needs from a training loop (a Lightning ``Trainer`` is one)."""

    global_step: int  #: the step a snapshot taken now belongs to
    loggers: list  #: sinks, see the module docstring
    callback_metrics: Any  #: dict the latest ``ww/...`` scalars are put into (tensors), or None
    should_stop: bool  #: set to True when an alert whose action is ``stop`` fires


class LoopHost:
    """The host of a loop without a trainer: a step counter, sinks, the latest scalars, a stop flag."""

    def __init__(self, sinks: list) -> None:
        self.global_step = 0
        self.global_rank = 0  #: this process' rank (set by a front door that knows it)
        self.loggers = sinks
        self.callback_metrics: dict[str, Any] = {}
        self.should_stop = False
        #: Set by a front door that knows training ends after this step (a busy due snapshot
        #: is then left to the final one instead of being counted as skipped).
        self.ends_at_this_step = False


class SummaryWriterSink:
    """A ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's) as a sink: scalars through
    ``add_scalar``; histograms, text and figures through the same writer (``experiment``)."""

    writes_tensorboard = True

    def __init__(self, writer) -> None:
        self.experiment = writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.experiment.add_scalar(tag, value, global_step=step)


class CallableSink:
    """Any ``fn(metrics, step)`` as a sink (``wandb.log``, a list's ``append`` wrapper, ...)."""

    def __init__(self, fn: Callable[[dict, int], Any]) -> None:
        self.fn = fn

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.fn(dict(metrics), step)


def _is_summary_writer(obj) -> bool:
    return callable(getattr(obj, "add_scalar", None)) and callable(getattr(obj, "add_histogram_raw", None))


def as_sinks(sinks) -> list:
    """``None``, one sink or a list of them -> a list of sinks; anything else is a clear error."""
    if sinks is None:
        return []
    items = list(sinks) if isinstance(sinks, (list, tuple)) else [sinks]
    out: list = []
    for s in items:
        if _is_summary_writer(s):
            out.append(SummaryWriterSink(s))
        elif callable(getattr(s, "log_metrics", None)):
            out.append(s)
        elif callable(s):
            out.append(CallableSink(s))
        else:
            raise WWMonitorError(
                f"`sinks` must be a SummaryWriter, a callable fn(metrics, step), an object with "
                f"log_metrics(metrics, step) (e.g. a Lightning logger), or a list of these; got {s!r}."
            )
    return out
