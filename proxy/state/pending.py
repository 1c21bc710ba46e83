"""The replay queue: writes that failed while Redis could not answer, applied
again, in order, as soon as it answers.

Only idempotent writes are queued (a quota settle carrying its call id, a lease
release), so replaying one that did reach Redis changes nothing. The queue is
bounded: when it is full the oldest write is dropped (and counted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.state.protocol import ReplayEvents, ReplayStats, StoreUnavailable

log = logging.getLogger("fallback_proxy.state")

PENDING_LIMIT = 10_000  # settles and releases queued for replay; beyond it the oldest is dropped

Write = Callable[[], Awaitable[object]]
Call = Callable[[str, Write], Awaitable[object]]


@dataclass(slots=True)
class Pending:
    """An idempotent write that failed, to be replayed when Redis answers again."""

    operation: str
    run: Write


class ReplayQueue:
    """Failed idempotent writes, replayed in the background through `call` (the
    store's own guarded call: breaker, timeouts), pausing `pause` seconds after
    each attempt that finds Redis still unavailable."""

    def __init__(self, call: Call, *, limit: int = PENDING_LIMIT, pause: float = 1.0) -> None:
        self._call = call
        self._limit = limit
        self._pause = max(0.05, min(pause, 1.0))
        self._items: collections.deque[Pending] = collections.deque()
        self._replayer: asyncio.Task[None] | None = None
        self._closed = False
        self.replayed = 0  # queued writes applied later
        self.dropped = 0  # queued writes given up (the queue was full, or the store closed)
        self.events: ReplayEvents | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<ReplayQueue pending={len(self._items)} replayed={self.replayed} dropped={self.dropped}>"

    def stats(self) -> ReplayStats:
        return ReplayStats(len(self._items), self.replayed, self.dropped)

    def watch(self, events: ReplayEvents) -> None:
        self.events = events
        events.store_pending(len(self._items))

    def _changed(self, *, replayed: int = 0, dropped: int = 0) -> None:
        self.replayed += replayed
        self.dropped += dropped
        if self.events is not None:
            if replayed:
                self.events.store_replayed(replayed)
            if dropped:
                self.events.store_dropped(dropped)
            self.events.store_pending(len(self._items))

    def add(self, operation: str, run: Write) -> None:
        """Keep a write that failed, and make sure a replayer runs."""
        if self._closed:
            self._changed(dropped=1)
            return
        dropped = 0
        if len(self._items) >= self._limit:
            self._items.popleft()
            dropped = 1
            if self.dropped == 0 or (self.dropped + 1) % 1000 == 0:
                log.warning(
                    "store: replay queue full (%d): %d queued writes dropped so far", self._limit, self.dropped + 1
                )
        self._items.append(Pending(operation, run))
        self._changed(dropped=dropped)
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        """Apply the queued writes in order as soon as Redis answers; wait out the breaker."""
        replayed = 0
        while self._items and not self._closed:
            item = self._items[0]
            try:
                await self._call(item.operation, item.run)
            except StoreUnavailable:
                await asyncio.sleep(self._pause)
                continue
            with contextlib.suppress(ValueError):  # dropped meanwhile by an overflow
                self._items.remove(item)
            replayed += 1
            self._changed(replayed=1)
        if replayed:
            log.info("store: %d queued writes replayed after Redis came back", replayed)

    async def close(self, flush_seconds: float) -> None:
        """Give the queued writes `flush_seconds` to be replayed; drop the rest.
        Writes added afterwards are dropped at once."""
        if self._replayer is not None and not self._replayer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._replayer), flush_seconds)
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        self._closed = True
        if self._items:
            log.warning("store: closing with %d queued writes not replayed", len(self._items))
            dropped = len(self._items)
            self._items.clear()
            self._changed(dropped=dropped)
