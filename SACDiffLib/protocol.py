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
    """(fraction, message) of a progress line, None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    fraction, _, message = line[len(PROGRESS_PREFIX):].partition(" ")
    try:
        return float(fraction), message
    except ValueError:
        return None


def error_line(command: str, message: str) -> str:
    return f"sacdiff {command}{ERROR_MARK}{message}"


def is_error_line(line: str) -> bool:
    return line.startswith("sacdiff ") and ERROR_MARK in line
