"""Alert rules on snapshot results, with confirmation (hysteresis) and deduplication.

An alert fires when a layer *enters* a bad state and a resolved notice when it leaves; nothing
is repeated while a layer stays put. The rules are pure: :class:`AlertTracker` turns a snapshot
(layer results + skipped layers) into :class:`Alert` objects; the callback carries out actions.
What each rule means and what to do about it: ``docs/alerts.md`` (linked from every message).
The thresholds, and why they are what they are: :mod:`ww_monitor.monitoring.alert_config`.

Rules that explain each other are ordered: a diverging layer gets no rank_collapse ("too much
regularization" would point the wrong way: one exploding direction makes the rest look like
zeros next to it), shrinking, alpha_low or phase_regression; a shrinking layer gets no alpha or
phase_regression advice ("over-trained?", "under-trained?" or "correlations lost?" would hide
the cause, and adding weight decay would make it worse; rank_collapse still fires, it says the
same: too much regularization); a layer whose rank collapsed (rank_collapse holds)
gets no alpha_high/alpha_low advice (zeros distort the fit; "under-trained?" would point the
wrong way) and no phase_regression into rank-collapse (the same finding twice).

The two alpha band rules read the model as well as the layer: a layer counts when its alpha is
outside the band by more than the configured number of the fit's standard errors, and the rule
fires only when such layers are more than a configured share of the layers it reads
(:meth:`AlertTracker._band_conditions`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..analysis.phases import Phase
from ..analysis.results import LayerResult, SkippedLayer
from .alert_config import ACTIONS, ALPHA_LOW_EXCLUDE, BAND_RULES, RULES, AlertConfig

__all__ = [
    "Alert",
    "AlertConfig",
    "AlertTracker",
    "AlertError",
    "WWMonitorAlert",
    "RULES",
    "ACTIONS",
    "NON_FINITE_REASON",
    "ALERT_DOCS",
    "ALPHA_LOW_EXCLUDE",
    "RULE_MEANING",
]

log = logging.getLogger(__name__)

#: ``(rule, layer, value, threshold, message, detail, headline)`` of one condition that holds.
_Condition = tuple[str, str, float, float, str, str, str]


class WWMonitorAlert(UserWarning):
    """Warning category of alerts, so users can filter them: ``warnings.simplefilter("error", WWMonitorAlert)``."""


class AlertError(RuntimeError):
    """Raised by the ``"raise"`` action; carries the :class:`Alert`."""

    def __init__(self, alert: Alert):
        super().__init__(alert.message)
        self.alert = alert


NON_FINITE_REASON = "non-finite weights"
#: Where each rule's meaning, likely causes and remedies are explained (anchor = rule name).
ALERT_DOCS = "docs/alerts.md"
#: What each rule's finding suggests, in the messages and the grouped summaries.
RULE_MEANING = {
    "non_finite": "not analysed; the loss may have become NaN/Inf",
    "diverging": "learning rate too high?",
    "shrinking": "weights decaying to zero: weight decay too strong?",
    "rank_collapse": "too much regularization (weight decay) or dead units?",
    "phase_regression": "learned correlations being lost?",
    "alpha_low": "very heavy-tailed, possibly over-trained",
    "alpha_high": "little correlation learned (under-trained?)",
    "correlation_traps": "a few huge weights dominate the spectrum",
}
#: Most decimals used to print a value against its threshold (see :func:`format_vs`).
_MAX_DECIMALS = 6

# Position of each phase along training (rank-collapse is the "+1", handled separately).
_PHASE_ORDER = {
    Phase.RANDOM_LIKE: 0,
    Phase.BLEEDING_OUT: 1,
    Phase.BULK_PLUS_SPIKES: 2,
    Phase.BULK_DECAY: 3,
    Phase.HEAVY_TAILED: 4,
}


def format_vs(value: float, threshold: float, decimals: int = 2) -> str:
    """``value`` with the fewest decimals (at least ``decimals``) that keep it on the same side
    of ``threshold`` as printed: 1.9996 vs 2.0 prints "1.9996", never "2.00 < 2.0"."""
    if not (math.isfinite(value) and math.isfinite(threshold)):
        return f"{value}"
    for d in range(decimals, _MAX_DECIMALS + 1):
        shown = round(value, d)
        if (shown < threshold) == (value < threshold) and (shown > threshold) == (value > threshold):
            return f"{value:.{d}f}"
    return f"{value:.{_MAX_DECIMALS}g}"


@dataclass(frozen=True)
class Alert:
    """One alert (or, with ``resolved=True``, the notice that its condition ended)."""

    rule: str
    layer: str
    value: float
    threshold: float
    step: int
    epoch: int
    message: str
    resolved: bool = False
    #: The finding without the layer name or advice (``alpha=1.84 < 2``), for grouped displays.
    detail: str = ""
    #: What the layers of a grouped finding have in common, where the rule's name alone does not
    #: say it (band rules: ``alpha < 2 (by 2 standard errors)``); empty: from the rule.
    headline: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def docs(self) -> str:
        """Link to what to do about this rule."""
        return f"{ALERT_DOCS}#{self.rule}"


class AlertTracker:
    """Evaluates the rules snapshot after snapshot and remembers which conditions are active."""

    def __init__(self, config: AlertConfig | None = None):
        self.config = config or AlertConfig()
        self.active: dict[tuple[str, str], Alert] = {}
        self.best_phase: dict[str, str] = {}  # furthest confirmed phase each layer has reached
        self.confirmed_phase: dict[str, str] = {}  # the layer's phase once seen on enough consecutive snapshots
        self.phase_run: dict[str, list] = {}  # layer -> [latest phase, consecutive snapshots showing it]
        self.held: dict[tuple[str, str], int] = {}  # condition -> consecutive snapshots it held (not yet fired)
        self.cleared: dict[tuple[str, str], int] = {}  # active alert -> consecutive snapshots it was clear
        self.norm_ref: dict[str, float] = {}  # layer -> log10(lambda_max) before any divergence
        self.norm_peak: dict[str, float] = {}  # layer -> largest log10(lambda_max) outside divergences
        self.snapshots_seen = 0
        self.num_fired = 0

    def _confirm_phases(self, layers: Sequence[LayerResult]) -> None:
        """Hysteresis: a layer's first phase is taken as it is; a *change* of phase is confirmed
        once the new phase was shown on ``phase_confirm_snapshots`` snapshots in a row."""
        need = self.config.phase_confirm_snapshots
        for layer in layers:
            if layer.phase is None:
                continue
            cur = Phase(layer.phase).value
            run = self.phase_run.get(layer.name)
            run = [cur, run[1] + 1] if run is not None and run[0] == cur else [cur, 1]
            self.phase_run[layer.name] = run
            if run[1] >= need or layer.name not in self.confirmed_phase:
                self.confirmed_phase[layer.name] = cur
                best = self.best_phase.get(layer.name)
                if best is None or _PHASE_ORDER.get(Phase(cur), -1) > _PHASE_ORDER.get(Phase(best), -1):
                    self.best_phase[layer.name] = cur

    def update(
        self, layers: Sequence[LayerResult], skipped: Iterable[SkippedLayer], step: int, epoch: int
    ) -> list[Alert]:
        """Alerts that start or end with this snapshot, most severe first, raised before resolved."""
        self.snapshots_seen += 1
        skipped = list(skipped)
        self._confirm_phases(layers)
        now: dict[tuple[str, str], tuple] = {}
        for rule, layer, value, threshold, message, detail, headline in self._conditions(layers, skipped):
            if rule in self.config.enabled:
                now[(rule, layer)] = (value, threshold, message, detail, headline)
        for l in layers:  # the reference of the diverging rule follows the layer until it jumps
            if math.isfinite(l.log_spectral_norm) and self._jump(l) <= self.config.diverging_decades:
                self.norm_ref[l.name] = float(l.log_spectral_norm)
                self.norm_peak[l.name] = max(self.norm_peak.get(l.name, -math.inf), float(l.log_spectral_norm))

        raised: list[Alert] = []
        resolved: list[Alert] = []
        for key, (value, threshold, message, detail, headline) in now.items():
            self.cleared.pop(key, None)
            if key in self.active:
                continue
            self.held[key] = self.held.get(key, 0) + 1
            if self.held[key] >= self.config.confirm_for(key[0]):
                self.held.pop(key)
                alert = Alert(key[0], key[1], value, threshold, step, epoch, message, detail=detail, headline=headline)
                self.active[key] = alert
                raised.append(alert)
        seen = {l.name for l in layers} | {s.name for s in skipped}
        for key in list(self.held):
            if key not in now and key[1] in seen:
                self.held.pop(key)  # the streak is broken
        for key in list(self.active):
            # A condition ends when the layer was analysed again and no longer meets it (for as
            # many consecutive snapshots as it took to fire).
            if key not in now and key[1] in seen:
                self.cleared[key] = self.cleared.get(key, 0) + 1
                if self.cleared[key] >= self.config.confirm_for(key[0]):
                    self.cleared.pop(key)
                    old = self.active.pop(key)
                    resolved.append(
                        Alert(
                            old.rule,
                            old.layer,
                            math.nan,
                            old.threshold,
                            step,
                            epoch,
                            f"resolved: {old.rule} on {old.layer}",
                            resolved=True,
                            detail="resolved",
                        )
                    )
        order = {r: i for i, r in enumerate(RULES)}
        raised.sort(key=lambda a: order.get(a.rule, len(order)))
        resolved.sort(key=lambda a: order.get(a.rule, len(order)))
        self.num_fired += len(raised)
        return raised + resolved

    def _jump(self, l: LayerResult) -> float:
        """log10 of how far lambda_max rose above the diverging rule's reference (0 without one)."""
        ref = self.norm_ref.get(l.name)
        return l.log_spectral_norm - ref if ref is not None and math.isfinite(l.log_spectral_norm) else 0.0

    def _fall(self, l: LayerResult) -> float:
        """log10 of how far lambda_max fell below the largest it had (0 without one)."""
        peak = self.norm_peak.get(l.name)
        return peak - l.log_spectral_norm if peak is not None and math.isfinite(l.log_spectral_norm) else 0.0

    def _band_layer(self, l: LayerResult, band: dict) -> None:
        """Count a layer with a trusted fit for the band rules that read it, and note it where
        its alpha is outside the band by more than the margin (``band``: rule -> [read, layers])."""
        c = self.config
        sigma = (l.alpha - 1.0) / math.sqrt(l.num_pl_spikes) if l.num_pl_spikes > 0 else math.inf
        for rule in BAND_RULES:
            if rule == "alpha_low" and not c.alpha_low_applies(l.name):
                continue
            if rule == "alpha_high" and self.snapshots_seen <= c.alpha_high_warmup:
                continue
            band[rule][0] += 1
            sigmas = c.band(rule)[0]
            margin = sigmas * sigma if sigmas > 0 else 0.0  # no margin asked: an unknown sigma is no bar
            if (l.alpha + margin < c.alpha_low) if rule == "alpha_low" else (l.alpha - margin > c.alpha_high):
                band[rule][1].append((l, sigma))

    def _band_conditions(self, band: dict[str, Any]) -> Iterator[_Condition]:
        """The band rules read the model too: a rule holds on its layers only when they are more
        than its ``min_share`` of the layers it reads (:mod:`.alert_config`: why)."""
        c = self.config
        for rule in BAND_RULES:
            read, outside = band[rule]
            if not outside or not len(outside) / read > c.band(rule)[1]:
                continue
            threshold = c.alpha_low if rule == "alpha_low" else c.alpha_high
            sign = "<" if rule == "alpha_low" else ">"
            headline = band_headline(rule, threshold, c.band(rule)[0])
            for l, sigma in outside:
                detail = f"alpha={format_vs(l.alpha, threshold)} {sign} {threshold:g} (standard error {sigma:.2f})"
                share = f"{headline} in {_share(len(outside), read)}"
                yield (
                    rule,
                    l.name,
                    l.alpha,
                    threshold,
                    _with_docs(f"{detail} in {l.name}; {share}: {RULE_MEANING[rule]}", rule),
                    detail,
                    headline,
                )

    def _conditions(self, layers: Sequence[LayerResult], skipped: Iterable[SkippedLayer]) -> Iterator[_Condition]:
        """``(rule, layer, value, threshold, message, detail, headline)`` of every condition that holds now."""
        c = self.config
        band = {rule: [0, []] for rule in BAND_RULES}  # rule -> [layers read, layers outside the band]
        for s in skipped:
            if s.reason.startswith(NON_FINITE_REASON):
                yield (
                    "non_finite",
                    s.name,
                    math.nan,
                    math.nan,
                    _with_docs(f"layer {s.name} has NaN/Inf weights", "non_finite"),
                    "NaN/Inf weights",
                    "",
                )
        for l in layers:
            jump = self._jump(l)
            diverging = jump > c.diverging_decades and "diverging" in c.enabled
            if jump > c.diverging_decades:
                yield _norm_condition("diverging", l.name, jump, c.diverging_decades)
            if diverging:
                continue  # everything else on this layer is a consequence of the explosion
            fall = self._fall(l)
            shrinking = fall > c.shrinking_decades and "shrinking" in c.enabled
            if fall > c.shrinking_decades:
                yield _norm_condition("shrinking", l.name, fall, c.shrinking_decades)
            frac = l.rank_loss / l.num_evals if l.num_evals else 0.0
            collapsed = frac > c.rank_loss_fraction and "rank_collapse" in c.enabled
            if frac > c.rank_loss_fraction:
                detail = (
                    f"{l.rank_loss}/{l.num_evals} eigenvalues are ~0 "
                    f"({format_vs(100 * frac, 100 * c.rank_loss_fraction, 1)}% > {100 * c.rank_loss_fraction:g}%)"
                )
                yield (
                    "rank_collapse",
                    l.name,
                    frac,
                    c.rank_loss_fraction,
                    _with_docs(
                        f"rank collapse in {l.name}: {detail}; {RULE_MEANING['rank_collapse']}", "rank_collapse"
                    ),
                    detail,
                    "",
                )
            is_collapsed_phase = l.phase is not None and Phase(l.phase) == Phase.RANK_COLLAPSE
            alpha_ok = (
                l.fit_ok
                and l.reliable
                and l.num_evals >= c.alpha_min_evals
                and not collapsed
                and not is_collapsed_phase
                and not shrinking
            )
            if alpha_ok:
                self._band_layer(l, band)
            if l.num_traps is not None and l.num_traps > c.max_traps:
                detail = f"{l.num_traps} correlation trap(s)"
                yield (
                    "correlation_traps",
                    l.name,
                    float(l.num_traps),
                    float(c.max_traps),
                    _with_docs(f"{detail} in {l.name}: {RULE_MEANING['correlation_traps']}", "correlation_traps"),
                    detail,
                    "",
                )
            best, cur = self.best_phase.get(l.name), self.confirmed_phase.get(l.name)
            if (
                shrinking
                or best is None
                or cur is None
                or not _regressed(Phase(best), Phase(cur), c.phase_regression_steps)
            ):
                continue
            if collapsed and Phase(cur) == Phase.RANK_COLLAPSE:
                continue  # rank_collapse already says it
            yield (
                "phase_regression",
                l.name,
                float(_PHASE_ORDER.get(Phase(cur), -1)),
                float(_PHASE_ORDER.get(Phase(best), -1)),
                _with_docs(
                    f"{l.name} regressed from {best} to {cur} (confirmed on "
                    f"{c.phase_confirm_snapshots} consecutive snapshots)",
                    "phase_regression",
                ),
                f"{best} -> {cur}",
                "",
            )
        yield from self._band_conditions(band)

    def state_dict(self) -> dict:
        return {
            "active": [a.to_dict() for a in self.active.values()],
            "best_phase": dict(self.best_phase),
            "confirmed_phase": dict(self.confirmed_phase),
            "phase_run": {k: list(v) for k, v in self.phase_run.items()},
            "held": [[r, l, n] for (r, l), n in self.held.items()],
            "cleared": [[r, l, n] for (r, l), n in self.cleared.items()],
            "norm_ref": dict(self.norm_ref),
            "norm_peak": dict(self.norm_peak),
            "snapshots_seen": self.snapshots_seen,
            "num_fired": self.num_fired,
        }

    def load_state_dict(self, state: dict) -> None:
        self.active = {(a["rule"], a["layer"]): Alert(**a) for a in state.get("active", [])}
        self.best_phase = dict(state.get("best_phase", {}))
        # States saved before confirmation existed: their best phase is taken as confirmed.
        self.confirmed_phase = dict(state.get("confirmed_phase", self.best_phase))
        self.phase_run = {k: [v[0], int(v[1])] for k, v in state.get("phase_run", {}).items()}
        self.held = {(r, l): int(n) for r, l, n in state.get("held", [])}
        self.cleared = {(r, l): int(n) for r, l, n in state.get("cleared", [])}
        self.norm_ref = {k: float(v) for k, v in state.get("norm_ref", {}).items()}
        # States saved before the shrinking rule: the peak starts again from the resume.
        self.norm_peak = {k: float(v) for k, v in state.get("norm_peak", {}).items()}
        self.snapshots_seen = int(state.get("snapshots_seen", 0))
        self.num_fired = int(state.get("num_fired", 0))


def band_headline(rule: str, threshold: float, sigmas: float) -> str:
    """What the layers of a band rule's finding have in common: ``alpha < 2 (by 2 standard errors)``."""
    by = f" (by {sigmas:g} standard error{'' if sigmas == 1 else 's'})" if sigmas > 0 else ""
    return f"alpha {'<' if rule == 'alpha_low' else '>'} {threshold:g}{by}"


def _share(count: int, read: int) -> str:
    """How many of the layers a band rule reads count: "3 of the 10 layers it reads"."""
    if read == 1:
        return "the one layer it reads"
    return f"all {read} layers it reads" if count == read else f"{count} of the {read} layers it reads"


def _norm_condition(rule: str, layer: str, decades: float, threshold: float) -> tuple:
    """The condition of ``diverging`` (lambda_max rose ``decades`` in log10 above its reference)
    or ``shrinking`` (fell that far below its peak)."""
    up = rule == "diverging"
    detail = (
        f"largest eigenvalue {'grew' if up else 'fell'} {10**decades:.3g}x "
        f"(log10 {'+' if up else '-'}{format_vs(decades, threshold)} {'>' if up else '<'} "
        f"{'' if up else '-'}{threshold:g})"
    )
    where = "since before the jump" if up else "below the largest it had"
    return (
        rule,
        layer,
        decades,
        threshold,
        _with_docs(f"{layer} is {rule}: its {detail} {where}; {RULE_MEANING[rule]}", rule),
        detail,
        "",
    )


def _with_docs(message: str, rule: str) -> str:
    return f"{message} [what to do: {ALERT_DOCS}#{rule}]"


def _regressed(best: Phase, cur: Phase, steps: int) -> bool:
    if cur == Phase.RANK_COLLAPSE:
        return best != Phase.RANK_COLLAPSE
    if best == Phase.RANK_COLLAPSE:
        return False
    return _PHASE_ORDER[best] - _PHASE_ORDER[cur] >= steps


def __getattr__(name: str) -> Any:
    # Formatting and dispatch live in their own modules (they import this one); kept importable here.
    if name == "alerts_markdown":
        from ..outputs.alert_text import alerts_markdown

        return alerts_markdown
    if name == "dispatch_alerts":
        from .alert_dispatch import dispatch_alerts

        return dispatch_alerts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
