"""Alert rules on snapshot results, with deduplication.

An alert fires when a layer *enters* a bad state and a resolved notice when it leaves; nothing
is repeated while a layer stays put. The rules are pure: :class:`AlertTracker` turns a snapshot
(layer results + skipped layers) into :class:`Alert` objects; the callback carries out actions.

Default thresholds and why:

* ``alpha_low = 2.0`` and ``alpha_high = 4.0``: 80-90% of layers of well-trained production
  models have alpha in [2, 4] (Martin & Mahoney, JMLR 2021); alpha < 2 signals over-training
  (very heavy tails), alpha > 4 little learned correlation.
* ``alpha_high_warmup = 5`` snapshots: every layer starts random-like with a large alpha, so the
  high-alpha rule only speaks once training had time to move the spectrum.
* ``alpha_min_evals = 50``: the alpha rules ignore layers with fewer eigenvalues (a 10-class
  head has 10): a power-law fit on a handful of points swings by several units between
  snapshots, and an alert on it would be noise.
* ``rank_loss_fraction = 0.1``: a tenth of a layer's directions below the precision-aware rank
  tolerance is far beyond what healthy layers show (they lose none) yet well before collapse.
* ``phase_regression_steps = 2``: a layer at least two phases behind the furthest phase it has
  reached (e.g. heavy-tailed -> bulk+spikes), or in rank-collapse after having been in another
  phase; one-step jitter between neighbouring phases is normal. Active while the layer stays
  there, so it fires once.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .phases import Phase
from .results import LayerResult, SkippedLayer

__all__ = [
    "Alert", "AlertConfig", "AlertTracker", "AlertError", "WWMonitorAlert", "dispatch_alerts",
    "RULES", "ACTIONS", "NON_FINITE_REASON",
]

log = logging.getLogger(__name__)


class WWMonitorAlert(UserWarning):
    """Warning category of alerts, so users can filter them: ``warnings.simplefilter("error", WWMonitorAlert)``."""


class AlertError(RuntimeError):
    """Raised by the ``"raise"`` action; carries the :class:`Alert`."""

    def __init__(self, alert: "Alert"):
        super().__init__(alert.message)
        self.alert = alert

RULES = ("rank_collapse", "alpha_low", "alpha_high", "non_finite", "phase_regression", "correlation_traps")
ACTIONS = ("log", "warn", "tensorboard", "callback", "raise", "stop")
# "log" is opt-in: with "warn" on too, an unconfigured logging setup would print each alert twice.
DEFAULT_ACTIONS = ("warn", "tensorboard", "callback")
NON_FINITE_REASON = "non-finite weights"

# Position of each phase along training (rank-collapse is the "+1", handled separately).
_PHASE_ORDER = {
    Phase.RANDOM_LIKE: 0, Phase.BLEEDING_OUT: 1, Phase.BULK_PLUS_SPIKES: 2,
    Phase.BULK_DECAY: 3, Phase.HEAVY_TAILED: 4,
}


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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds, enabled rules and per-rule actions. Validated on creation."""

    alpha_low: float = 2.0
    alpha_high: float = 4.0
    alpha_high_warmup: int = 5
    alpha_min_evals: int = 50
    rank_loss_fraction: float = 0.1
    phase_regression_steps: int = 2
    max_traps: int = 0
    enabled: tuple[str, ...] = RULES
    actions: dict = field(default_factory=dict)  # rule -> tuple of actions; missing: DEFAULT_ACTIONS

    def __post_init__(self):
        if not self.alpha_low < self.alpha_high:
            raise ValueError(f"alpha_low ({self.alpha_low}) must be below alpha_high ({self.alpha_high})")
        if not 0 < self.rank_loss_fraction <= 1:
            raise ValueError(f"rank_loss_fraction must be in (0, 1], got {self.rank_loss_fraction}")
        if self.alpha_min_evals < 0 or self.alpha_high_warmup < 0 or self.phase_regression_steps < 1 or self.max_traps < 0:
            raise ValueError("alpha_high_warmup and max_traps must be >= 0, phase_regression_steps >= 1")
        enabled = tuple(self.enabled)
        unknown = [r for r in enabled if r not in RULES] + [r for r in self.actions if r not in RULES]
        if unknown:
            raise ValueError(f"unknown alert rule(s) {unknown}; rules are {list(RULES)}")
        for rule, acts in self.actions.items():
            bad = [a for a in acts if a not in ACTIONS]
            if bad:
                raise ValueError(f"unknown action(s) {bad} for rule {rule!r}; actions are {list(ACTIONS)}")
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "actions", {r: tuple(a) for r, a in self.actions.items()})

    def actions_for(self, rule: str) -> tuple[str, ...]:
        return self.actions.get(rule, DEFAULT_ACTIONS)


class AlertTracker:
    """Evaluates the rules snapshot after snapshot and remembers which conditions are active."""

    def __init__(self, config: AlertConfig | None = None):
        self.config = config or AlertConfig()
        self.active: dict[tuple[str, str], Alert] = {}
        self.best_phase: dict[str, str] = {}  # furthest phase each layer has reached
        self.snapshots_seen = 0
        self.num_fired = 0

    def update(self, layers: Sequence[LayerResult], skipped: Iterable[SkippedLayer], step: int, epoch: int) -> list[Alert]:
        """Alerts that start or end with this snapshot."""
        self.snapshots_seen += 1
        now: dict[tuple[str, str], tuple[float, float, str]] = {}
        for cond in self._conditions(layers, skipped):
            rule, layer, value, threshold, message = cond
            if rule in self.config.enabled:
                now[(rule, layer)] = (value, threshold, message)
        for layer in layers:
            if layer.phase is None:
                continue
            cur, best = Phase(layer.phase), self.best_phase.get(layer.name)
            if best is None or _PHASE_ORDER.get(cur, -1) > _PHASE_ORDER.get(Phase(best), -1):
                self.best_phase[layer.name] = cur.value

        out: list[Alert] = []
        for key, (value, threshold, message) in now.items():
            if key not in self.active:
                alert = Alert(key[0], key[1], value, threshold, step, epoch, message)
                self.active[key] = alert
                out.append(alert)
        seen = {l.name for l in layers} | {s.name for s in skipped}
        for key in list(self.active):
            # A condition ends when the layer was analysed again and no longer meets it.
            if key not in now and key[1] in seen:
                old = self.active.pop(key)
                out.append(Alert(old.rule, old.layer, math.nan, old.threshold, step, epoch,
                                 f"resolved: {old.rule} on {old.layer}", resolved=True))
        self.num_fired += sum(not a.resolved for a in out)
        return out

    def _conditions(self, layers, skipped):
        c = self.config
        for s in skipped:
            if s.reason.startswith(NON_FINITE_REASON):
                yield ("non_finite", s.name, math.nan, math.nan, f"layer {s.name} has NaN/Inf weights")
        for l in layers:
            frac = l.rank_loss / l.num_evals if l.num_evals else 0.0
            if frac > c.rank_loss_fraction:
                yield ("rank_collapse", l.name, frac, c.rank_loss_fraction,
                       f"rank collapse in {l.name}: {l.rank_loss}/{l.num_evals} eigenvalues are ~0 "
                       f"({frac:.0%} > {c.rank_loss_fraction:.0%}); too much regularization?")
            alpha_ok = l.fit_ok and l.num_evals >= c.alpha_min_evals
            if alpha_ok and l.alpha < c.alpha_low:
                yield ("alpha_low", l.name, l.alpha, c.alpha_low,
                       f"alpha={l.alpha:.2f} < {c.alpha_low} in {l.name}: very heavy-tailed, possibly over-trained")
            if alpha_ok and l.alpha > c.alpha_high and self.snapshots_seen > c.alpha_high_warmup:
                yield ("alpha_high", l.name, l.alpha, c.alpha_high,
                       f"alpha={l.alpha:.2f} > {c.alpha_high} in {l.name}: little correlation learned (under-trained?)")
            if l.num_traps is not None and l.num_traps > c.max_traps:
                yield ("correlation_traps", l.name, float(l.num_traps), float(c.max_traps),
                       f"{l.num_traps} correlation trap(s) in {l.name}: a few huge weights dominate the spectrum")
            best = self.best_phase.get(l.name)
            if best is not None and l.phase is not None and _regressed(Phase(best), Phase(l.phase), c.phase_regression_steps):
                yield ("phase_regression", l.name, float(_PHASE_ORDER.get(Phase(l.phase), -1)),
                       float(_PHASE_ORDER.get(Phase(best), -1)),
                       f"{l.name} regressed from {best} to {Phase(l.phase).value}")

    def state_dict(self) -> dict:
        return {
            "active": [a.to_dict() for a in self.active.values()],
            "best_phase": dict(self.best_phase),
            "snapshots_seen": self.snapshots_seen,
            "num_fired": self.num_fired,
        }

    def load_state_dict(self, state: dict) -> None:
        self.active = {(a["rule"], a["layer"]): Alert(**a) for a in state.get("active", [])}
        self.best_phase = dict(state.get("best_phase", {}))
        self.snapshots_seen = int(state.get("snapshots_seen", 0))
        self.num_fired = int(state.get("num_fired", 0))


def _regressed(best: Phase, cur: Phase, steps: int) -> bool:
    if cur == Phase.RANK_COLLAPSE:
        return best != Phase.RANK_COLLAPSE
    if best == Phase.RANK_COLLAPSE:
        return False
    return _PHASE_ORDER[best] - _PHASE_ORDER[cur] >= steps


def dispatch_alerts(alerts: Sequence[Alert], config: AlertConfig, *, tensorboard_writers=(), on_alert=None,
                    rank: int = 0) -> bool:
    """Carry out each alert's actions. Returns True when one asks to stop training.

    Every rank computes the same alerts from the same gathered results, so ``raise`` and
    ``stop`` act on every rank alike; messages, warnings and TensorBoard text come from rank 0
    only. ``tensorboard_writers`` are SummaryWriter-like objects (``add_text``).
    """
    stop = False
    to_raise: Alert | None = None
    for alert in alerts:
        actions = config.actions_for(alert.rule)
        text = alert.message if not alert.resolved else f"resolved: {alert.rule} on {alert.layer}"
        if rank == 0:
            if "log" in actions:
                log.log(logging.INFO if alert.resolved else logging.WARNING, "ww_monitor alert (step %d): %s",
                        alert.step, text)
            if "warn" in actions and not alert.resolved:
                warnings.warn(f"ww_monitor alert at step {alert.step}: {text}", WWMonitorAlert, stacklevel=3)
            if "tensorboard" in actions:
                for writer in tensorboard_writers:
                    try:
                        writer.add_text("ww/alerts", f"**{alert.rule}** `{alert.layer}`: {text}", alert.step)
                    except Exception as err:  # a closed writer must not end training
                        log.warning("ww_monitor: could not write alert to TensorBoard: %s", err)
            if "callback" in actions and on_alert is not None:
                try:
                    on_alert(alert)
                except Exception as err:
                    warnings.warn(f"ww_monitor: on_alert callback raised {type(err).__name__}: {err}",
                                  RuntimeWarning, stacklevel=3)
        if alert.resolved:
            continue
        if "stop" in actions:
            stop = True
        if "raise" in actions and to_raise is None:
            to_raise = alert
    if to_raise is not None:
        raise AlertError(to_raise)
    return stop
