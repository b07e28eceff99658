"""Progress: one callback signature for every long job (training, detection, batches, evaluation), and the two
ways the command line shows it.

    progress(fraction in [0, 1], message) -> bool      returning False asks the job to stop (cancel)

Jobs made of parts hand each part ``part(progress, i, n)``, which maps the part's own 0..1 onto its share.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from .protocol import progress_line

Progress = Callable[[float, str], Optional[bool]]


def keep_going(progress: Optional[Progress], fraction: float, message: str) -> bool:
    """Tell ``progress`` (if there is one) how far the work is; False only when it asked to stop."""
    return progress is None or progress(fraction, message) is not False


def part(progress: Optional[Progress], index: int, count: int, prefix: str = "") -> Optional[Progress]:
    """The callback for part ``index`` of ``count`` equal parts (None when there is nothing to report to)."""
    if progress is None:
        return None
    label = f"{prefix}: " if prefix else ""
    return lambda fraction, message: progress((index + fraction) / count, label + message)


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
