"""The published balancing recipes as presets of :class:`~ww_monitor.balancing.core.SpectralBalancerCore`
(TempBalance, AlphaDecay), and :func:`build`, which makes a front door's three classes from its glue
(Lightning callback, plain loop, Hugging Face ``TrainerCallback``) and its framework base class."""

from __future__ import annotations

from ..functional.balancing import ALPHADECAY_RANGE, TEMPBALANCE_RANGE
from ..functional.hill import DEFAULT_XMIN_POS
from .core import SpectralBalancerCore
from .estimate import MIN_BALANCE_EVALS

__all__ = ["TempBalanceMixin", "AlphaDecayMixin", "build"]


class TempBalanceMixin(SpectralBalancerCore):
    """TempBalance (Zhou et al., NeurIPS 2023): per-layer learning rates from alpha, every epoch.

    ``lr_i = interp(alpha_i, [min alpha, max alpha], [0.5, 1.5]) x lr_t`` with ``lr_t`` the
    scheduled learning rate, alpha from the Hill estimator with xmin at the median eigenvalue;
    the first and last layer and layers with fewer than 50 eigenvalues keep ``lr_t``. All other
    arguments as :class:`SpectralBalancer`.

    Example::

        trainer = pl.Trainer(max_epochs=100, callbacks=[TempBalance()])
    """

    def __init__(
        self,
        mapping: str = "linear",
        factor_range: tuple[float, float] = TEMPBALANCE_RANGE,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        at_train_start: bool = True,
        estimator: str = "hill_median",
        xmin_pos: float = DEFAULT_XMIN_POS,
        min_evals: int = MIN_BALANCE_EVALS,
        exclude_first_last: bool = True,
        follow_norms: bool = True,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        kinds: list[str] | None = None,
        use_monitor: bool = True,
        log_factors: bool = True,
    ) -> None:
        super().__init__(
            scale="lr",
            mapping=mapping,
            factor_range=factor_range,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            at_train_start=at_train_start,
            estimator=estimator,
            xmin_pos=xmin_pos,
            min_evals=min_evals,
            exclude_first_last=exclude_first_last,
            follow_norms=follow_norms,
            include=include,
            exclude=exclude,
            kinds=kinds,
            use_monitor=use_monitor,
            log_factors=log_factors,
        )


class AlphaDecayMixin(SpectralBalancerCore):
    """AlphaDecay (He et al., NeurIPS 2025): per-module weight decay from alpha, every 500 steps.

    ``wd_i = interp(alpha_i, [min alpha, max alpha], [0.666, 3]) x wd``: heavy-tailed modules
    (small alpha) get less decay, light-tailed ones more. Hill estimator with xmin at the median;
    the first and last module and modules with fewer than 50 eigenvalues keep ``wd``. The
    optimizer must have a ``weight_decay`` setting (decoupled in AdamW, as in the paper). All
    other arguments as :class:`SpectralBalancer`.
    """

    def __init__(
        self,
        mapping: str = "linear",
        factor_range: tuple[float, float] = ALPHADECAY_RANGE,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = 500,
        at_train_start: bool = True,
        estimator: str = "hill_median",
        xmin_pos: float = DEFAULT_XMIN_POS,
        min_evals: int = MIN_BALANCE_EVALS,
        exclude_first_last: bool = True,
        follow_norms: bool = True,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        kinds: list[str] | None = None,
        use_monitor: bool = True,
        log_factors: bool = True,
    ) -> None:
        super().__init__(
            scale="weight_decay",
            mapping=mapping,
            factor_range=factor_range,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            at_train_start=at_train_start,
            estimator=estimator,
            xmin_pos=xmin_pos,
            min_evals=min_evals,
            exclude_first_last=exclude_first_last,
            follow_norms=follow_norms,
            include=include,
            exclude=exclude,
            kinds=kinds,
            use_monitor=use_monitor,
            log_factors=log_factors,
        )


_PRESETS = {"TempBalance": TempBalanceMixin, "AlphaDecay": AlphaDecayMixin}


def build(base: type | None, module: str, glue: type | None = None) -> dict[str, type]:
    """``SpectralBalancer``, ``TempBalance`` and ``AlphaDecay`` for one front door: its ``glue`` (a
    subclass of the core translating the framework's events; default: the Lightning callback's)
    on its framework ``base`` class (a Lightning package's ``Callback``, ``TrainerCallback``, or
    None)."""
    if glue is None:
        from .callback import SpectralBalancerMixin

        glue = SpectralBalancerMixin
    tail: tuple[type, ...] = (glue,) if base is None else (glue, base)
    usage = "\n\n    " + (glue.__doc__ or "").strip()
    out = {}
    for name, preset in (("SpectralBalancer", None), *tuple(_PRESETS.items())):
        doc = ((preset.__doc__ if preset is not None else SpectralBalancerCore.__doc__) or "").rstrip() + usage
        own: tuple[type, ...] = (preset,) if preset is not None else ()
        cls = type(name, own + tail, {"__doc__": doc, "__module__": module})
        cls.__qualname__ = name
        out[name] = cls
    return out
