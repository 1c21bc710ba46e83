"""The proxy's own load, measured and bounded: requests in flight in this worker
(shed above a ceiling; readiness lost above a high-water mark, back below a
low-water mark) and the event loop's lag.

Both exist so that the proxy's own saturation is never mistaken for a
provider's failure: a request refused at the door costs microseconds and no
provider anything, and a deadline that expires while the loop was late is the
proxy's lateness (`health.loop_lag_seconds`), not the provider's.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from proxy.observe import event

# /readyz turns 503 at this share of `server.max_in_flight`, and 200 again below the low one:
# the gap keeps a replica from flapping in and out of its Service at the edge.
HIGH_WATER: Final = 0.9
LOW_WATER: Final = 0.7
# File descriptors a request in flight holds (the client's socket, the provider's), and
# those kept aside for the rest (listening sockets, Redis, logs, probes, idle clients).
FDS_PER_REQUEST: Final = 2
FDS_SPARE: Final = 256
LAG_INTERVAL: Final = 0.05  # seconds between two lag samples (a timer that measures its own delay)
LAG_WINDOW: Final = 2.0  # `LoopLag.recent()` is the worst lag of the last one to two windows


class LoopLag:
    """How late the event loop runs what is due: a timer every `interval`
    seconds measures its own delay. Costs one timer callback per interval."""

    def __init__(
        self,
        histogram: Histogram | None = None,
        *,
        interval: float = LAG_INTERVAL,
        window: float = LAG_WINDOW,
    ) -> None:
        self.interval = interval
        self.window = window
        self._histogram = histogram
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = math.inf
        self._worst = 0.0  # in the current window
        self._worst_before = 0.0  # in the window before it
        self._window_ends = 0.0

    def __repr__(self) -> str:
        return f"<LoopLag recent={self.recent():.4f}s>"

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._window_ends = loop.time() + self.window
        self._schedule(loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._due = math.inf

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.note(max(0.0, now - self._due), now)
        self._schedule(now)

    def note(self, lag: float, now: float) -> None:
        """Record one sample (the timer's; tests may add their own)."""
        if now >= self._window_ends:
            self._worst_before = self._worst if now < self._window_ends + self.window else 0.0
            self._worst = 0.0
            self._window_ends = now + self.window
        self._worst = max(self._worst, lag)
        if self._histogram is not None:
            self._histogram.observe(lag)

    def recent(self) -> float:
        """The worst lag seen lately (the last one to two windows), or how late
        the next sample already is when the loop has not got to it yet: a
        deadline that fired in the same turn as a stall sees the stall."""
        overdue = 0.0
        if self._loop is not None and self._handle is not None:
            overdue = max(0.0, self._loop.time() - self._due)
        return max(self._worst, self._worst_before, overdue)


def open_files_limit() -> int:
    """This process's soft RLIMIT_NOFILE; -1 where there is none to read."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else soft


def ceiling_within(limit: int, open_files: int) -> int:
    """`server.max_in_flight` (0: none), lowered to what `open_files` file
    descriptors can carry, two per request: past them a new connection to a
    provider would fail for want of a descriptor and count as the provider's
    failure. -1 (no limit known) leaves it as it is."""
    if open_files < 0:
        return limit
    room = max(1, (open_files - FDS_SPARE) // FDS_PER_REQUEST)
    return room if limit == 0 or limit > room else limit


class InFlight:
    """Requests in flight in this worker (a stream until its last byte), the
    ceiling above which new ones are shed, and the readiness that follows it
    with hysteresis. Plain integer arithmetic: it runs twice per request."""

    __slots__ = ("_gauge", "_shed", "count", "high", "limit", "low", "overloaded")

    def __init__(self, limit: int, gauge: Gauge | None = None, shed: Counter | None = None) -> None:
        self.count = 0
        self.overloaded = False
        self._gauge = gauge
        self._shed = shed
        self.limit = self.high = self.low = 0
        self.configure(limit)

    def __repr__(self) -> str:
        return f"<InFlight {self.count}/{self.limit or '∞'}{' overloaded' if self.overloaded else ''}>"

    def configure(self, limit: int) -> None:
        """Set the ceiling (0: none); the water marks follow it."""
        self.limit = limit
        self.high = max(1, math.ceil(limit * HIGH_WATER)) if limit else 0
        self.low = math.floor(limit * LOW_WATER) if limit else 0
        if not limit and self.overloaded:
            self._flip(False)

    def enter(self) -> bool:
        """Count one more request, or False when this worker is full: the
        caller refuses it (`ServerOverloaded`) and must not `leave`."""
        limit = self.limit
        if limit and self.count >= limit:
            if self._shed is not None:
                self._shed.inc()
            if not self.overloaded:
                self._flip(True)
            return False
        self.count += 1
        if self._gauge is not None:
            self._gauge.inc()
        if limit and not self.overloaded and self.count >= self.high:
            self._flip(True)
        return True

    def leave(self) -> None:
        self.count -= 1
        if self._gauge is not None:
            self._gauge.dec()
        if self.overloaded and self.count <= self.low:
            self._flip(False)

    def _flip(self, overloaded: bool) -> None:
        self.overloaded = overloaded
        if overloaded:
            event("overloaded", logging.WARNING, in_flight=self.count, max_in_flight=self.limit, ready_below=self.low)
        else:
            event("overload_cleared", logging.WARNING, in_flight=self.count, max_in_flight=self.limit)

    def status(self) -> dict[str, object]:
        """For /readyz."""
        return {
            "in_flight": self.count,
            "max_in_flight": self.limit or None,
            "overloaded": self.overloaded,
            "not_ready_at": self.high or None,
            "ready_again_at": self.low if self.limit else None,
        }
