"""Per-client limits: requests per minute and streams open at once, counted
in the state store so every replica enforces the same numbers.

A client is its bearer key (by digest, never the key itself), or everyone
at once on an open proxy. If the store cannot answer, the limits let the
request through (availability first; quotas, not these, guard spending) and
the miss is counted.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import LimitSettings
from proxy.errors import ClientRateLimited
from proxy.state import StateStore, StoreUnavailable

WINDOW_SECONDS = 60
STREAM_TTL_SECONDS = 3600  # an open-stream count left behind by a crashed replica fades away


def client_id(authorization: str | None) -> str:
    """A short, stable, non-reversible id for the caller's key."""
    token = (authorization or "").partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else "anonymous"


@dataclass(slots=True)
class Ticket:
    """A stream counted as open; `ClientLimits.leave` gives it back."""

    client: str
    counted: bool


class ClientLimits:
    def __init__(
        self, settings: LimitSettings, store: StateStore, on_store_error: Callable[[StoreUnavailable], None],
        *, clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_store_error = on_store_error
        self.clock = clock

    async def enter(self, client: str, stream: bool) -> Ticket:
        """Count this request; raise `ClientRateLimited` (429) when over a limit."""
        await self._rate(client)
        counted = False
        if stream and self.settings.concurrent_streams:
            open_streams = await self._count(f"streams:{client}", 1, STREAM_TTL_SECONDS)
            counted = open_streams is not None
            if open_streams is not None and open_streams > self.settings.concurrent_streams:
                await self._count(f"streams:{client}", -1, STREAM_TTL_SECONDS)
                raise ClientRateLimited(
                    f"Too many streams open for this key: the limit is {self.settings.concurrent_streams}.", 1
                )
        return Ticket(client, counted)

    async def leave(self, ticket: Ticket) -> None:
        if ticket.counted:
            await self._count(f"streams:{ticket.client}", -1, STREAM_TTL_SECONDS)

    async def _rate(self, client: str) -> None:
        limit = self.settings.requests_per_minute
        if not limit:
            return
        now = self.clock()
        window = int(now // WINDOW_SECONDS)
        used = await self._count(f"rate:{client}:{window}", 1, WINDOW_SECONDS * 2)
        if used is not None and used > limit:
            retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now))
            raise ClientRateLimited(
                f"Rate limit reached for this key: {limit} requests per minute. Retry in {retry_after}s.", retry_after
            )

    async def _count(self, name: str, delta: int, ttl: float) -> int | None:
        try:
            return await self.store.count(name, delta, ttl)
        except StoreUnavailable as exc:
            self.on_store_error(exc)
            return None
