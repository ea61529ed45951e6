"""Progress display: tqdm bars on a terminal, one plain line per interval otherwise (Colab logs, CI)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def use_bars(mode: str) -> bool:
    """Whether 'auto' | 'bar' | 'lines' means tqdm bars here."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


class LineProgress:
    """A tqdm-like counter that prints 'desc: n/total (rate unit/s) postfix' every `interval` seconds."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, interval: float = 10.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.start, self.start_n = interval, time.monotonic(), initial
        self.last_print, self.postfix = self.start, ""  # no line (and no rate) for the very first item

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, count: int = 1) -> None:
        if count <= 0:
            return
        finished = self.n >= self.total
        self.n += count
        now = time.monotonic()
        if now - self.last_print >= self.interval or (self.n >= self.total and not finished):
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} ({rate:.1f} {self.unit}/s){extra}", flush=True)

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, mode: str = "auto", initial: int = 0):
    """A progress counter with update(n), set_postfix_str(s) and close()."""
    if use_bars(mode):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, mininterval=0.5, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial)
