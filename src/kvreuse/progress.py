"""Progress of long commands on stderr: a tqdm bar on a terminal, plain lines elsewhere.

tqdm writes a carriage-return bar even into a log file or pipe, one redraw per update; there
a line per ~10% of the work reads better and does not flood the log.
"""

from __future__ import annotations

import sys
import time


def progress(total: int, unit: str, desc: str | None = None, initial: int = 0):
    """A bar-like object (update, set_postfix_str, close) counting `total` `unit`s, `initial` done."""
    if not sys.stderr.isatty():
        return LineProgress(total, unit, desc, initial)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


class LineProgress:
    """Progress for a non-terminal stderr: one plain line per ~10% of the work."""

    def __init__(self, total: int, unit: str, desc: str | None = None, initial: int = 0):
        self.total, self.unit, self.label = total, unit, desc or "progress"
        self.done, self.t0 = initial, time.perf_counter()
        self.tenths = 10 * initial // max(total, 1)

    def update(self, n: int = 1) -> None:
        self.done += n
        tenths = 10 * self.done // max(self.total, 1)
        if tenths > self.tenths:
            self.tenths = tenths
            print(f"{self.label}: {self.done}/{self.total} {self.unit}, {time.perf_counter() - self.t0:.0f} s",
                  file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass
