"""Progress display: tqdm bars on a terminal, one plain line per interval otherwise (Colab logs, CI).

While a bar is open, log records go through tqdm.write (tqdm.contrib.logging.logging_redirect_tqdm), so
a log line never lands inside a bar and the bar is redrawn below it.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def use_bars(mode: str) -> bool:
    """Whether 'auto' | 'bar' | 'lines' means tqdm bars here."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour), like tqdm's elapsed and remaining times."""
    minutes, secs = divmod(round(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineProgress:
    """A tqdm-like counter that prints 'desc: n/total (rate unit/s, elapsed T, ETA T) postfix' every
    `interval` seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, interval: float = 10.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.start, self.start_n = interval, time.monotonic(), initial
        self.last_print, self.postfix, self.printed = 0.0, "", 0

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, count: int = 1) -> None:
        if count <= 0:
            return
        finished = self.n >= self.total
        self.n += count
        now = time.monotonic()
        if now - self.last_print >= self.interval or (self.n >= self.total and not finished):
            self.last_print, self.printed = now, self.printed + 1
            first = self.printed == 1 and self.n < self.total  # a rate over one item means nothing yet
            print(f"{self.desc}: {self.n}/{self.total} (started)" if first else self.line(now), flush=True)

    def line(self, now: float) -> str:
        """The progress line at monotonic time `now`."""
        elapsed = now - self.start
        rate = (self.n - self.start_n) / max(elapsed, 1e-9)
        eta = clock((self.total - self.n) / rate) if rate > 0 else "?"
        extra = f" {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} ({rate:.1f} {self.unit}/s, elapsed {clock(elapsed)}, "
                f"ETA {eta}){extra}")

    def close(self) -> None:
        pass


class BarProgress(tqdm):
    """A tqdm bar that routes log records through tqdm.write while it is open."""

    def __init__(self, *args, **kwargs):
        self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
        self._redirect.__enter__()
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._redirect, redirect = None, self._redirect
            redirect.__exit__(None, None, None)
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            redirect, self._redirect = getattr(self, "_redirect", None), None
            if redirect is not None:
                redirect.__exit__(None, None, None)


def progress(total: int, desc: str, unit: str, mode: str = "auto", initial: int = 0):
    """A progress counter with update(n), set_postfix_str(s) and close()."""
    if use_bars(mode):
        return BarProgress(total=total, desc=desc, unit=unit, initial=initial, mininterval=0.5, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial)
