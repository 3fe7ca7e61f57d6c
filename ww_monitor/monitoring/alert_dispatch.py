"""Carry out the actions of a snapshot's alerts: one warning, one TensorBoard entry, every callback.

:func:`dispatch_alerts` is called once per completed snapshot with the alerts the
:class:`~ww_monitor.monitoring.alerts.AlertTracker` returned. What the user reads is grouped by
rule (:mod:`ww_monitor.outputs.alert_text`): at most one warning and one ``log`` record per
snapshot, one ``ww/alerts`` text entry per snapshot; ``on_alert`` still gets every
:class:`~ww_monitor.monitoring.alerts.Alert`, one per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..user_warnings import warn_user
from .alerts import Alert, AlertConfig, AlertError, WWMonitorAlert

__all__ = ["dispatch_alerts"]

log = logging.getLogger(__name__)


def dispatch_alerts(
    alerts: Sequence[Alert],
    config: AlertConfig,
    *,
    tensorboard_writers=(),
    on_alert=None,
    rank: int = 0,
    active: int | None = None,
    layers: Sequence = (),
) -> bool:
    """Carry out each alert's actions. Returns True when one asks to stop training.

    Every rank computes the same alerts from the same gathered results, so ``raise`` and
    ``stop`` act on every rank alike; messages, warnings and TensorBoard text come from rank 0
    only. ``tensorboard_writers`` are SummaryWriter-like objects (``add_text``). ``layers`` are
    the snapshot's :class:`~ww_monitor.analysis.results.LayerResult` objects: their names set the
    displayed names and the "of N layers" count, their tail sizes the ranking of the worst
    layers. Warnings point at the user's code.
    """
    from ..outputs.alert_text import alerts_markdown, console_text

    stop = False
    to_raise: Alert | None = None
    by_action: dict[str, list[Alert]] = {"log": [], "warn": [], "tensorboard": []}
    for alert in alerts:
        actions = config.actions_for(alert.rule)
        if rank == 0:
            for action in by_action:
                if action in actions and not (action == "warn" and alert.resolved):
                    by_action[action].append(alert)
            if "callback" in actions and on_alert is not None:
                try:
                    on_alert(alert)
                except Exception as err:
                    warn_user(f"ww_monitor: on_alert callback raised {type(err).__name__}: {err}", RuntimeWarning)
        if alert.resolved:
            continue
        if "stop" in actions:
            stop = True
        if "raise" in actions and to_raise is None:
            to_raise = alert
    if rank == 0 and any(by_action.values()):
        step = alerts[0].step
        names = [getattr(r, "name", r) for r in layers]
        tails = {r.name: r.num_pl_spikes for r in layers if hasattr(r, "num_pl_spikes")}
        if by_action["log"]:
            raised = [a for a in by_action["log"] if not a.resolved]
            resolved = [a for a in by_action["log"] if a.resolved]
            if raised:
                log.warning("%s", console_text(raised, step, active, names, tails))
            if resolved:
                log.info(
                    "ww_monitor (step %d): %s", step, "; ".join(f"resolved: {a.rule} on {a.layer}" for a in resolved)
                )
        if by_action["warn"]:
            warn_user(console_text(by_action["warn"], step, active, names, tails), WWMonitorAlert)
        if by_action["tensorboard"]:
            text = alerts_markdown(by_action["tensorboard"], step, active, names, tails)
            for writer in tensorboard_writers:
                try:
                    writer.add_text("ww/alerts", text, step)
                except Exception as err:  # a closed writer must not end training
                    log.warning("ww_monitor: could not write alerts to TensorBoard: %s", err)
    if to_raise is not None:
        raise AlertError(to_raise)
    return stop
