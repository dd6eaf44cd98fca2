"""Times and durations as people read them, one way for every view."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """A duration in human units: `52 ms` (most steps take less than a second), `4.1 s`,
    `2 min 5 s`, `1 h 3 min`."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def clock(ts: float | None) -> str:
    """A moment as a UTC date and time; `-` for none."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "-"


def hms(ts: float) -> str:
    """A moment's UTC time of day, for a timeline whose date is said once."""
    return time.strftime("%H:%M:%S", time.gmtime(ts))
