"""Where the service's time comes from.

The Lua scripts never read a clock of their own: the server passes `now_ms` in,
so tests drive time with ManualClock and a month rollover can be tested exactly.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """The machine's wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class RedisClock:
    """Redis's clock, read through an offset to this machine's clock.

    Every replica asks the same Redis for the time (TIME, on each health probe),
    so replicas whose own clocks drift still agree on the instant a job
    completes, and so on its month. Between probes the machine clock runs on
    from the last offset; a probe's round trip bounds the error (half of it).
    """

    def __init__(self) -> None:
        self.offset_ms = 0
        self.synced = False

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def sync(self, redis_seconds: int, redis_micros: int, sent_ns: int, received_ns: int) -> None:
        """Adopt Redis's time, as read by a TIME sent at sent_ns and answered at received_ns."""
        redis_ms = redis_seconds * 1000 + redis_micros // 1000
        local_ms = (sent_ns + received_ns) // 2 // 1_000_000
        self.offset_ms = redis_ms - local_ms
        self.synced = True


class ManualClock:
    """A clock that moves only when told to (for tests and simulations)."""

    def __init__(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def advance(self, seconds: float) -> None:
        self._now_ms += round(seconds * 1000)
