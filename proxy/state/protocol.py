"""The store protocol: what every state store promises, its one error, its
records, and the pure decisions both stores share.

    StateStore (Protocol)
    ├── MemoryStore    in-process dicts; one instance only; never unavailable
    └── RedisStore     shared by every replica; short timeouts, no retries and a
                       circuit breaker, so each call answers or fails fast

    StoreUnavailable   the only error a store raises: the store could not answer
                       (refused, timeout, READONLY, script error, breaker open)

The quota gate built on top fails closed, so a store call must never hang.

Exactness across failures. Every quota admission carries a call id: the store
marks the call as admitted and the settle of that call applies only if it
removes the mark, so a settle is idempotent and a refund of an admission whose
reply was lost applies only if the admission did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

Record = dict[str, str]
HealthUpdate = tuple[str, Record]


class StoreUnavailable(Exception):
    """The store could not answer (refused, timeout, READONLY, script error, breaker open).

    `.reason` says why (`READONLY ...`, `breaker open after: ...`), `.operation` which
    call. After a timeout the outcome of a write is unknown: the command may have
    reached Redis and been applied (an admit that raised may have counted, the safe
    direction for a gate that fails closed). `maybe_applied` is False when the
    command surely never left this process (breaker open, no free connection)."""

    def __init__(self, reason: str, *, operation: str = "", maybe_applied: bool = True) -> None:
        super().__init__(f"{operation}: {reason}" if operation else reason)
        self.reason = reason
        self.operation = operation
        self.maybe_applied = maybe_applied


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    requests_used: int  # after this call (incremented only if admitted)
    tokens_used: int


@dataclass(frozen=True, slots=True)
class Lease:
    taken: bool
    held: int  # leases of that name afterwards
    counted: int | None = None  # the counter asked for alongside, after adding 1


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """This process's queue of writes that failed and wait for the store to answer."""

    pending: int  # settles and lease releases waiting to be replayed
    replayed: int  # applied later, since the store was opened
    dropped: int  # given up: the queue was full, or the store closed


class ReplayEvents(Protocol):
    """Who hears about the replay queue (`observe.OperatorEvents` turns it into metrics)."""

    def store_pending(self, count: int) -> None: ...
    def store_replayed(self, count: int) -> None: ...
    def store_dropped(self, count: int) -> None: ...


class StateStore(Protocol):
    """Where health records and quota counters live. Every method either
    succeeds quickly or raises `StoreUnavailable` quickly; nothing else."""

    kind: str  # "redis" or "memory"

    async def admit(
        self,
        provider: str,
        day: str,
        *,
        requests_limit: int | None,
        tokens_limit: int | None,
        tokens_estimate: int,
        ttl_seconds: int,
        call_id: str = "",
    ) -> Admission:
        """Atomically: reject (changing nothing) if one more request or `tokens_estimate`
        more tokens would exceed a limit (None: unlimited); else count them, and
        mark `call_id` (if given) as admitted. Counters expire `ttl_seconds` after
        their creation."""
        ...

    async def settle(
        self,
        provider: str,
        day: str,
        *,
        requests_delta: int,
        tokens_delta: int,
        ttl_seconds: int,
        call_id: str = "",
    ) -> None:
        """Adjust counters after a call (tokens_delta = actual - estimate; a refund is
        requests_delta=-1, tokens_delta=-estimate). Never below zero. With a
        `call_id`: only once, and only if that call's admission counted (it
        removes the mark); a RedisStore replays it later if Redis cannot answer."""
        ...

    async def usage(self, provider: str, day: str) -> tuple[int, int]:
        """(requests_used, tokens_used); (0, 0) when nothing was counted."""
        ...

    async def put_health(self, provider: str, record: Mapping[str, str | int | float]) -> None:
        """Replace the provider's health record and publish it to every replica."""
        ...

    async def get_health(self, providers: Sequence[str]) -> dict[str, dict[str, str]]:
        """Every stored record of those providers; a provider without one is absent."""
        ...

    def health_updates(self) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """Records published by any replica (this one included) from the moment of
        subscribing (the first `__anext__`); raises StoreUnavailable when the
        connection is lost (re-subscribe after a pause, then `get_health`)."""
        ...

    async def try_lock(self, name: str, ttl_seconds: float) -> bool:
        """True if this replica took the lock `name` for `ttl_seconds`."""
        ...

    async def count(self, name: str, delta: int, ttl_seconds: float) -> int:
        """Add `delta` to the shared counter `name` (created at 0; expires
        `ttl_seconds` after its last change) and return the new value."""
        ...

    async def acquire_lease(
        self,
        name: str,
        member: str,
        *,
        limit: int,
        ttl_seconds: float,
        count: str | None = None,
        count_limit: int = 0,
        count_ttl_seconds: float = 60.0,
    ) -> Lease:
        """Atomically: forget the leases of `name` that expired; if fewer than `limit`
        (0: no limit) remain, add `member` for `ttl_seconds`. With `count` (a counter
        of the same client as `name`), first add 1 to it as `count()` does, in the
        same round trip, and take no lease if that puts it over `count_limit` (0: no
        limit)."""
        ...

    async def release_lease(self, name: str, member: str) -> None:
        """Drop `member`'s lease (idempotent); a RedisStore replays it later if
        Redis cannot answer."""
        ...

    def watch(self, events: ReplayEvents) -> None:
        """Report the queue of writes waiting to be replayed to `events` from now on."""
        ...

    def replay_stats(self) -> ReplayStats:
        """The queue of writes waiting to be replayed, as of now."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


# Pure decisions, shared by both stores (the Lua scripts in `scripts` mirror them).


def admits(
    requests_used: int,
    tokens_used: int,
    *,
    requests_limit: int | None,
    tokens_limit: int | None,
    tokens_estimate: int,
) -> bool:
    if requests_limit is not None and requests_used + 1 > requests_limit:
        return False
    return tokens_limit is None or tokens_used + tokens_estimate <= tokens_limit


def settled(used: int, delta: int) -> int:
    return max(0, used + delta)


def stringify(record: Mapping[str, str | int | float]) -> Record:
    return {str(key): str(value) for key, value in record.items()}


def encode_update(provider: str, record: Record) -> bytes:
    return orjson.dumps({"provider": provider, "record": record})


def decode_update(payload: str | bytes) -> HealthUpdate | None:
    """The (provider, record) in a pub/sub payload; None if it is not one of ours."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("provider"), str):
        return None
    record = data.get("record")
    if not isinstance(record, dict):
        return None
    return data["provider"], {str(k): str(v) for k, v in record.items()}


def check_quota_args(tokens_estimate: int, ttl_seconds: int) -> None:
    if tokens_estimate < 0:
        raise ValueError(f"tokens_estimate must be >= 0, got {tokens_estimate}")
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
