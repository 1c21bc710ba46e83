"""MemoryStore: the state of a single instance, in process dicts.

Counters, locks and leases expire lazily by an injected clock; health updates
go to the subscribers of this one process. It never raises `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.state.protocol import (
    Admission,
    HealthUpdate,
    Lease,
    Record,
    ReplayEvents,
    ReplayStats,
    admits,
    check_quota_args,
    settled,
    stringify,
)


@dataclass(slots=True)
class _Counter:
    requests: int
    tokens: int
    expires_at: float
    marks: set[str] = field(default_factory=set)  # admitted calls not yet settled


class MemoryStore:
    """In-process state for a single instance. Counters and locks expire lazily by `clock`."""

    kind: str = "memory"

    def __init__(self, clock: Callable[[], float] = time.time, *, queue_size: int = 1024) -> None:
        self._clock = clock
        self._queue_size = queue_size
        self._counters: dict[tuple[str, str], _Counter] = {}
        self._health: dict[str, Record] = {}
        self._locks: dict[str, float] = {}
        self._counts: dict[str, tuple[int, float]] = {}  # name -> (value, expires at)
        self._leases: dict[str, dict[str, float]] = {}  # name -> member -> expires at
        self._subscribers: set[asyncio.Queue[HealthUpdate | None]] = set()

    def __repr__(self) -> str:
        return f"<MemoryStore counters={len(self._counters)} health={len(self._health)}>"

    def _counter(self, provider: str, day: str) -> _Counter | None:
        counter = self._counters.get((provider, day))
        if counter is not None and self._clock() >= counter.expires_at:
            del self._counters[(provider, day)]
            return None
        return counter

    def _create(self, provider: str, day: str, ttl_seconds: int) -> _Counter:
        counter = _Counter(0, 0, self._clock() + ttl_seconds)
        self._counters[(provider, day)] = counter
        return counter

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
        check_quota_args(tokens_estimate, ttl_seconds)
        counter = self._counter(provider, day)
        used = (counter.requests, counter.tokens) if counter else (0, 0)
        if not admits(*used, requests_limit=requests_limit, tokens_limit=tokens_limit, tokens_estimate=tokens_estimate):
            return Admission(False, *used)
        counter = counter or self._create(provider, day, ttl_seconds)
        counter.requests += 1
        counter.tokens += tokens_estimate
        if call_id:
            counter.marks.add(call_id)
        return Admission(True, counter.requests, counter.tokens)

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
        counter = self._counter(provider, day)
        if call_id:
            if counter is None or call_id not in counter.marks:
                return  # settled already, or never admitted
            counter.marks.discard(call_id)
        if counter is None:
            if settled(0, requests_delta) == 0 and settled(0, tokens_delta) == 0:
                return
            counter = self._create(provider, day, ttl_seconds)
        counter.requests = settled(counter.requests, requests_delta)
        counter.tokens = settled(counter.tokens, tokens_delta)

    async def usage(self, provider: str, day: str) -> tuple[int, int]:
        counter = self._counter(provider, day)
        return (counter.requests, counter.tokens) if counter else (0, 0)

    async def put_health(self, provider: str, record: Mapping[str, str | int | float]) -> None:
        flat = stringify(record)
        self._health[provider] = flat
        for queue in self._subscribers:
            if queue.full():  # a stalled reader loses the oldest update, not the newest
                queue.get_nowait()
            queue.put_nowait((provider, dict(flat)))

    async def get_health(self, providers: Sequence[str]) -> dict[str, dict[str, str]]:
        return {p: dict(self._health[p]) for p in providers if p in self._health}

    async def health_updates(self) -> AsyncIterator[tuple[str, dict[str, str]]]:
        queue: asyncio.Queue[HealthUpdate | None] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            while (update := await queue.get()) is not None:
                yield update
        finally:
            self._subscribers.discard(queue)

    async def try_lock(self, name: str, ttl_seconds: float) -> bool:
        now = self._clock()
        if self._locks.get(name, now) > now:
            return False
        self._locks[name] = now + ttl_seconds
        return True

    async def count(self, name: str, delta: int, ttl_seconds: float) -> int:
        now = self._clock()
        value, expires = self._counts.get(name, (0, now))
        value = (value if expires > now else 0) + delta
        self._counts[name] = (value, now + ttl_seconds)
        if len(self._counts) > 4096:  # forget expired windows now and then
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        return value

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
        counted = None if count is None else await self.count(count, 1, count_ttl_seconds)
        now = self._clock()
        leases = {m: expires for m, expires in self._leases.get(name, {}).items() if expires > now}
        over_count = counted is not None and 0 < count_limit < counted
        if over_count or (limit and len(leases) >= limit and member not in leases):
            self._keep_leases(name, leases)
            return Lease(False, len(leases), counted)
        leases[member] = now + ttl_seconds
        self._keep_leases(name, leases)
        return Lease(True, len(leases), counted)

    def _keep_leases(self, name: str, leases: dict[str, float]) -> None:
        if leases:
            self._leases[name] = leases
        else:
            self._leases.pop(name, None)

    async def release_lease(self, name: str, member: str) -> None:
        leases = self._leases.get(name)
        if leases is not None:
            leases.pop(member, None)
            if not leases:
                del self._leases[name]

    def watch(self, events: ReplayEvents) -> None:
        """Nothing to report: a MemoryStore never fails, so nothing waits for a replay."""

    def replay_stats(self) -> ReplayStats:
        return ReplayStats(0, 0, 0)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        """Ends every `health_updates` iteration."""
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
