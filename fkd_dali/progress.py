"""Progress: a tqdm bar on a terminal; plain lines at intervals when the output is a file or a pipe.

A bar redrawn into a batch job's log file writes a carriage return and a line several times a second (a week of
training: tens of thousands). So when stderr is not a terminal, :func:`progress` returns a :class:`LogProgress`
instead: the same calls (``update``, ``set_postfix``, ``close``), and one plain line every
``FKD_DALI_PROGRESS_SECONDS`` seconds (default 60), plus a last one when the bar closes after working.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

INTERVAL_ENV = "FKD_DALI_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 60.0


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             **kwargs) -> tqdm | LogProgress:
    """A tqdm bar on stderr with rate and ETA when stderr is a terminal, else plain lines at intervals;
    ``disable`` for library use and tests."""
    if not disable and not _is_terminal(sys.stderr):
        return LogProgress(total=total, desc=desc, unit=unit, initial=kwargs.get("initial", 0),
                           interval=log_interval())
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5, **kwargs)


def log_interval() -> float:
    """Seconds between two progress lines in a log (``FKD_DALI_PROGRESS_SECONDS``, default 60)."""
    text = os.environ.get(INTERVAL_ENV, "")
    if not text.strip():
        return DEFAULT_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{INTERVAL_ENV}={text!r}: give the seconds between two progress lines in a log, a number "
                         f">= 0 (default {DEFAULT_INTERVAL:g})")
    return seconds


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogProgress:
    """tqdm's interface, written as one plain line (no carriage return) at most every ``interval`` seconds:
    ``desc: n/total unit (p%) [elapsed<remaining, rate, postfix]``."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, interval: float = DEFAULT_INTERVAL,
                 file: TextIO | None = None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self.initial = initial
        self.file = file or sys.stderr
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.printed_n = initial  # n at the last line written
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._line()
        self.closed = True

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> None:
        now = time.monotonic()
        fmt = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]" \
            if self.total else "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
        line = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix, bar_format=fmt, initial=self.initial)
        self.file.write(re.sub(" {2,}", " ", line) + "\n")
        self.file.flush()
        self.last, self.printed_n = now, self.n


def format_eta(seconds: float) -> str:
    """H:MM:SS (or D days, H:MM:SS) as tqdm shows times."""
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + tqdm.format_interval(rest)
