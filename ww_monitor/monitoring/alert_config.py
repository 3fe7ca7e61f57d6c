"""What the alert rules look for: :class:`AlertConfig`, the rule names and the default thresholds.

Default thresholds and why (measured on ``benchmarks/bench_evidence.py``: 41 healthy and 42
failing real training runs, ``docs/evidence.md``; ``benchmarks/bench_signals.py``; and the LLaMA
copy task of ``examples/transformer_copy_task.py``):

* ``alpha_low = 2.0``: 80-90% of layers of well-trained production models have alpha in [2, 4]
  (Martin & Mahoney, JMLR 2021); alpha < 2 signals over-training (very heavy tails).
* ``alpha_high = 6.0``: above 6 a layer's spectrum is close to random (little learned
  correlation). Not 4, the upper edge of that band: layers at 4-6 are common in small,
  well-trained transformers.
* ``alpha_low_sigmas = 2.0`` (:data:`ALPHA_LOW_SIGMAS`): a layer counts for ``alpha_low`` only
  when alpha is below 2 by more than two standard errors of the fit, alpha + 2 sigma < 2, with
  sigma = (alpha - 1) / sqrt(n_tail) the standard error of the power-law maximum-likelihood
  estimate (Clauset, Shalizi & Newman 2009): the conventional one-sided margin (noise alone
  crosses it in ~2% of tests). The rule tests every layer at every snapshot, so a few layers
  still cross it by chance; the share condition below keeps those from being a finding. On a
  64-128-eigenvalue layer with 20-80 tail points sigma is 0.1-0.2: a fitted 1.9 is not "below 2".
* ``alpha_high_sigmas = 0.0`` (:data:`ALPHA_HIGH_SIGMAS`): no per-layer margin for
  ``alpha_high``: thin tails leave few points to fit (10-20 at alpha > 6 on these layers, sigma
  1.5-2.5), so a 2-sigma margin would silence the rule on any layer smaller than a few thousand
  rows; the evidence comes from the majority condition below instead.
* ``alpha_low_min_share = 0.2`` (:data:`ALPHA_LOW_MIN_SHARE`): ``alpha_low`` fires only when
  more than 20% of the layers it reads count: even well-trained production models have 10-20% of
  their layers outside [2, 4] (the statistic above), so a few very heavy-tailed layers are not
  yet a finding about the model. In a model of 2-4 reliable layers one layer is already more.
* ``alpha_high_min_share = 0.5`` (:data:`ALPHA_HIGH_MIN_SHARE`): ``alpha_high`` fires only when
  more than half of the layers it reads are above 6: single random-like layers are common in
  models that work (unused capacity; small learning rates that move large random
  initialisations little: width-96 transformers at 99-100% validation accuracy had up to 41% of
  their layers above 6), while a model that learned little has most of them there.
* ``alpha_high_warmup = 5`` snapshots: every layer starts random-like with a large alpha, so the
  high-alpha rule only speaks once training had time to move the spectrum.
* ``alpha_min_evals = 50``: the alpha rules ignore layers with fewer eigenvalues, and layers
  whose fit is not reliable (:mod:`ww_monitor.analysis.reliability`): a power-law fit on a
  handful of points swings by several units between snapshots, and an alert on it would be noise.
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
  decades in one snapshot. Fires at once and stays until lambda_max is back within the factor
  of that reference.
* ``shrinking_decades = 3.0`` (:data:`SHRINKING_DECADES`): the mirror image: lambda_max fell
  more than 1000x below the largest value the layer had (its spectral norm shrank ~32x): the
  whole layer is decaying to zero, as under excessive weight decay. The alpha and phase fits are
  scale-free, so they cannot see a layer that shrinks as a whole, and once its eigenvalues fall
  below the power-law fit's floor the fits fail. No healthy run of the benchmarks falls more
  than 0.2 decades below its peak; the weight-decay failures of ``bench_evidence.py`` fall 8-12.
  Fires at once; resolves when lambda_max is back within the factor of the peak.

The behaviour before the band conditions (any single reliable layer outside [2, 6]):
``AlertConfig(alpha_low_sigmas=0, alpha_low_min_share=0, alpha_high_min_share=0)``; without the
shrinking rule: leave ``"shrinking"`` out of ``enabled``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "AlertConfig",
    "RULES",
    "ACTIONS",
    "DEFAULT_ACTIONS",
    "ALPHA_LOW_EXCLUDE",
    "ALPHA_LOW_SIGMAS",
    "ALPHA_HIGH_SIGMAS",
    "ALPHA_LOW_MIN_SHARE",
    "ALPHA_HIGH_MIN_SHARE",
    "SHRINKING_DECADES",
    "BAND_RULES",
]

# Ordered by severity: alerts of one snapshot are reported in this order.
RULES = (
    "non_finite",
    "diverging",
    "shrinking",
    "rank_collapse",
    "phase_regression",
    "alpha_low",
    "alpha_high",
    "correlation_traps",
)
#: The two rules on the alpha band, which read the model as well as the layer.
BAND_RULES = ("alpha_low", "alpha_high")
ACTIONS = ("log", "warn", "tensorboard", "callback", "raise", "stop")
# "log" is opt-in: with "warn" on too, an unconfigured logging setup would print each alert twice.
DEFAULT_ACTIONS = ("warn", "tensorboard", "callback")
#: Layers the ``alpha_low`` rule skips by default: attention query/key projections, by the last part
#: of the name (LLaMA/Mistral/OPT ``q_proj``/``k_proj``, BERT ``query``/``key``, T5 ``q``/``k``,
#: DistilBERT ``q_lin``/``k_lin``, Meta LLaMA ``wq``/``wk``, diffusers ``to_q``/``to_k``). On the
#: LLaMA copy task (``benchmarks/bench_transformer_alerts.py``) their alpha is below 2 alike in runs
#: that generalise and runs that only memorise, so there it says nothing about over-training
#: (docs/alerts.md#alpha_low has the numbers). Fused q/k/v matrices are not skipped.
ALPHA_LOW_EXCLUDE = (r"(^|\.)(q_proj|k_proj|query|key|q|k|q_lin|k_lin|wq|wk|to_q|to_k)$",)
#: Standard errors of the fit by which alpha must be below ``alpha_low`` (module docstring).
ALPHA_LOW_SIGMAS = 2.0
#: Standard errors of the fit by which alpha must be above ``alpha_high`` (module docstring: none).
ALPHA_HIGH_SIGMAS = 0.0
#: ``alpha_low`` fires when more than this share of the layers it reads count (module docstring).
ALPHA_LOW_MIN_SHARE = 0.2
#: ``alpha_high`` fires when more than this share of the layers it reads count (module docstring).
ALPHA_HIGH_MIN_SHARE = 0.5
#: Decades (log10) by which lambda_max must fall below its peak for ``shrinking`` (module docstring).
SHRINKING_DECADES = 3.0


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds, enabled rules and per-rule actions. Validated on creation.

    Example: the band rules as they were before the model-level conditions, and ``alpha_low``
    raising instead of warning::

        AlertConfig(alpha_low_sigmas=0, alpha_low_min_share=0, alpha_high_min_share=0,
                    actions={"alpha_low": ("raise",)})
    """

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
    shrinking_decades: float = SHRINKING_DECADES
    alpha_low_sigmas: float = ALPHA_LOW_SIGMAS
    alpha_high_sigmas: float = ALPHA_HIGH_SIGMAS
    alpha_low_min_share: float = ALPHA_LOW_MIN_SHARE
    alpha_high_min_share: float = ALPHA_HIGH_MIN_SHARE

    def __post_init__(self) -> None:
        from collections.abc import Mapping

        from ..errors import WWMonitorError
        from ..validation import check_int, check_names, check_number

        owner = "AlertConfig"
        check_number("alpha_low", self.alpha_low, owner=owner)
        check_number("alpha_high", self.alpha_high, owner=owner)
        if not self.alpha_low < self.alpha_high:
            raise WWMonitorError(
                f"{owner}: `alpha_low` ({self.alpha_low}) must be below `alpha_high` ({self.alpha_high})."
            )
        check_number("rank_loss_fraction", self.rank_loss_fraction, above=0.0, at_most=1.0, owner=owner)
        check_int("alpha_high_warmup", self.alpha_high_warmup, 0, owner=owner)
        check_int("alpha_min_evals", self.alpha_min_evals, 0, owner=owner)
        check_int("phase_regression_steps", self.phase_regression_steps, 1, owner=owner)
        check_int("max_traps", self.max_traps, 0, owner=owner)
        enabled = check_names("enabled", self.enabled, RULES, "alert rule", owner=owner)
        if not isinstance(self.actions, Mapping):
            raise WWMonitorError(f"{owner}: `actions` must be a dict of rule -> actions, got {self.actions!r}.")
        check_names("actions", tuple(self.actions), RULES, "alert rule", owner=owner)
        actions = {
            r: check_names(f"actions[{r!r}]", a, ACTIONS, "action", owner=owner) for r, a in self.actions.items()
        }
        check_int("alpha_confirm_snapshots", self.alpha_confirm_snapshots, 1, owner=owner)
        check_int("phase_confirm_snapshots", self.phase_confirm_snapshots, 1, owner=owner)
        check_number("diverging_decades", self.diverging_decades, above=0.0, owner=owner)
        check_number("shrinking_decades", self.shrinking_decades, above=0.0, owner=owner)
        for name in ("alpha_low_sigmas", "alpha_high_sigmas"):
            check_number(name, getattr(self, name), at_least=0.0, owner=owner)
        for name in ("alpha_low_min_share", "alpha_high_min_share"):
            share = getattr(self, name)
            check_number(name, share, at_least=0.0, owner=owner)
            if not share < 1.0:  # "more than 100% of the layers" can never hold
                raise WWMonitorError(f"{owner}: `{name}` must be a share in [0, 1), got {share!r}.")
        exclude = (self.alpha_low_exclude,) if isinstance(self.alpha_low_exclude, str) else self.alpha_low_exclude
        try:
            exclude = tuple(exclude)
            compiled = tuple(re.compile(p) for p in exclude)
        except (TypeError, re.error) as err:
            raise WWMonitorError(
                f"{owner}: `alpha_low_exclude` must be a regex or a sequence of regexes ({err})."
            ) from None
        object.__setattr__(self, "alpha_low_exclude", exclude)
        object.__setattr__(self, "_alpha_low_exclude", compiled)
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "actions", actions)

    def actions_for(self, rule: str) -> tuple[str, ...]:
        return self.actions.get(rule, DEFAULT_ACTIONS)

    def alpha_low_applies(self, layer: str) -> bool:
        """The ``alpha_low`` rule looks at ``layer`` (it matches no ``alpha_low_exclude`` regex)."""
        # Set in __post_init__ (compiled, not a dataclass field, so it stays out of repr/eq/state).
        return not any(p.search(layer) for p in self._alpha_low_exclude)  # type: ignore[attr-defined]

    def confirm_for(self, rule: str) -> int:
        """Consecutive snapshots a condition must hold to fire (and be clear to resolve)."""
        return self.alpha_confirm_snapshots if rule in BAND_RULES else 1

    def band(self, rule: str) -> tuple[float, float]:
        """``(sigmas, min_share)`` of a band rule: the per-layer margin in standard errors of the
        fit and the share of the layers it reads that must count for it to fire."""
        if rule == "alpha_low":
            return self.alpha_low_sigmas, self.alpha_low_min_share
        return self.alpha_high_sigmas, self.alpha_high_min_share
