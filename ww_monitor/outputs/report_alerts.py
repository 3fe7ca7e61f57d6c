"""The Alerts section of the HTML report: the alert texts rendered as TensorBoard's Text tab shows them.

:func:`markdown_html` renders the small markdown subset the ``ww/alerts`` entries use (bullet
lists, nested bullets, ``**bold**``, ```code```, ``[text](link)``); links to ``docs/alerts.md``
become links to the alerts page of a source checkout when there is one
(:func:`~ww_monitor.outputs.alert_text.alert_docs_url`), else stay relative.
"""

from __future__ import annotations

import html
import re

from .alert_text import ALERT_DOCS_URL, alert_docs_url

__all__ = ["markdown_html", "alerts_html"]

_MD_INLINE = ((re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>"))
#: ``[text](target)`` after HTML escaping (the target has no spaces or parentheses).
_MD_LINK = re.compile(r"\[([^\]]+)\]\(([^()\s]+)\)")


def _href(target: str) -> str:
    """The address a link of the alert texts points to in the report."""
    unescaped = html.unescape(target)
    if unescaped.startswith(ALERT_DOCS_URL + "#"):
        return html.escape(alert_docs_url(unescaped.split("#", 1)[1], local=True), quote=True)
    return html.escape(unescaped, quote=True)


def _inline(text: str) -> str:
    body = html.escape(text)
    for pattern, repl in _MD_INLINE:
        body = pattern.sub(repl, body)
    return _MD_LINK.sub(lambda m: f'<a href="{_href(m.group(2))}">{m.group(1)}</a>', body)


def markdown_html(text: str) -> str:
    """The markdown subset of the alert texts as HTML (see the module docstring)."""
    out: list[str] = []
    depth = 0  # open <ul> levels
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("* "):
            level = 1 + (len(line) - len(line.lstrip())) // 4
            while depth < level:
                out.append("<ul>")
                depth += 1
            while depth > level:
                out.append("</ul>")
                depth -= 1
            out.append(f"<li>{_inline(stripped[2:])}</li>")
            continue
        while depth:
            out.append("</ul>")
            depth -= 1
        if stripped:
            out.append(f"<p>{_inline(stripped)}</p>")
    out.extend("</ul>" for _ in range(depth))
    return "\n".join(out)


def alerts_html(data) -> str:
    """The Alerts section's body for a :class:`~ww_monitor.outputs.run_data.RunData`: one entry per
    snapshot with alerts."""
    if not data.alerts:
        if data.source_kind == "tensorboard":
            return '<p class="note">No alerts: this log has no <code>ww/alerts</code> text.</p>'
        return f'<p class="note">No alerts ({html.escape(data.alerts_origin)}).</p>'
    parts = [f'<p class="note">Source: {html.escape(data.alerts_origin)}.</p>']
    for a in data.alerts:
        parts.append(f"<h4>step {a['step']}</h4>{markdown_html(a['text'])}")
    return "\n".join(parts)
