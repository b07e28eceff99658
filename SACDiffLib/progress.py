"""Progress: one callback signature for every long job (training, detection, batches, evaluation), and the two
ways the command line shows it.

    progress(fraction in [0, 1], message) -> bool      returning False asks the job to stop (cancel)

Jobs made of parts hand each part ``part(progress, i, n)``, which maps the part's own 0..1 onto its share.

Notes to the user (a step begun, a case skipped, a fallback taken) leave by one logger, ``log`` ("sacdiff"); the
command line decides where they show (``show_notes``), the Slicer module's child process forwards its stderr.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

from .protocol import progress_line

Progress = Callable[[float, str], Optional[bool]]

log = logging.getLogger("sacdiff")


class _CurrentStream(logging.StreamHandler):
    """A handler that writes to ``sys.stdout`` / ``sys.stderr`` as they are when a note is emitted (a redirect,
    pytest's capture), as bare lines."""

    def __init__(self, stream_name: str):
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)


@contextmanager
def quiet_notes():
    """Within: no notes (a job that reports its own steps runs inner jobs that would report theirs)."""
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was


def show_notes(stream_name: str = "stderr") -> None:
    """Show the notes (INFO and above) as bare lines on sys.stdout or sys.stderr; called by the command line once
    per command (a second call replaces the first one's handler)."""
    for handler in [h for h in log.handlers if isinstance(h, _CurrentStream)]:
        log.removeHandler(handler)
    log.addHandler(_CurrentStream(stream_name))
    log.setLevel(logging.INFO)
    log.propagate = False


def keep_going(progress: Optional[Progress], fraction: float, message: str) -> bool:
    """Tell ``progress`` (if there is one) how far the work is; False only when it asked to stop."""
    return progress is None or progress(fraction, message) is not False


def part(progress: Optional[Progress], index: int, count: int, prefix: str = "") -> Optional[Progress]:
    """The callback for part ``index`` of ``count`` equal parts (None when there is nothing to report to)."""
    return share(progress, index / count, (index + 1) / count, prefix)


def share(progress: Optional[Progress], start: float, stop: float, prefix: str = "") -> Optional[Progress]:
    """The callback for a part that spans ``start``..``stop`` of the whole (None when there is nothing to report
    to): its own 0..1 mapped onto that span, its messages after ``prefix``."""
    if progress is None:
        return None
    label = f"{prefix}: " if prefix else ""
    return lambda fraction, message: progress(start + fraction * (stop - start), label + message)


class ProgressLines:
    """Machine-readable progress for front ends (the Slicer module): one flushed stdout line per update
    (``protocol.progress_line``), at most every 0.2 s."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, fraction: float, message: str = "") -> bool:
        now = time.monotonic()
        if now - self.last >= 0.2 or fraction >= 1.0:
            self.last = now
            print(progress_line(fraction, message), flush=True)
        return True

    def close(self):
        pass


class ProgressBar:
    """A tqdm bar over the fraction done, shown from the first update on, so that input errors found before the
    work starts stay one line."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, fraction: float, message: str = "") -> bool:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=self.desc, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        self.bar.n = int(round(fraction * 1000))
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()
        return True

    def close(self):
        if self.bar is not None:
            self.bar.close()


def for_terminal(style: str, desc: str):
    """``--progress bar`` (people) or ``lines`` (front ends)."""
    return ProgressLines() if style == "lines" else ProgressBar(desc)
