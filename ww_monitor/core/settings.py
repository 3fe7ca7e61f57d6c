"""The monitor's arguments, checked up front: :class:`MonitorSettings`.

Every front door (``WeightWatcherCallback``, ``ww_monitor.Monitor``, the Hugging Face callback)
takes the same arguments (documented on ``ww_monitor.WeightWatcherCallback``). They are
validated here, once, with a :class:`~ww_monitor.errors.WWMonitorError` that names the argument,
and normalised (one regex -> a tuple, ``background=False`` implies
``blocking``) into a frozen dataclass the engine copies onto itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import overload

from ..analysis.analyze import AnalysisConfig
from ..analysis.layers import CONV_MODES, KINDS
from ..errors import WWMonitorError
from ..monitoring.alerts import Alert, AlertConfig
from ..monitoring.device import validate_analysis_device
from ..validation import check_bool, check_fraction, check_int, check_seconds

__all__ = ["MonitorSettings", "as_tuple", "check_schedule"]

WORKER_TYPES = ("thread", "process")
LAG_POLICIES = ("skip", "wait")


def check_schedule(*schedules: tuple[str, object], ends_only: bool) -> None:
    """The snapshot schedule of a front door: each ``(name, value)`` None (off) or an int >= 1, and
    at least one of them on unless ``ends_only`` (then all must be off). A zero, or every schedule
    off without ``ends_only``, would silently watch nothing between the baseline and the final
    snapshot."""
    check_bool("ends_only", ends_only)
    for name, value in schedules:
        if value == 0 and not isinstance(value, bool):
            raise WWMonitorError(f"`{name}=0` is not a schedule: pass an int >= 1, or None to turn it off.")
        check_int(name, value, 1, allow_none=True)
    names = " and ".join(f"`{name}`" for name, _ in schedules)
    on = [f"{name}={value}" for name, value in schedules if value is not None]
    if ends_only and on:
        raise WWMonitorError(
            f"`ends_only=True` takes only the baseline and final snapshots, but {', '.join(on)} "
            f"asks for more; set {names} to None, or leave `ends_only` False."
        )
    if not ends_only and not on:
        raise WWMonitorError(
            f"no snapshot schedule: {names} {'are' if len(schedules) > 1 else 'is'} None, so only "
            "the baseline and final snapshots would be taken. Pass an int >= 1, or "
            "`ends_only=True` if the baseline and final snapshots are what you want."
        )


@overload
def as_tuple(value: None, name: str) -> None: ...
@overload
def as_tuple(value: str | Iterable[str], name: str) -> tuple[str, ...]: ...
def as_tuple(value, name: str) -> tuple[str, ...] | None:
    """A string, an iterable of strings or None -> a tuple of strings (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise WWMonitorError(f"`{name}` must be a string, a list of strings or None, got {value!r}.") from None
    if not all(isinstance(v, str) for v in items):
        raise WWMonitorError(f"`{name}` must be a string, a list of strings or None, got {value!r}.")
    return items


@dataclass(frozen=True)
class MonitorSettings:
    """The validated, normalised arguments of a monitor (see the module docstring). The fields
    keep the argument names; the engine exposes each as an attribute of the same name."""

    config: AnalysisConfig  #: the analysis options (selection, size limits, method, fits)
    every_n_epochs: int | None
    every_n_train_steps: int | None
    background: bool
    blocking: bool  #: ``blocking or not background``
    worker_type: str
    worker_threads: int | None
    worker_nice: int
    worker_idle: bool
    max_pending: int
    on_lag: str
    log_histograms: bool
    log_text: bool
    log_callback_metrics: bool
    figures_every_n_snapshots: int | None
    figure_layers: tuple[str, ...] | None
    max_figure_layers: int
    figures_min_run_seconds: float
    figures_timeout: float
    analysis_device: str
    drain_timeout: float
    alert_config: AlertConfig
    alerts_on: bool
    on_alert: Callable[[Alert], None] | None
    distance_from_init: bool
    esd_shift: bool
    summary_include_unreliable: bool
    max_overhead: float | None  #: the cost budget's share of training time (None: off)
    watch_frozen: bool = False  #: analyse frozen matrices at every snapshot (default: once, then carried)
    ends_only: bool = False  #: only the baseline and final snapshots (no schedule)

    @classmethod
    def from_arguments(cls, *, owner: str = "", **arguments) -> MonitorSettings:
        """:meth:`_checked`, with the front door's name (``owner``) at the start of its error."""
        try:
            return cls._checked(**arguments)
        except WWMonitorError as err:
            message = str(err)
            if owner and not message.startswith(f"{owner}:"):
                message = f"{owner}: {message}"
            raise WWMonitorError(message) from None

    @classmethod
    def _checked(
        cls,
        *,
        every_n_epochs,
        every_n_train_steps,
        include,
        exclude,
        kinds,
        conv_mode,
        min_evals,
        max_evals,
        max_n,
        background,
        blocking,
        worker_type,
        worker_threads,
        worker_nice,
        worker_idle,
        max_pending,
        on_lag,
        log_histograms,
        log_text,
        log_callback_metrics,
        figures_every_n_snapshots,
        figure_layers,
        max_figure_layers,
        figures_min_run_seconds,
        figures_timeout,
        method,
        analysis_device,
        drain_timeout,
        alerts,
        on_alert,
        detX,
        fix_fingers,
        max_fingers,
        finger_thresh,
        fit,
        randomize,
        peft,
        distance_from_init,
        esd_shift,
        summary_include_unreliable,
        max_overhead,
        watch_frozen=False,
        ends_only=False,
    ) -> MonitorSettings:
        """Check every argument (a :class:`WWMonitorError` naming the first bad one) and normalise."""
        check_schedule(
            ("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps), ends_only=ends_only
        )
        for name, flag in (
            ("background", background),
            ("blocking", blocking),
            ("worker_idle", worker_idle),
            ("log_histograms", log_histograms),
            ("log_text", log_text),
            ("log_callback_metrics", log_callback_metrics),
            ("summary_include_unreliable", summary_include_unreliable),
            ("watch_frozen", watch_frozen),
        ):
            check_bool(name, flag)
        if worker_type not in WORKER_TYPES:
            raise WWMonitorError(f"`worker_type` must be one of {WORKER_TYPES}, got {worker_type!r}.")
        check_int("worker_threads", worker_threads, 1, allow_none=True)
        check_int("worker_nice", worker_nice, 0, allow_none=False)
        check_int("max_pending", max_pending, 1, allow_none=False)
        if on_lag not in LAG_POLICIES:
            raise WWMonitorError(f"`on_lag` must be 'skip' or 'wait', got {on_lag!r}.")
        check_int("figures_every_n_snapshots", figures_every_n_snapshots, 0, allow_none=True)
        check_int("max_figure_layers", max_figure_layers, 0, allow_none=False)
        check_seconds("figures_min_run_seconds", figures_min_run_seconds, allow_zero=True)
        check_seconds("figures_timeout", figures_timeout, allow_zero=False)
        check_seconds("drain_timeout", drain_timeout, allow_zero=False)
        check_fraction("max_overhead", max_overhead)
        if not isinstance(alerts, (bool, AlertConfig)):
            raise WWMonitorError(f"`alerts` must be True, False or an AlertConfig, got {alerts!r}.")
        if on_alert is not None and not callable(on_alert):
            raise WWMonitorError(f"`on_alert` must be callable or None, got {on_alert!r}.")
        if conv_mode not in CONV_MODES:
            raise WWMonitorError(f"`conv_mode` must be one of {CONV_MODES}, got {conv_mode!r}.")
        device = validate_analysis_device(analysis_device)
        kinds_t = as_tuple(kinds, "kinds")
        if kinds_t is not None and any(k not in KINDS for k in kinds_t):
            raise WWMonitorError(f"`kinds` must be a subset of {list(KINDS)}, got {list(kinds_t)!r}.")
        include_t = as_tuple(include, "include")
        exclude_t = as_tuple(exclude, "exclude")
        figure_t = as_tuple(figure_layers, "figure_layers")
        # AnalysisConfig validates the regexes, size limits and method with precise messages.
        config = AnalysisConfig(
            include=include_t or (),
            exclude=exclude_t or (),
            kinds=kinds_t,
            conv_mode=conv_mode,
            min_evals=min_evals,
            max_evals=max_evals,
            max_n=max_n,
            method=method,
            keep_eigenvalues=True,
            detX=detX,
            fix_fingers=fix_fingers or None,
            max_fingers=max_fingers,
            finger_thresh=finger_thresh,
            fit=fit,
            randomize=randomize,
            peft=peft,
        )
        check_bool("distance_from_init", distance_from_init)
        check_bool("esd_shift", esd_shift)
        if figure_t:
            AnalysisConfig(include=figure_t)  # same regex validation
        return cls(
            config=config,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            background=background,
            blocking=blocking or not background,
            worker_type=worker_type,
            worker_threads=worker_threads,
            worker_nice=worker_nice,
            worker_idle=worker_idle,
            max_pending=max_pending,
            on_lag=on_lag,
            log_histograms=log_histograms,
            log_text=log_text,
            log_callback_metrics=log_callback_metrics,
            figures_every_n_snapshots=figures_every_n_snapshots or None,
            figure_layers=figure_t,
            max_figure_layers=max_figure_layers,
            figures_min_run_seconds=float(figures_min_run_seconds),
            figures_timeout=float(figures_timeout),
            analysis_device=device,
            drain_timeout=float(drain_timeout),
            alert_config=alerts if isinstance(alerts, AlertConfig) else AlertConfig(),
            alerts_on=alerts is not False,
            on_alert=on_alert,
            distance_from_init=distance_from_init,
            esd_shift=esd_shift,
            summary_include_unreliable=summary_include_unreliable,
            max_overhead=None if max_overhead is None else float(max_overhead),
            watch_frozen=watch_frozen,
            ends_only=ends_only,
        )

    def public_items(self):
        """``(name, value)`` of the fields the engine exposes under the same name."""
        return ((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in _PRIVATE)


#: Fields the engine keeps under a leading underscore (``_alert_config``, ``_alerts_on``).
_PRIVATE = ("alert_config", "alerts_on")
