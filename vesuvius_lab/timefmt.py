"""How times read in the package's lines and tables: a span as h:mm:ss, a moment as the clock shows it."""

from __future__ import annotations

import math
import time


def format_duration(seconds: float | None) -> str:
    """'1:02:05' (an hour or more) or '2:05'; a negative span reads as its length (the words around
    it say before or after); '?' when unknown (None, NaN, infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(abs(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_clock(ts: float) -> str:
    """A moment as the local clock shows it: '14:03:27'."""
    return time.strftime("%H:%M:%S", time.localtime(ts))
