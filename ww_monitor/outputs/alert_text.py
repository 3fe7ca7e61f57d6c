"""How one snapshot's alerts read: one line per rule, for the console, TensorBoard and the report.

Ten layers crossing one threshold at one snapshot are one finding, so the alerts of a snapshot
are grouped by rule (:func:`group_alerts`) and each group is summarised once
(:func:`group_summary`), e.g.::

    alpha < 2 (by 2 standard errors) in 3 of 13 layers: 2 out_proj, v; worst
    net.encoder.layers.0.self_attn.out_proj (1.40), ...: very heavy-tailed, possibly over-trained

* :func:`console_text`: the one warning of a snapshot (a line per rule, a plain docs path);
* :func:`alerts_markdown`: the one ``ww/alerts`` TensorBoard text entry of a snapshot: a bullet
  per rule with a markdown link to its section of ``docs/alerts.md``, and under it every layer
  with its value (the report renders the same text).

Layers are shown by their displayed names (:mod:`.display_names`); the worst layers of an alpha
rule are ranked as everywhere else (:mod:`.worst_layers`). The structured
:class:`~ww_monitor.monitoring.alerts.Alert` objects (``alerts_fired``, ``on_alert``) stay one per
layer with the full name.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from ..monitoring.alerts import ALERT_DOCS, RULE_MEANING, RULES, Alert
from .display_names import display_name_map
from .worst_layers import WORST_LISTED, worst_layers

__all__ = [
    "ALERT_DOCS_URL",
    "alert_docs_url",
    "AlertGroup",
    "group_alerts",
    "group_summary",
    "console_text",
    "alerts_markdown",
]

#: Where the links of TensorBoard's alert text point (relative: no published docs site yet). The
#: console prints :data:`~ww_monitor.monitoring.alerts.ALERT_DOCS` as a plain path.
ALERT_DOCS_URL = ALERT_DOCS
#: The alerts page of a source checkout (the HTML report links to it when it exists).
_LOCAL_DOCS = Path(__file__).resolve().parents[2] / ALERT_DOCS
#: At most this many layer roles are counted in a summary ("6 q_proj, 3 k_proj, lm_head, ...").
MAX_ROLES = 6


def alert_docs_url(rule: str, local: bool = False) -> str:
    """Link to what to do about ``rule``: :data:`ALERT_DOCS_URL` ``#rule``, or with ``local`` the
    ``file://`` address of the docs in a source checkout when they are there."""
    if local and _LOCAL_DOCS.is_file():
        return f"{_LOCAL_DOCS.as_uri()}#{rule}"
    return f"{ALERT_DOCS_URL}#{rule}"


class AlertGroup(NamedTuple):
    """The alerts of one rule at one snapshot (all raised, or all resolved)."""

    rule: str
    resolved: bool
    alerts: list


def group_alerts(alerts: Sequence[Alert]) -> list[AlertGroup]:
    """Alerts by rule, most severe rule first, raised groups before resolved ones."""
    order = {r: i for i, r in enumerate(RULES)}
    groups: dict[tuple[bool, str], list] = {}
    for a in alerts:
        groups.setdefault((a.resolved, a.rule), []).append(a)
    keys = sorted(groups, key=lambda k: (k[0], order.get(k[1], len(order))))
    return [AlertGroup(rule, resolved, groups[(resolved, rule)]) for resolved, rule in keys]


def _headline(rule: str, threshold: float) -> str:
    """What the layers of a group have in common."""
    if rule == "alpha_low":
        return f"alpha < {threshold:g}"
    if rule == "alpha_high":
        return f"alpha > {threshold:g}"
    if rule == "rank_collapse":
        return f"over {100 * threshold:g}% of eigenvalues ~0"
    if rule == "diverging":
        return f"largest eigenvalue up over {10**threshold:.3g}x"
    if rule == "shrinking":
        return f"largest eigenvalue down over {10**threshold:.3g}x from its peak"
    if rule == "correlation_traps":
        return f"over {threshold:g} correlation trap(s)"
    if rule == "phase_regression":
        return "phase moved back"
    return "NaN/Inf weights"


def _value(a: Alert) -> str:
    """A layer's value in a list of one rule's layers."""
    if a.rule in ("alpha_low", "alpha_high"):
        return f"{a.value:.2f}"
    if a.rule == "rank_collapse":
        return f"{100 * a.value:.1f}%"
    if a.rule in ("diverging", "shrinking"):
        return f"{10**a.value:.3g}x"
    if a.rule == "correlation_traps":
        return f"{a.value:g}"
    if a.rule == "phase_regression":
        return a.detail
    return ""  # non_finite: the headline says it all


def _role(display: str) -> str:
    """What a layer is within its block: the last part of its name (``q_proj``), unless that is
    only an index (``net.4``: then the whole name)."""
    last = display.rsplit(".", 1)[-1]
    return display if last.isdigit() else last


def _roles(displayed: Sequence[str]) -> str:
    counts = Counter(_role(d) for d in displayed)
    parts = [role if n == 1 else f"{n} {role}" for role, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    more = len(parts) - MAX_ROLES
    return ", ".join(parts[:MAX_ROLES]) + (f", +{more} more" if more > 0 else "")


def _worst(group: AlertGroup, tails: Mapping[str, float] | None) -> list[Alert]:
    """The group's worst layers: for the alpha rules by the band ranking of :mod:`.worst_layers`
    (standard errors outside [2, 4] given the tails), else by value; none where values are not
    comparable (NaN weights, phases)."""
    alerts = group.alerts
    if group.rule in ("alpha_low", "alpha_high"):
        names = [a.layer for a in alerts]
        ranked = worst_layers(
            names,
            [a.value for a in alerts],
            [tails.get(n, math.nan) for n in names] if tails else None,
            count=WORST_LISTED,
        )
        by_name = {a.layer: a for a in alerts}
        return [by_name[o.name] for o in ranked]
    if group.rule in ("rank_collapse", "diverging", "shrinking", "correlation_traps"):
        return sorted(alerts, key=lambda a: -a.value)[:WORST_LISTED]
    return []


def group_summary(
    group: AlertGroup,
    names: Mapping[str, str] | None = None,
    total: int | None = None,
    tails: Mapping[str, float] | None = None,
) -> str:
    """One line for a group (no docs link): ``names`` maps full to displayed names, ``total`` is
    the number of layers analysed at the snapshot, ``tails`` the tail sizes for the ranking."""
    names = names or {}
    shown = [names.get(a.layer, a.layer) for a in group.alerts]
    n = len(group.alerts)
    if group.resolved:
        return (
            f"resolved: {group.rule} on {n} layer(s): {_roles(shown)}"
            if n > 1
            else f"resolved: {group.rule} on {shown[0]}"
        )
    meaning = RULE_MEANING.get(group.rule, "")
    if n == 1:  # the layer's own message, by its displayed name, without the docs pointer
        a = group.alerts[0]
        text = a.message.split(" [what to do:", 1)[0]
        return text.replace(a.layer, shown[0], 1) if a.layer in text else f"{text} ({shown[0]})"
    of = f" of {total}" if total else ""
    headline = group.alerts[0].headline or _headline(group.rule, group.alerts[0].threshold)
    text = f"{headline} in {n}{of} layers: {_roles(shown)}"
    worst = _worst(group, tails)
    if worst:
        text += "; worst " + ", ".join(f"{names.get(a.layer, a.layer)} ({_value(a)})" for a in worst)
    return f"{text}: {meaning}"


def _header(alerts: Sequence[Alert], step: int, active: int | None) -> str:
    raised = sum(1 for a in alerts if not a.resolved)
    return f"{raised} alert(s) at step {step}" + (f" ({active} active)" if active is not None else "")


def console_text(
    alerts: Sequence[Alert],
    step: int,
    active: int | None = None,
    layer_names: Sequence[str] = (),
    tails: Mapping[str, float] | None = None,
) -> str:
    """The one console warning of a snapshot's raised alerts (resolved ones are left out):
    a line per rule, each ending with the plain docs path."""
    raised = [a for a in alerts if not a.resolved]
    names = display_name_map(list(layer_names) + [a.layer for a in raised])
    lines = [
        f"{group_summary(g, names, len(layer_names) or None, tails)} [what to do: {ALERT_DOCS}#{g.rule}]"
        for g in group_alerts(raised)
    ]
    if len(lines) == 1:
        return f"ww_monitor alert at step {step}: {lines[0]}"
    return f"ww_monitor: {_header(raised, step, active)}:\n" + "\n".join(f"  {line}" for line in lines)


def alerts_markdown(
    alerts: Sequence[Alert],
    step: int,
    active: int | None = None,
    layer_names: Sequence[str] = (),
    tails: Mapping[str, float] | None = None,
) -> str:
    """All alerts of one snapshot as one markdown entry: a bullet per rule with its summary and
    a link to what to do, and nested under it every layer with its value."""
    names = display_name_map(list(layer_names) + [a.layer for a in alerts])
    lines = [f"**{_header(alerts, step, active)}**", ""]
    for g in group_alerts(alerts):
        if g.resolved:
            shown = ", ".join(f"`{names.get(a.layer, a.layer)}`" for a in g.alerts)
            lines.append(f"* resolved: **{g.rule}** on {shown}")
            continue
        summary = group_summary(g, names, len(layer_names) or None, tails)
        lines.append(f"* **{g.rule}**: {summary} ([what to do]({alert_docs_url(g.rule)}))")
        if len(g.alerts) > 1 or g.alerts[0].detail == "":
            lines.append(
                "    * " + ", ".join(f"`{names.get(a.layer, a.layer)}` {_value(a)}".rstrip() for a in g.alerts)
            )
    return "\n".join(lines)
