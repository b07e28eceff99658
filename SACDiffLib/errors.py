"""Errors the user can act on. The CLI prints their message on one line and exits with status 2."""


class SACDiffError(ValueError):
    """A bad input or setting; the message names the problem and what to do about it."""


class Cancelled(RuntimeError):
    """Raised inside long work when the caller asked to stop; nothing half-written is left behind."""
