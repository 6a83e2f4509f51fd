"""Time, passed in: services take a Clock so that tests can drive time themselves."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta


class Clock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds; True when it was set."""
        return event.wait(max(0.0, timeout))

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock(Clock):
    """A clock that moves only when told to: for unit tests."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta

    def set(self, value: datetime) -> None:
        with self._lock:
            self._now = value

    def wait(self, event: threading.Event, timeout: float) -> bool:
        # Time does not pass by itself; yield briefly so other threads progress.
        return event.wait(min(timeout, 0.01))

    def monotonic(self) -> float:
        return self.now().timestamp()
