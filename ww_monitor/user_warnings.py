"""Warnings that point at the user's code, not at ww_monitor's or Lightning's internals.

``warnings.warn`` prints the file and line of the frame ``stacklevel`` levels up, followed by
that line's source. From inside a Lightning hook a fixed stacklevel lands in Lightning's loop or
in this package (``callback.py:698  self._handle_alerts(...)``), which tells the user nothing.
:func:`warn_user` walks the stack to the first frame outside ww_monitor, Lightning, PyTorch and
the standard library's threading/runpy machinery, i.e. the user's ``trainer.fit(...)`` line,
and warns from there. No global warning state is touched.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

__all__ = ["warn_user", "user_stacklevel"]

# Packages whose frames are never "the user's code".
_INTERNAL_PACKAGES = (
    "ww_monitor",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "torch",
    "transformers",
    "accelerate",
)
_INTERNAL_FILES = ("threading.py", "runpy.py", "contextlib.py", "functools.py")


def _is_internal(filename: str) -> bool:
    parts = os.path.normpath(filename).split(os.sep)
    if parts and parts[-1] in _INTERNAL_FILES:
        return True
    return any(p in _INTERNAL_PACKAGES for p in parts[:-1])


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller of this function point at
    the first frame outside the internal packages (the outermost frame if all are internal)."""
    frame: FrameType | None = sys._getframe(1)  # the caller: stacklevel 1
    level, last = 1, 1
    while frame is not None:
        if not _is_internal(frame.f_code.co_filename):
            return level
        last = level
        frame = frame.f_back
        level += 1
    return last


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's calling line."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
