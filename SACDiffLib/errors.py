"""Errors the user can act on. The CLI prints their message on one line and exits with status 2."""

from __future__ import annotations


class SACDiffError(ValueError):
    """A bad input or setting; the message names the problem and what to do about it."""


class Cancelled(RuntimeError):
    """Raised inside long work when the caller asked to stop; nothing half-written is left behind. ``kept`` says
    what finished work was kept (a batch keeps each finished scan's run), None when nothing was."""

    def __init__(self, message: str = "cancelled", kept: str | None = None):
        super().__init__(message)
        self.kept = kept
