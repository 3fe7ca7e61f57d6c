"""Exceptions for bad user input; each message names the problem and what to do."""

from __future__ import annotations

__all__ = ["WWMonitorError", "CheckpointError"]


class WWMonitorError(ValueError):
    """A user-facing error (bad argument, unusable input). The CLI prints it without a traceback."""


class CheckpointError(WWMonitorError):
    """A checkpoint that is missing, unreadable, corrupt, of an unknown format, or unsafe to load."""
