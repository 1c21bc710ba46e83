"""The state store: per-provider health records and daily quota counters.

One protocol, two implementations:

    StateStore (Protocol)
    ├── MemoryStore    in-process dicts; one instance only; never unavailable
    └── RedisStore     shared by every replica; short timeouts, no retries and a
                       circuit breaker, so each call answers or fails fast

    StoreUnavailable   the only error a store raises: the store could not answer
                       (refused, timeout, READONLY, script error, breaker open)

The quota gate built on top fails closed, so a store call must never hang:
a RedisStore call talks to Redis for at most `hard_timeout` (`2 * timeout` plus
a little) or raises `StoreUnavailable`; while the breaker is open it raises at
once, without touching the network. (A process so busy that all its pooled
connections stay in use may also wait up to `pool_wait` for one first.)

Exactness across failures. Every quota admission carries a call id: the admit
script leaves a mark (`m:<id>` in the quota hash) and the settle of that call
applies only if it removes the mark, so a settle is idempotent and a refund of
an admission whose reply was lost applies only if the admission did. A settle,
or a stream lease's release, that fails is queued in process (bounded) and
replayed when Redis answers again, so the counters end exact after an outage.
A Redis without persistence that restarts empty has lost the day's counters
and marks: the counters start again from zero and the queued settles of calls
admitted before the restart find no mark and change nothing.

Redis layout (`fp` is the prefix; every key of one provider carries the Redis
Cluster hash tag `{provider}`, so a script only touches one slot):

    fp:{openai-4o}:health           hash: the provider's health record
    fp:{openai-4o}:quota:2025-01-31 hash: req, tok, m:<call id> for each admitted call not
                                    yet settled (expires ttl_seconds after creation)
    fp:{<client>}:count:rate:<client>:<window>  a counter (INCRBY, PEXPIRE)
    fp:{<client>}:lease:streams:<client>  sorted set: member = stream id, score = lease
                                    expiry (ms, Redis's clock)
    fp:{openai-4o}:lock:probe:openai-4o   SET NX PX lock
    fp:health                       pub/sub channel: {"provider": ..., "record": {...}}
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

if TYPE_CHECKING:  # redis-py is imported only when a Redis store is opened (~80 ms)
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel

T = TypeVar("T")
log = logging.getLogger("fallback_proxy.state")

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


class StateStore(Protocol):
    """Where health records and quota counters live. Every method either
    succeeds quickly or raises `StoreUnavailable` quickly; nothing else."""

    kind: str  # "redis" or "memory"

    async def admit(
        self, provider: str, day: str, *, requests_limit: int | None, tokens_limit: int | None,
        tokens_estimate: int, ttl_seconds: int, call_id: str = "",
    ) -> Admission:
        """Atomically: reject (changing nothing) if one more request or `tokens_estimate`
        more tokens would exceed a limit (None: unlimited); else count them, and
        mark `call_id` (if given) as admitted. Counters expire `ttl_seconds` after
        their creation."""
        ...

    async def settle(
        self, provider: str, day: str, *, requests_delta: int, tokens_delta: int, ttl_seconds: int,
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
        self, name: str, member: str, *, limit: int, ttl_seconds: float, count: str | None = None,
        count_limit: int = 0, count_ttl_seconds: float = 60.0,
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

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


# Pure decisions, shared by both stores (the Lua scripts below mirror them).

def admits(
    requests_used: int, tokens_used: int, *, requests_limit: int | None, tokens_limit: int | None,
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


def _check_quota_args(tokens_estimate: int, ttl_seconds: int) -> None:
    if tokens_estimate < 0:
        raise ValueError(f"tokens_estimate must be >= 0, got {tokens_estimate}")
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")


# In-memory store: one instance, no replicas.

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
        self, provider: str, day: str, *, requests_limit: int | None, tokens_limit: int | None,
        tokens_estimate: int, ttl_seconds: int, call_id: str = "",
    ) -> Admission:
        _check_quota_args(tokens_estimate, ttl_seconds)
        counter = self._counter(provider, day)
        used = (counter.requests, counter.tokens) if counter else (0, 0)
        if not admits(*used, requests_limit=requests_limit, tokens_limit=tokens_limit,
                      tokens_estimate=tokens_estimate):
            return Admission(False, *used)
        counter = counter or self._create(provider, day, ttl_seconds)
        counter.requests += 1
        counter.tokens += tokens_estimate
        if call_id:
            counter.marks.add(call_id)
        return Admission(True, counter.requests, counter.tokens)

    async def settle(
        self, provider: str, day: str, *, requests_delta: int, tokens_delta: int, ttl_seconds: int,
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
        self, name: str, member: str, *, limit: int, ttl_seconds: float, count: str | None = None,
        count_limit: int = 0, count_ttl_seconds: float = 60.0,
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

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        """Ends every `health_updates` iteration."""
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)


# Redis store.

@dataclass(frozen=True, slots=True)
class SentinelURL:
    """`redis+sentinel://[[user]:password@]host1:26379,host2:26379/<service>[/<db>]`;
    `rediss+sentinel://` for TLS to the master; `?sentinel_password=` if the sentinels
    require their own."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_SENTINEL_PORT = 26379


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse the sentinel URL form; ValueError names what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL (redis+sentinel://...): scheme {scheme!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else unquote(user)
        if not colon:
            username = None
    hosts = tuple(_parse_host(part) for part in hostlist.split(","))
    parts = [unquote(p) for p in path.split("/")] if path else []
    if not parts or not parts[0]:
        raise ValueError("sentinel URL needs a service name: redis+sentinel://host:26379/<service>")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"sentinel URL path must be /<service>[/<db>], got /{path}")
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = set(params) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"sentinel URL: unsupported query parameter(s) {sorted(unknown)}")
    return SentinelURL(
        hosts=hosts, service=parts[0], db=int(parts[1]) if len(parts) == 2 else 0,
        ssl=SENTINEL_SCHEMES[scheme.lower()], username=username, password=password or None,
        sentinel_password=params.get("sentinel_password", [None])[-1] or None,
    )


def _parse_host(part: str) -> tuple[str, int]:
    if not part:
        raise ValueError("sentinel URL: empty host in the host list")
    split = urlsplit(f"//{part}")
    try:
        port = split.port
    except ValueError as exc:
        raise ValueError(f"sentinel URL: bad port in {part!r}") from exc
    if not split.hostname:
        raise ValueError(f"sentinel URL: bad host {part!r}")
    return split.hostname, port or DEFAULT_SENTINEL_PORT


def _describe_target(url: str) -> str:
    """The URL without credentials, for repr and logs."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"


def _hash_tag(name: str) -> str:
    return "{" + name + "}"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str

    def health(self, provider: str) -> str:
        return f"{self.prefix}:{_hash_tag(provider)}:health"

    def quota(self, provider: str, day: str) -> str:
        return f"{self.prefix}:{_hash_tag(provider)}:quota:{day}"

    def lock(self, name: str) -> str:
        # 'probe:openai-4o' is about provider openai-4o: tag it like that provider's keys.
        return f"{self.prefix}:{_hash_tag(name.rpartition(':')[2])}:lock:{name}"

    def counter(self, name: str) -> str:
        # 'rate:<client>:<window>' is about one client: tag it by the client.
        parts = name.split(":")
        return f"{self.prefix}:{_hash_tag(parts[1] if len(parts) > 1 else name)}:count:{name}"

    def lease(self, name: str) -> str:
        # 'streams:<client>' is about one client: tag it by the client.
        parts = name.split(":")
        return f"{self.prefix}:{_hash_tag(parts[1] if len(parts) > 1 else name)}:lease:{name}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:health"


# ARGV: requests_limit (-1: none), tokens_limit (-1: none), tokens_estimate, ttl_seconds,
# call_id ('': none). Returns {admitted 0/1, requests_used, tokens_used}. Mirrors admits().
ADMIT_LUA = """
local used = redis.call('HMGET', KEYS[1], 'req', 'tok')
local req, tok = tonumber(used[1]) or 0, tonumber(used[2]) or 0
local rlimit, tlimit, estimate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if (rlimit >= 0 and req + 1 > rlimit) or (tlimit >= 0 and tok + estimate > tlimit) then
  return {0, req, tok}
end
req = redis.call('HINCRBY', KEYS[1], 'req', 1)
tok = redis.call('HINCRBY', KEYS[1], 'tok', estimate)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'm:' .. ARGV[5], 1) end
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return {1, req, tok}
"""

# ARGV: requests_delta, tokens_delta, ttl_seconds, call_id ('': none). With a call id,
# applies only if it removes that call's mark (once; only if the admission counted).
# Clamps at zero; mirrors settled().
SETTLE_LUA = """
if ARGV[4] ~= '' and redis.call('HDEL', KEYS[1], 'm:' .. ARGV[4]) == 0 then return 0 end
local used = redis.call('HMGET', KEYS[1], 'req', 'tok')
local req, tok = tonumber(used[1]) or 0, tonumber(used[2]) or 0
local new_req = math.max(0, req + tonumber(ARGV[1]))
local new_tok = math.max(0, tok + tonumber(ARGV[2]))
if used[1] == false and used[2] == false and new_req == 0 and new_tok == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'req', new_req - req)
redis.call('HINCRBY', KEYS[1], 'tok', new_tok - tok)
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS: the lease set[, a counter]. ARGV: member, limit (0: none), ttl_ms[, count_limit
# (0: none), count_ttl_ms]. Returns {taken 0/1, leases held, counter (-1: none)}. Lease
# expiry by Redis's own clock, so replicas with skewed clocks agree.
LEASE_LUA = """
local counted = -1
if KEYS[2] then
  counted = redis.call('INCRBY', KEYS[2], 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  local count_limit = tonumber(ARGV[4])
  if count_limit > 0 and counted > count_limit then return {0, redis.call('ZCARD', KEYS[1]), counted} end
end
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit > 0 and held >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, held, counted}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return {1, redis.call('ZCARD', KEYS[1]), counted}
"""


class _Breaker:
    """Opens after a connection failure, or after `timeouts` calls in a row that
    timed out (one slow answer on a busy machine says little about Redis); stays
    open for `seconds`; then one trial call, whose success closes it."""

    def __init__(self, seconds: float, clock: Callable[[], float], timeouts: int = 3) -> None:
        self.seconds = seconds
        self.clock = clock
        self.timeouts = max(1, timeouts)
        self.opened_at: float | None = None
        self.trial = False
        self.reason = ""
        self.timed_out = 0  # calls in a row that timed out

    def cooling(self) -> bool:
        return self.opened_at is not None and (self.trial or self.clock() - self.opened_at < self.seconds)

    def admit(self) -> bool | None:
        """None: refuse; True: this call is the trial; False: an ordinary call."""
        if self.opened_at is None:
            return False
        if self.cooling():
            return None
        self.trial = True
        return True

    def success(self, trial: bool) -> None:
        self.timed_out = 0
        # An ordinary call that started before the breaker opened proves nothing.
        if trial:
            self.opened_at, self.trial = None, False

    def abandon(self, trial: bool) -> None:
        """The trial ended without a verdict: let the next call be the trial."""
        if trial:
            self.trial = False

    def failure(self, reason: str, *, timeout: bool = False, trial: bool = False) -> None:
        if timeout and not trial:
            self.timed_out += 1
            if self.timed_out < self.timeouts:
                return
        self.opened_at, self.trial, self.reason = self.clock(), False, reason


def _is_timeout(exc: BaseException) -> bool:
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, (TimeoutError, RedisTimeout))


def _reason(exc: BaseException, hard_timeout: float) -> str:
    from redis.exceptions import RedisError

    if isinstance(exc, RedisError):
        code = exc.status_code
        return f"{code} {exc}" if code else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return str(exc) or f"no answer within {hard_timeout * 1000:.0f} ms"
    return f"{type(exc).__name__}: {exc}"


def _no_retry() -> Retry:
    """No retries, and no failure callback either. redis-py's default is 10 retries
    with backoff up to 1 s; `retry=None` still runs the callback once, which for
    pub/sub means reconnecting (even to a store being closed) before raising."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0, supported_errors=())


PUBSUB_HEADROOM = 4  # pool connections beyond max_connections, for health_updates subscribers
PENDING_LIMIT = 10_000  # settles and releases queued for replay; beyond it the oldest is dropped


@dataclass(slots=True)
class _Pending:
    """An idempotent write that failed, to be replayed when Redis answers again."""

    operation: str
    run: Callable[[], Awaitable[object]]


class RedisStore:
    """State shared by every replica through Redis. Build it with `from_url`.

    Each call has a socket timeout of `timeout`, no retries inside redis-py, and a
    hard cap of `hard_timeout` (default `2 * timeout + 20 ms`, covering connect and a
    NOSCRIPT reload). Before that, a call may wait up to `pool_wait` for one of
    `max_connections` pooled connections (running out of them says this process is
    busy, not that Redis is down). A connection failure, or `breaker_timeouts`
    timeouts in a row, open the breaker for `breaker_seconds`: calls then raise at
    once, without I/O, until one trial call is let through and succeeds.

    A settle or a lease release that fails is queued (at most `pending_limit`) and
    replayed in the background once Redis answers again.
    """

    kind: str = "redis"

    def __init__(
        self, client: Redis, *, target: str, prefix: str = "fp", timeout: float = 0.05,
        breaker_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
        max_connections: int = 64, hard_timeout: float | None = None, pool_wait: float = 0.5,
        breaker_timeouts: int = 3, pending_limit: int = PENDING_LIMIT,
        pubsub_ping_seconds: float = 5.0, sentinel: Sentinel | None = None,
    ) -> None:
        self._client = client
        self._sentinel = sentinel
        self.target = target
        self.keys = RedisKeys(prefix)
        self.timeout = timeout
        self.hard_timeout = hard_timeout if hard_timeout is not None else timeout * 2 + 0.02
        self.pool_wait = pool_wait
        self._breaker = _Breaker(breaker_seconds, clock, breaker_timeouts)
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)
        self._max_connections = max_connections
        self._ping_seconds = pubsub_ping_seconds
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._token = secrets.token_hex(8)
        self.failures = 0  # calls that failed (those outside pub/sub may have opened the breaker)
        self.short_circuits = 0  # calls refused without I/O while the breaker was open
        self.busy = 0  # calls that found no free connection in time (not a Redis failure)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._pending_limit = pending_limit
        self._replayer: asyncio.Task[None] | None = None
        self.replayed = 0  # queued writes applied later
        self.dropped = 0  # queued writes given up (the queue was full, or the store closed)
        self._closed = False
        self._pubsubs: set[PubSub] = set()

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "fp", timeout: float = 0.05, connect_timeout: float = 0.2,
        breaker_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
        max_connections: int = 64, hard_timeout: float | None = None, pool_wait: float = 0.5,
        breaker_timeouts: int = 3, pending_limit: int = PENDING_LIMIT, pubsub_ping_seconds: float = 5.0,
    ) -> RedisStore:
        """`redis://`, `rediss://`, `unix://` or `redis+sentinel://`. Connects lazily:
        an unreachable server shows up as StoreUnavailable on the first call.
        Query parameters of a plain URL are passed to redis-py and win over these."""
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.sentinel import Sentinel
        from redis.maint_notifications import MaintNotificationsConfig

        options: dict[str, Any] = {
            "socket_timeout": timeout, "socket_connect_timeout": connect_timeout,
            "retry": _no_retry(),
            "health_check_interval": 0, "decode_responses": True,
            "max_connections": max_connections + PUBSUB_HEADROOM,
            # redis-py 8 leaves its stale-connection check off while maintenance
            # notifications are "auto": after a Redis restart every pooled
            # connection would fail once (and reopen the breaker). Off, they are
            # checked and replaced.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        sentinel = None
        if url.partition("://")[0].lower() in SENTINEL_SCHEMES:
            parsed = parse_sentinel_url(url)
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(parsed.hosts),
                sentinel_kwargs={
                    "socket_timeout": timeout, "socket_connect_timeout": connect_timeout,
                    "retry": _no_retry(), "password": parsed.sentinel_password,
                },
            )
            client = sentinel.master_for(
                parsed.service, db=parsed.db, username=parsed.username, password=parsed.password,
                ssl=parsed.ssl, **options,
            )
        else:
            # Calls are bounded by the store's own semaphore; pub/sub subscribers
            # beyond the headroom wait for a connection instead of failing.
            pool = BlockingConnectionPool.from_url(url, timeout=pool_wait, **options)
            client = Redis.from_pool(pool)
        return cls(
            client, target=_describe_target(url), prefix=prefix, timeout=timeout,
            breaker_seconds=breaker_seconds, clock=clock, max_connections=max_connections,
            hard_timeout=hard_timeout, pool_wait=pool_wait, breaker_timeouts=breaker_timeouts,
            pending_limit=pending_limit, pubsub_ping_seconds=pubsub_ping_seconds, sentinel=sentinel,
        )

    def __repr__(self) -> str:
        state = "open" if self.breaker_open else "closed"
        return (f"<RedisStore {self.target} prefix={self.keys.prefix!r} breaker={state} failures={self.failures}"
                f" pending={len(self._pending)}>")

    @property
    def breaker_open(self) -> bool:
        """True while calls are refused without I/O."""
        return self._breaker.cooling()

    @property
    def pending(self) -> int:
        """Failed settles and releases waiting to be replayed."""
        return len(self._pending)

    def _refuse_if_open(self, operation: str) -> bool:
        """Raise while the breaker is open; else whether this call is its trial."""
        if self._closed:
            raise StoreUnavailable("the store is closed", operation=operation, maybe_applied=False)
        trial = self._breaker.admit()
        if trial is None:
            self.short_circuits += 1
            raise StoreUnavailable(
                f"breaker open after: {self._breaker.reason}", operation=operation, maybe_applied=False
            )
        return trial

    def _failed(
        self, operation: str, exc: BaseException, *, trip: bool = True, trial: bool = False
    ) -> StoreUnavailable:
        self.failures += 1
        reason = _reason(exc, self.hard_timeout)
        if trip:
            self._breaker.failure(f"{operation}: {reason}", timeout=_is_timeout(exc), trial=trial)
        return StoreUnavailable(reason, operation=operation)

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """The one place Redis errors become StoreUnavailable; the breaker and the hard cap.

        Waiting for a free connection says nothing about Redis (this process is
        busy), so it has its own allowance of `pool_wait` and running out of it
        does not open the breaker."""
        trial = self._refuse_if_open(operation)
        try:
            async with asyncio.timeout(self.pool_wait):
                await self._slots.acquire()
        except TimeoutError as exc:
            self._breaker.abandon(trial)
            self.busy += 1
            reason = f"busy: all {self._max_connections} connections stayed in use"
            raise StoreUnavailable(reason, operation=operation, maybe_applied=False) from exc
        except asyncio.CancelledError:
            self._breaker.abandon(trial)
            raise
        try:
            if not trial and self._breaker.cooling():  # it opened while we waited
                self.short_circuits += 1
                raise StoreUnavailable(
                    f"breaker open after: {self._breaker.reason}", operation=operation, maybe_applied=False
                )
            async with asyncio.timeout(self.hard_timeout):
                result = await call()
        # Fail closed: whatever redis-py raises (its own errors, OSError, a parser's
        # ValueError on a garbled reply) means the store could not answer.
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise self._failed(operation, exc, trial=trial) from exc
        except asyncio.CancelledError:  # the caller gave up: no verdict on Redis
            self._breaker.abandon(trial)
            raise
        finally:
            self._slots.release()
        self._breaker.success(trial)
        return result

    def _queue(self, operation: str, run: Callable[[], Awaitable[object]]) -> None:
        """Keep an idempotent write that failed, and make sure a replayer runs."""
        if self._closed:
            self.dropped += 1
            return
        if len(self._pending) >= self._pending_limit:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("store: replay queue full (%d): %d queued writes dropped so far",
                            self._pending_limit, self.dropped)
        self._pending.append(_Pending(operation, run))
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        """Apply the queued writes in order as soon as Redis answers; wait out the breaker."""
        replayed = 0
        while self._pending and not self._closed:
            item = self._pending[0]
            try:
                await self._call(item.operation, item.run)
            except StoreUnavailable:
                await asyncio.sleep(max(0.05, min(self._breaker.seconds, 1.0)))
                continue
            with contextlib.suppress(ValueError):  # dropped meanwhile by an overflow
                self._pending.remove(item)
            replayed += 1
            self.replayed += 1
        if replayed:
            log.info("store: %d queued writes replayed after Redis came back", replayed)

    async def admit(
        self, provider: str, day: str, *, requests_limit: int | None, tokens_limit: int | None,
        tokens_estimate: int, ttl_seconds: int, call_id: str = "",
    ) -> Admission:
        _check_quota_args(tokens_estimate, ttl_seconds)
        args: list[int | str] = [
            -1 if requests_limit is None else requests_limit,
            -1 if tokens_limit is None else tokens_limit, tokens_estimate, ttl_seconds, call_id,
        ]
        key = self.keys.quota(provider, day)
        try:
            admitted, requests, tokens = await self._call(
                "admit", lambda: self._admit(keys=[key], args=args)
            )
        except (StoreUnavailable, asyncio.CancelledError) as exc:
            if call_id and getattr(exc, "maybe_applied", True):
                # The admission may have counted: give it back if (and only if) it did.
                refund: list[int | str] = [-1, -tokens_estimate, ttl_seconds, call_id]
                self._queue("settle", lambda: self._settle(keys=[key], args=refund))
            raise
        return Admission(bool(admitted), int(requests), int(tokens))

    async def settle(
        self, provider: str, day: str, *, requests_delta: int, tokens_delta: int, ttl_seconds: int,
        call_id: str = "",
    ) -> None:
        _check_quota_args(0, ttl_seconds)
        key = self.keys.quota(provider, day)
        args: list[int | str] = [requests_delta, tokens_delta, ttl_seconds, call_id]

        def run() -> Awaitable[object]:
            return self._settle(keys=[key], args=args)

        try:
            await self._call("settle", run)
        except StoreUnavailable:
            if call_id:  # idempotent: safe to apply later, even if this one did
                self._queue("settle", run)
            raise

    async def usage(self, provider: str, day: str) -> tuple[int, int]:
        key = self.keys.quota(provider, day)
        requests, tokens = await self._call("usage", lambda: self._client.hmget(key, ["req", "tok"]))
        return int(requests or 0), int(tokens or 0)

    async def put_health(self, provider: str, record: Mapping[str, str | int | float]) -> None:
        flat = stringify(record)
        key = self.keys.health(provider)

        async def replace_and_publish() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if flat:
                    pipe.hset(key, mapping=flat)  # type: ignore[arg-type]  # dict[str, str] is fine
                pipe.publish(self.keys.channel, encode_update(provider, flat))
                await pipe.execute()

        await self._call("put_health", replace_and_publish)

    async def get_health(self, providers: Sequence[str]) -> dict[str, dict[str, str]]:
        names = list(providers)
        if not names:
            return {}

        async def read_all() -> list[Record]:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.health(name))
                return await pipe.execute()

        records = await self._call("get_health", read_all)
        return {name: dict(record) for name, record in zip(names, records, strict=True) if record}

    async def health_updates(self) -> AsyncIterator[tuple[str, dict[str, str]]]:
        pubsub = await self._call("subscribe", self._subscribe)
        self._pubsubs.add(pubsub)
        try:
            async for message in self._messages(pubsub):
                if message["type"] == "message" and (update := decode_update(message["data"])):
                    yield update
        finally:
            self._pubsubs.discard(pubsub)
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _messages(self, pubsub: PubSub) -> AsyncIterator[dict[str, Any]]:
        """Every pub/sub message until `aclose`; PINGs a silent channel, because a
        silent channel and a dead connection look alike."""
        heard = self._clock()
        pinged: float | None = None
        while not self._closed:
            try:
                message = await self._next_message(pubsub)
                now = self._clock()
                if message is not None:
                    heard, pinged = now, None
                    yield message
                elif pinged is not None and now - pinged >= self._ping_seconds:
                    raise self._failed("subscribe", TimeoutError("no answer to PING"), trip=False)
                elif pinged is None and now - heard >= self._ping_seconds:
                    await self._pubsub_io(pubsub.ping())
                    pinged = now
            except StoreUnavailable:
                if self._closed:
                    return
                raise

    async def _subscribe(self) -> PubSub:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self.keys.channel)
            await pubsub.get_message(timeout=self.timeout)  # the subscribe confirmation
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        return pubsub

    async def _next_message(self, pubsub: PubSub) -> dict[str, Any] | None:
        wait = min(self._ping_seconds, 1.0)
        message: dict[str, Any] | None = await self._pubsub_io(pubsub.get_message(timeout=wait), wait)
        return message

    async def _pubsub_io(self, io: Awaitable[T], wait: float = 0.0) -> T:
        """A pub/sub read or PING; a lost connection is StoreUnavailable. It does not
        open the breaker: the pub/sub connection is one of many."""
        try:
            async with asyncio.timeout(wait + self.hard_timeout):
                return await io
        except Exception as exc:  # see _call: fail closed on anything redis-py raises
            raise self._failed("subscribe", exc, trip=False) from exc

    async def try_lock(self, name: str, ttl_seconds: float) -> bool:
        key, ttl_ms = self.keys.lock(name), max(1, round(ttl_seconds * 1000))
        taken = await self._call("try_lock", lambda: self._client.set(key, self._token, nx=True, px=ttl_ms))
        return bool(taken)

    async def count(self, name: str, delta: int, ttl_seconds: float) -> int:
        key, ttl_ms = self.keys.counter(name), max(1, round(ttl_seconds * 1000))

        async def add() -> int:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incrby(key, delta)
                pipe.pexpire(key, ttl_ms)
                value, _ = await pipe.execute()
                return int(value)

        return await self._call("count", add)

    async def acquire_lease(
        self, name: str, member: str, *, limit: int, ttl_seconds: float, count: str | None = None,
        count_limit: int = 0, count_ttl_seconds: float = 60.0,
    ) -> Lease:
        keys = [self.keys.lease(name)]
        args: list[str | int] = [member, limit, max(1, round(ttl_seconds * 1000))]
        if count is not None:
            keys.append(self.keys.counter(count))
            args += [count_limit, max(1, round(count_ttl_seconds * 1000))]
        taken, held, counted = await self._call("lease", lambda: self._lease(keys=keys, args=args))
        return Lease(bool(taken), int(held), None if int(counted) < 0 else int(counted))

    async def release_lease(self, name: str, member: str) -> None:
        key = self.keys.lease(name)

        def run() -> Awaitable[object]:
            return self._client.zrem(key, member)

        try:
            await self._call("release", run)
        except StoreUnavailable:
            self._queue("release", run)
            raise

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def aclose(self, *, flush_seconds: float = 1.0) -> None:
        """Later calls raise StoreUnavailable; every `health_updates` iteration ends.
        Queued writes get `flush_seconds` to be replayed; the rest are dropped."""
        if self._replayer is not None and not self._replayer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._replayer), flush_seconds)
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self._pending:
            self.dropped += len(self._pending)
            log.warning("store: closing with %d queued writes not replayed", len(self._pending))
            self._pending.clear()
        self._closed = True
        for pubsub in list(self._pubsubs):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()
