"""Argument checks for the public constructors: each failure is a :class:`WWMonitorError` that
names the argument, says what it must be and shows what it got (``floor='2'``, ``floor=nan``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from .errors import WWMonitorError

__all__ = [
    "check_int",
    "check_number",
    "check_bool",
    "check_seconds",
    "check_names",
    "check_keywords",
    "keyword_parameters",
    "CheckedKeywords",
]


def _fail(owner: str, name: str, must: str, value) -> WWMonitorError:
    prefix = f"{owner}: " if owner else ""
    return WWMonitorError(f"{prefix}`{name}` must be {must}, got {value!r} ({type(value).__name__}).")


def check_int(name: str, value, minimum: int, allow_none: bool = False, owner: str = "") -> None:
    """An int (not a bool) >= ``minimum``, or None when allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _fail(owner, name, f"{'None or ' if allow_none else ''}an int >= {minimum}", value)


def check_number(
    name: str,
    value,
    *,
    allow_none: bool = False,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    owner: str = "",
) -> None:
    """A finite real number (not a bool or a string) within the given bounds, or None when allowed."""
    if value is None and allow_none:
        return
    bounds = [
        f"> {above:g}" if above is not None else "",
        f">= {at_least:g}" if at_least is not None else "",
        f"<= {at_most:g}" if at_most is not None else "",
    ]
    must = ("None or " if allow_none else "") + "a finite number" + "".join(f" {b}" for b in bounds if b)
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and (
        (above is not None and not value > above)
        or (at_least is not None and not value >= at_least)
        or (at_most is not None and not value <= at_most)
    ):
        ok = False
    if not ok:
        raise _fail(owner, name, must, value)


def check_bool(name: str, value, owner: str = "") -> None:
    if not isinstance(value, bool):
        raise _fail(owner, name, "True or False", value)


def check_seconds(name: str, value, allow_zero: bool, owner: str = "") -> None:
    """A finite number of seconds, > 0 (or >= 0 when ``allow_zero``)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (float(value) >= 0 if allow_zero else float(value) > 0)
    )
    if not ok:
        raise _fail(owner, name, f"a {'non-negative' if allow_zero else 'positive'} number of seconds", value)


def check_fraction(name: str, value, owner: str = "") -> None:
    """A share in (0, 1], or None (off)."""
    ok = value is None or (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and 0 < float(value) <= 1
    )
    if not ok:
        raise _fail(owner, name, "a share in (0, 1] or None", value)


def check_names(name: str, value, allowed: Iterable[str], what: str = "name", owner: str = "") -> tuple[str, ...]:
    """A name or an iterable of names, each one of ``allowed``; returned as a tuple."""
    allowed = tuple(allowed)
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        raise _fail(owner, name, f"a {what} or a list of them from {list(allowed)}", value) from None
    bad = [v for v in items if not isinstance(v, str) or v not in allowed]
    if bad:
        prefix = f"{owner}: " if owner else ""
        raise WWMonitorError(f"{prefix}`{name}` has unknown {what}(s) {bad}; choose from {list(allowed)}.")
    return items


def check_keywords(
    owner: str, given: Iterable[str], valid: Iterable[str], instead: dict | None = None, suggest: dict | None = None
) -> None:
    """Every name in ``given`` is one of ``valid``; else a :class:`WWMonitorError` that names the
    front door (``owner``), the unknown argument and the closest valid name (``difflib``, or
    ``suggest[name]``: what a sibling front door's argument is called here), or the argument to
    use ``instead`` (``{name: replacement or None}``) for names known not to apply."""
    import difflib

    valid = sorted(set(valid))
    instead = instead or {}
    for name in given:
        if name in valid:
            continue
        if name in instead:
            use = instead[name]
            raise WWMonitorError(f"{owner}: `{name}` is not an argument here" + (f"; use `{use}`." if use else "."))
        close = [suggest[name]] if suggest and name in suggest else difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"valid arguments: {', '.join(valid)}."
        raise WWMonitorError(f"{owner}: unknown argument `{name}`; {hint}")


def keyword_parameters(fn) -> tuple[list[str], list[str], bool]:
    """(positional-or-keyword names, keyword names, takes ``**kwargs``) of ``fn``, without ``self``."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())[1:]
    kinds = inspect.Parameter
    positional = [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    keywords = [p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    return positional, keywords, any(p.kind is kinds.VAR_KEYWORD for p in params)


class CheckedKeywords:
    """Base of the public front doors: a misspelt or inapplicable keyword is a
    :class:`WWMonitorError` naming the front door (``warning_prefix``) and the closest valid name,
    not a ``TypeError`` about an internal base class's ``__init__``.

    The check runs in ``__new__``, before Python binds the arguments to ``__init__``, so
    ``__init__`` keeps its typed signature (LightningCLI and ``help()`` read it). Valid names are
    those of ``__init__``; where it takes ``**options``, also those of ``_options_signature``
    (the function the options are passed on to) except the keys of ``_not_here``
    (``{name: what to use instead, or None}``).
    """

    warning_prefix = ""
    _options_signature: ClassVar[Callable[..., Any] | None] = None
    _not_here: ClassVar[Mapping[str, str | None]] = {}

    def __new__(cls, *args, **kwargs):
        positional, valid, takes_options = keyword_parameters(cls.__init__)
        owner = cls.warning_prefix or cls.__name__
        if len(args) > len(positional):
            raise WWMonitorError(
                f"{owner}: takes at most {len(positional)} positional argument(s) "
                f"({', '.join(positional)}), got {len(args)}; pass the others by name."
            )
        if takes_options and cls._options_signature is not None:
            valid = valid + [n for n in keyword_parameters(cls._options_signature)[1] if n not in cls._not_here]
        check_keywords(owner, kwargs, valid, cls._not_here)
        return super().__new__(cls)
