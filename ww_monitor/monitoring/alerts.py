"""Alert rules on snapshot results, with confirmation (hysteresis) and deduplication.

An alert fires when a layer *enters* a bad state and a resolved notice when it leaves; nothing
is repeated while a layer stays put. The rules are pure: :class:`AlertTracker` turns a snapshot
(layer results + skipped layers) into :class:`Alert` objects; the callback carries out actions.
What each rule means and what to do about it: ``docs/alerts.md`` (linked from every message).

Default thresholds and why:

* ``alpha_low = 2.0``: 80-90% of layers of well-trained production models have alpha in [2, 4]
  (Martin & Mahoney, JMLR 2021); alpha < 2 signals over-training (very heavy tails).
* ``alpha_high = 6.0``: above 6 a layer's spectrum is close to random (little learned
  correlation). Not 4, the upper edge of that band: layers at 4-6 are common in small,
  well-trained transformers, and at 4 this rule was the main source of false alarms on the
  healthy runs of ``benchmarks/bench_evidence.py`` while adding almost no detection
  (``docs/evidence.md``, the table of replayed alert settings).
* ``alpha_high_warmup = 5`` snapshots: every layer starts random-like with a large alpha, so the
  high-alpha rule only speaks once training had time to move the spectrum.
* ``alpha_min_evals = 50``: the alpha rules ignore layers with fewer eigenvalues, and layers
  whose fit is not reliable (:mod:`ww_monitor.analysis.reliability`): a power-law fit on a handful of
  points swings by several units between snapshots, and an alert on it would be noise.
* ``alpha_confirm_snapshots = 2``: alpha must be outside the band on this many consecutive
  snapshots to fire, and back inside on as many to resolve, so a layer hugging a boundary
  (alpha 1.99, 2.01, 1.98 ...) neither flaps nor fires on one noisy fit.
* ``rank_loss_fraction = 0.1``: a tenth of a layer's directions below the precision-aware rank
  tolerance is far beyond what healthy layers show (they lose none) yet well before collapse.
  Fires at once: zeros are not a fit, so there is no noise to confirm away.
* ``phase_regression_steps = 2`` and ``phase_confirm_snapshots = 2``: a phase counts once the
  layer showed it on two consecutive snapshots (a one-snapshot excursion across a rule's
  boundary is not a change); the rule fires when the confirmed phase is at least two phases
  behind the furthest confirmed phase (e.g. heavy-tailed -> bulk+spikes), or in rank-collapse
  after another phase. Active while the layer stays there, so it fires once.

* ``diverging_decades = 3.0``: lambda_max (the squared spectral norm) of a layer grew more than
  1000x above its last value before the jump. Healthy training moves log10(lambda_max) by at
  most ~0.6 between epoch snapshots, and by 2.1 over the first 10 epochs of an unregularised
  over-fitting run (``bench_signals.py``); a learning rate that diverges moves it by 6-30
  decades in one snapshot. Fires at once and stays
  until lambda_max is back within the factor of that reference.

Rules that explain each other are ordered: a diverging layer gets no rank_collapse ("too much
regularization" would point the wrong way: one exploding direction makes the rest look like
zeros next to it), alpha_low or phase_regression; a layer whose rank collapsed (rank_collapse holds)
gets no alpha_high/alpha_low advice (zeros distort the fit; "under-trained?" would point the
wrong way) and no phase_regression into rank-collapse (the same finding twice).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from ..analysis.phases import Phase
from ..analysis.results import LayerResult, SkippedLayer

__all__ = [
    "Alert", "AlertConfig", "AlertTracker", "AlertError", "WWMonitorAlert",
    "RULES", "ACTIONS", "NON_FINITE_REASON", "ALERT_DOCS", "ALPHA_LOW_EXCLUDE", "RULE_MEANING",
]

log = logging.getLogger(__name__)


class WWMonitorAlert(UserWarning):
    """Warning category of alerts, so users can filter them: ``warnings.simplefilter("error", WWMonitorAlert)``."""


class AlertError(RuntimeError):
    """Raised by the ``"raise"`` action; carries the :class:`Alert`."""

    def __init__(self, alert: "Alert"):
        super().__init__(alert.message)
        self.alert = alert

# Ordered by severity: alerts of one snapshot are reported in this order.
RULES = ("non_finite", "diverging", "rank_collapse", "phase_regression", "alpha_low", "alpha_high",
         "correlation_traps")
ACTIONS = ("log", "warn", "tensorboard", "callback", "raise", "stop")
# "log" is opt-in: with "warn" on too, an unconfigured logging setup would print each alert twice.
DEFAULT_ACTIONS = ("warn", "tensorboard", "callback")
NON_FINITE_REASON = "non-finite weights"
#: Where each rule's meaning, likely causes and remedies are explained (anchor = rule name).
ALERT_DOCS = "docs/alerts.md"
#: Layers the ``alpha_low`` rule skips by default: attention query/key projections, by the last part
#: of the name (LLaMA/Mistral/OPT ``q_proj``/``k_proj``, BERT ``query``/``key``, T5 ``q``/``k``,
#: DistilBERT ``q_lin``/``k_lin``, Meta LLaMA ``wq``/``wk``, diffusers ``to_q``/``to_k``). On the
#: LLaMA copy task (``benchmarks/bench_transformer_alerts.py``) their alpha is below 2 alike in runs
#: that generalise and runs that only memorise, so there it says nothing about over-training
#: (docs/alerts.md#alpha_low has the numbers). Fused q/k/v matrices are not skipped.
ALPHA_LOW_EXCLUDE = (r"(^|\.)(q_proj|k_proj|query|key|q|k|q_lin|k_lin|wq|wk|to_q|to_k)$",)
#: What each rule's finding suggests, in the messages and the grouped summaries.
RULE_MEANING = {
    "non_finite": "not analysed; the loss may have become NaN/Inf",
    "diverging": "learning rate too high?",
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
    Phase.RANDOM_LIKE: 0, Phase.BLEEDING_OUT: 1, Phase.BULK_PLUS_SPIKES: 2,
    Phase.BULK_DECAY: 3, Phase.HEAVY_TAILED: 4,
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

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def docs(self) -> str:
        """Link to what to do about this rule."""
        return f"{ALERT_DOCS}#{self.rule}"


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds, enabled rules and per-rule actions. Validated on creation."""

    alpha_low: float = 2.0
    alpha_high: float = 6.0
    alpha_high_warmup: int = 5
    alpha_min_evals: int = 50
    rank_loss_fraction: float = 0.1
    phase_regression_steps: int = 2
    max_traps: int = 0
    enabled: tuple[str, ...] = RULES
    actions: dict = field(default_factory=dict)  # rule -> tuple of actions; missing: DEFAULT_ACTIONS
    alpha_confirm_snapshots: int = 2
    phase_confirm_snapshots: int = 2
    diverging_decades: float = 3.0
    alpha_low_exclude: tuple[str, ...] = ALPHA_LOW_EXCLUDE

    def __post_init__(self):
        from collections.abc import Mapping

        from ..errors import WWMonitorError
        from ..validation import check_int, check_names, check_number

        owner = "AlertConfig"
        check_number("alpha_low", self.alpha_low, owner=owner)
        check_number("alpha_high", self.alpha_high, owner=owner)
        if not self.alpha_low < self.alpha_high:
            raise WWMonitorError(f"{owner}: `alpha_low` ({self.alpha_low}) must be below `alpha_high` ({self.alpha_high}).")
        check_number("rank_loss_fraction", self.rank_loss_fraction, above=0.0, at_most=1.0, owner=owner)
        check_int("alpha_high_warmup", self.alpha_high_warmup, 0, owner=owner)
        check_int("alpha_min_evals", self.alpha_min_evals, 0, owner=owner)
        check_int("phase_regression_steps", self.phase_regression_steps, 1, owner=owner)
        check_int("max_traps", self.max_traps, 0, owner=owner)
        enabled = check_names("enabled", self.enabled, RULES, "alert rule", owner=owner)
        if not isinstance(self.actions, Mapping):
            raise WWMonitorError(f"{owner}: `actions` must be a dict of rule -> actions, got {self.actions!r}.")
        check_names("actions", tuple(self.actions), RULES, "alert rule", owner=owner)
        actions = {r: check_names(f"actions[{r!r}]", a, ACTIONS, "action", owner=owner)
                   for r, a in self.actions.items()}
        check_int("alpha_confirm_snapshots", self.alpha_confirm_snapshots, 1, owner=owner)
        check_int("phase_confirm_snapshots", self.phase_confirm_snapshots, 1, owner=owner)
        check_number("diverging_decades", self.diverging_decades, above=0.0, owner=owner)
        exclude = (self.alpha_low_exclude,) if isinstance(self.alpha_low_exclude, str) else self.alpha_low_exclude
        try:
            exclude = tuple(exclude)
            compiled = tuple(re.compile(p) for p in exclude)
        except (TypeError, re.error) as err:
            raise WWMonitorError(f"{owner}: `alpha_low_exclude` must be a regex or a sequence of regexes "
                                 f"({err}).") from None
        object.__setattr__(self, "alpha_low_exclude", exclude)
        object.__setattr__(self, "_alpha_low_exclude", compiled)
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "actions", actions)

    def actions_for(self, rule: str) -> tuple[str, ...]:
        return self.actions.get(rule, DEFAULT_ACTIONS)

    def alpha_low_applies(self, layer: str) -> bool:
        """The ``alpha_low`` rule looks at ``layer`` (it matches no ``alpha_low_exclude`` regex)."""
        return not any(p.search(layer) for p in self._alpha_low_exclude)

    def confirm_for(self, rule: str) -> int:
        """Consecutive snapshots a condition must hold to fire (and be clear to resolve)."""
        return self.alpha_confirm_snapshots if rule in ("alpha_low", "alpha_high") else 1


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

    def update(self, layers: Sequence[LayerResult], skipped: Iterable[SkippedLayer], step: int, epoch: int) -> list[Alert]:
        """Alerts that start or end with this snapshot, most severe first, raised before resolved."""
        self.snapshots_seen += 1
        skipped = list(skipped)
        self._confirm_phases(layers)
        now: dict[tuple[str, str], tuple[float, float, str, str]] = {}
        for rule, layer, value, threshold, message, detail in self._conditions(layers, skipped):
            if rule in self.config.enabled:
                now[(rule, layer)] = (value, threshold, message, detail)
        for l in layers:  # the reference of the diverging rule follows the layer until it jumps
            if math.isfinite(l.log_spectral_norm) and ("diverging", l.name) not in now:
                self.norm_ref[l.name] = float(l.log_spectral_norm)

        raised: list[Alert] = []
        resolved: list[Alert] = []
        for key, (value, threshold, message, detail) in now.items():
            self.cleared.pop(key, None)
            if key in self.active:
                continue
            self.held[key] = self.held.get(key, 0) + 1
            if self.held[key] >= self.config.confirm_for(key[0]):
                self.held.pop(key)
                alert = Alert(key[0], key[1], value, threshold, step, epoch, message, detail=detail)
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
                    resolved.append(Alert(old.rule, old.layer, math.nan, old.threshold, step, epoch,
                                          f"resolved: {old.rule} on {old.layer}", resolved=True, detail="resolved"))
        order = {r: i for i, r in enumerate(RULES)}
        raised.sort(key=lambda a: order.get(a.rule, len(order)))
        resolved.sort(key=lambda a: order.get(a.rule, len(order)))
        self.num_fired += len(raised)
        return raised + resolved

    def _conditions(self, layers, skipped):
        """``(rule, layer, value, threshold, message, detail)`` of every condition that holds now."""
        c = self.config
        for s in skipped:
            if s.reason.startswith(NON_FINITE_REASON):
                yield ("non_finite", s.name, math.nan, math.nan, _with_docs(
                    f"layer {s.name} has NaN/Inf weights", "non_finite"), "NaN/Inf weights")
        for l in layers:
            ref = self.norm_ref.get(l.name)
            jump = l.log_spectral_norm - ref if ref is not None and math.isfinite(l.log_spectral_norm) else 0.0
            diverging = jump > c.diverging_decades and "diverging" in c.enabled
            if jump > c.diverging_decades:
                detail = f"largest eigenvalue grew {10 ** jump:.3g}x (log10 +{jump:.2f} > {c.diverging_decades:g})"
                yield ("diverging", l.name, jump, c.diverging_decades, _with_docs(
                    f"{l.name} is diverging: its {detail} since before the jump; {RULE_MEANING['diverging']}",
                    "diverging"), detail)
            if diverging:
                continue  # everything else on this layer is a consequence of the explosion
            frac = l.rank_loss / l.num_evals if l.num_evals else 0.0
            collapsed = frac > c.rank_loss_fraction and "rank_collapse" in c.enabled
            if frac > c.rank_loss_fraction:
                detail = (f"{l.rank_loss}/{l.num_evals} eigenvalues are ~0 "
                          f"({format_vs(100 * frac, 100 * c.rank_loss_fraction, 1)}% > {100 * c.rank_loss_fraction:g}%)")
                yield ("rank_collapse", l.name, frac, c.rank_loss_fraction, _with_docs(
                    f"rank collapse in {l.name}: {detail}; {RULE_MEANING['rank_collapse']}", "rank_collapse"), detail)
            is_collapsed_phase = l.phase is not None and Phase(l.phase) == Phase.RANK_COLLAPSE
            alpha_ok = (l.fit_ok and l.reliable and l.num_evals >= c.alpha_min_evals and not collapsed
                        and not is_collapsed_phase)
            if alpha_ok and l.alpha < c.alpha_low and c.alpha_low_applies(l.name):
                detail = f"alpha={format_vs(l.alpha, c.alpha_low)} < {c.alpha_low:g}"
                yield ("alpha_low", l.name, l.alpha, c.alpha_low, _with_docs(
                    f"{detail} in {l.name}: {RULE_MEANING['alpha_low']}", "alpha_low"), detail)
            if alpha_ok and l.alpha > c.alpha_high and self.snapshots_seen > c.alpha_high_warmup:
                detail = f"alpha={format_vs(l.alpha, c.alpha_high)} > {c.alpha_high:g}"
                yield ("alpha_high", l.name, l.alpha, c.alpha_high, _with_docs(
                    f"{detail} in {l.name}: {RULE_MEANING['alpha_high']}", "alpha_high"), detail)
            if l.num_traps is not None and l.num_traps > c.max_traps:
                detail = f"{l.num_traps} correlation trap(s)"
                yield ("correlation_traps", l.name, float(l.num_traps), float(c.max_traps), _with_docs(
                    f"{detail} in {l.name}: {RULE_MEANING['correlation_traps']}", "correlation_traps"), detail)
            best, cur = self.best_phase.get(l.name), self.confirmed_phase.get(l.name)
            if best is None or cur is None or not _regressed(Phase(best), Phase(cur), c.phase_regression_steps):
                continue
            if collapsed and Phase(cur) == Phase.RANK_COLLAPSE:
                continue  # rank_collapse already says it
            yield ("phase_regression", l.name, float(_PHASE_ORDER.get(Phase(cur), -1)),
                   float(_PHASE_ORDER.get(Phase(best), -1)),
                   _with_docs(f"{l.name} regressed from {best} to {cur} (confirmed on "
                              f"{c.phase_confirm_snapshots} consecutive snapshots)", "phase_regression"),
                   f"{best} -> {cur}")

    def state_dict(self) -> dict:
        return {
            "active": [a.to_dict() for a in self.active.values()],
            "best_phase": dict(self.best_phase),
            "confirmed_phase": dict(self.confirmed_phase),
            "phase_run": {k: list(v) for k, v in self.phase_run.items()},
            "held": [[r, l, n] for (r, l), n in self.held.items()],
            "cleared": [[r, l, n] for (r, l), n in self.cleared.items()],
            "norm_ref": dict(self.norm_ref),
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
        self.snapshots_seen = int(state.get("snapshots_seen", 0))
        self.num_fired = int(state.get("num_fired", 0))


def _with_docs(message: str, rule: str) -> str:
    return f"{message} [what to do: {ALERT_DOCS}#{rule}]"


def _regressed(best: Phase, cur: Phase, steps: int) -> bool:
    if cur == Phase.RANK_COLLAPSE:
        return best != Phase.RANK_COLLAPSE
    if best == Phase.RANK_COLLAPSE:
        return False
    return _PHASE_ORDER[best] - _PHASE_ORDER[cur] >= steps


def __getattr__(name: str):
    # Formatting and dispatch live in their own modules (they import this one); kept importable here.
    if name == "alerts_markdown":
        from ..outputs.alert_text import alerts_markdown

        return alerts_markdown
    if name == "dispatch_alerts":
        from .alert_dispatch import dispatch_alerts

        return dispatch_alerts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
