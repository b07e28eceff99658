"""The line protocol between ``sacdiff … --progress lines`` and a front end reading its output (the Slicer module):
one home for both sides.

    SACDIFF_PROGRESS <fraction 0..1> <message>      on stdout, as work advances
    sacdiff <command>: error: <one line>            on stderr, exit status 2, when an input or setting is refused
"""

from __future__ import annotations

from typing import Optional

PROGRESS_PREFIX = "SACDIFF_PROGRESS "
ERROR_MARK = ": error: "


def progress_line(fraction: float, message: str) -> str:
    return f"{PROGRESS_PREFIX}{fraction:.4f} {message}"


def parse_progress(line: str) -> Optional[tuple[float, str]]:
    """(fraction, message) of a progress line, None for any other line — a fraction that is not a finite number
    in 0..1 (nan, inf, 1e9) included, so a front end never computes ``int(round(100 * f))`` of it."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    fraction, _, message = line[len(PROGRESS_PREFIX):].partition(" ")
    try:
        value = float(fraction)
    except ValueError:
        return None
    return (value, message) if 0.0 <= value <= 1.0 else None  # (False for nan)


def error_line(command: str, message: str) -> str:
    return f"sacdiff {command}{ERROR_MARK}{message}"


def is_error_line(line: str) -> bool:
    return line.startswith("sacdiff ") and ERROR_MARK in line
