"""Go duration syntax ("1h30m", "500ms", "1.5h", "2us", "3µs"), as the original used.

A duration is returned as a :class:`datetime.timedelta`, whose resolution is one
microsecond; a duration finer than that is rejected rather than rounded.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
    # Not Go, but every operator writes it: a day is 24 hours of elapsed time.
    "d": 86400 * 1_000_000_000,
}
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")


def parse_duration_ns(text: str) -> int:
    """Parse a Go duration string into whole nanoseconds (>= 0).

    Raises ValueError with the reason on anything that is not a duration.
    """
    if not isinstance(text, str):
        raise ValueError(f"a duration must be a string like '10m' or '1h30m', not {text!r}")
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0
    if s.startswith("-"):
        raise ValueError(f"duration {text!r} is negative")
    if s.startswith("+"):
        s = s[1:]
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = Decimal(0)
    while pos < len(s):
        m = _TERM.match(s, pos)
        if m is None:
            raise ValueError(
                f"invalid duration {text!r}: expected a number and a unit "
                f"(ns, us, µs, ms, s, m, h, d) at position {pos}"
            )
        total += Decimal(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if total != total.to_integral_value():
        raise ValueError(f"duration {text!r} is finer than one nanosecond")
    return int(total)


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration string into a timedelta (microsecond resolution)."""
    ns = parse_duration_ns(text)
    if ns % 1000:
        raise ValueError(f"duration {text!r} is finer than one microsecond, the finest supported")
    return timedelta(microseconds=ns // 1000)


def format_duration(value: timedelta) -> str:
    """Format a timedelta in Go syntax, e.g. 1h30m0s-style but compact: '1h30m', '250ms'."""
    us = value // timedelta(microseconds=1)
    if us == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1000)):
        q, us = divmod(us, size)
        if q:
            parts.append(f"{q}{unit}")
    if us:
        parts.append(f"{us}us")
    return "".join(parts)
