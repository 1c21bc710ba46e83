"""Per-client limits: requests per minute and streams open at once, counted
in the state store so every replica enforces the same numbers.

A client is its bearer key (by digest, never the key itself), or everyone
at once on an open proxy. If the store cannot answer, the limits let the
request through (availability first; quotas, not these, guard spending) and
the miss is counted.

An open stream holds a lease (a member of a per-client sorted set whose score
is its expiry), not a share of a counter: taking one drops the expired leases,
checks the cap and adds in one step, and giving it back removes exactly that
member, so a lost reply or a failed release cannot pile up. A release the store
could not take is replayed by the store later; a lease a crashed replica left
behind expires by itself after `lease_seconds` (longer than any stream lasts).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import Config, LimitSettings
from proxy.errors import ClientRateLimited
from proxy.intake import credentials
from proxy.state import StateStore, StoreUnavailable

WINDOW_SECONDS = 60
STREAM_LEASE_SECONDS = 3600.0  # longer than any stream's total deadline
LEASE_MARGIN_SECONDS = 60.0


def stream_lease_seconds(config: Config) -> float:
    """How long a stream's lease lives: longer than any stream of this config can
    last (every provider once, with its retries, each to its total deadline; a
    route's budget caps its walk), so only a crashed replica's leases ever expire."""
    visits = [(1 + p.retries) * p.timeout.total for p in config.providers.values()]
    longest_walk = sum(visits)
    budgets = [route.budget for route in config.routes.values()]
    if budgets and all(budget is not None for budget in budgets):
        # a client naming one provider as `model` walks no route: that visit alone
        longest_route = max(budget for budget in budgets if budget is not None)
        longest_walk = min(longest_walk, max(longest_route, max(visits)))
    return longest_walk + LEASE_MARGIN_SECONDS


def client_id(authorization: str | None) -> str:
    """A short, stable, non-reversible id for the caller's key."""
    _scheme, token = credentials(authorization)
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else "anonymous"


@dataclass(slots=True)
class Ticket:
    """A request let through; for a stream, the lease `ClientLimits.leave` gives back."""

    client: str
    lease: str | None = None  # the stream's id in the client's lease set


def streams_name(client: str) -> str:
    return f"streams:{client}"


class ClientLimits:
    def __init__(
        self,
        settings: LimitSettings,
        store: StateStore,
        on_store_error: Callable[[str, StoreUnavailable], None],
        *,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = STREAM_LEASE_SECONDS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_store_error = on_store_error
        self.clock = clock
        self.lease_seconds = lease_seconds

    async def enter(self, client: str, stream: bool) -> Ticket:
        """Count this request; raise `ClientRateLimited` (429) when over a limit.
        A stream under both limits costs one store round trip, not two."""
        limit = self.settings.concurrent_streams
        if not (stream and limit):
            await self._rate(client)
            return Ticket(client)
        rate_limit, now = self.settings.requests_per_minute, self.clock()
        window = int(now // WINDOW_SECONDS)
        lease = secrets.token_hex(8)
        try:
            got = await self.store.acquire_lease(
                streams_name(client),
                lease,
                limit=limit,
                ttl_seconds=self.lease_seconds,
                count=f"rate:{client}:{window}" if rate_limit else None,
                count_limit=rate_limit,
                count_ttl_seconds=WINDOW_SECONDS * 2,
            )
        except StoreUnavailable as exc:  # let it through; the lease may exist: give it back at the end
            self.on_store_error("acquire_lease", exc)
            return Ticket(client, lease)
        if got.counted is not None and got.counted > rate_limit:
            raise _rate_limited(rate_limit, window, now)
        if not got.taken:
            raise ClientRateLimited(f"Too many streams open for this key: the limit is {limit}.", 1)
        return Ticket(client, lease)

    async def leave(self, ticket: Ticket) -> None:
        if ticket.lease is None:
            return
        try:
            await self.store.release_lease(streams_name(ticket.client), ticket.lease)
        except StoreUnavailable as exc:  # the store replays the release once it answers
            self.on_store_error("release_lease", exc)

    async def _rate(self, client: str) -> None:
        limit = self.settings.requests_per_minute
        if not limit:
            return
        now = self.clock()
        window = int(now // WINDOW_SECONDS)
        used = await self._count(f"rate:{client}:{window}", 1, WINDOW_SECONDS * 2)
        if used is not None and used > limit:
            raise _rate_limited(limit, window, now)

    async def _count(self, name: str, delta: int, ttl: float) -> int | None:
        try:
            return await self.store.count(name, delta, ttl)
        except StoreUnavailable as exc:
            self.on_store_error("count", exc)
            return None


def _rate_limited(limit: int, window: int, now: float) -> ClientRateLimited:
    retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now))
    return ClientRateLimited(
        f"Rate limit reached for this key: {limit} requests per minute. Retry in {retry_after}s.", retry_after
    )
