"""RedisStore: state shared by every replica through Redis.

A call talks to Redis for at most `hard_timeout` (`2 * timeout` plus a little)
or raises `StoreUnavailable`; while the breaker is open it raises at once,
without touching the network. (A process so busy that all its pooled
connections stay in use may also wait up to `pool_wait` for one first.)

A settle, or a stream lease's release, that fails is queued in process
(bounded, see `pending`) and replayed when Redis answers again, so the counters
end exact after an outage. A Redis without persistence that restarts empty has
lost the day's counters and marks: the counters start again from zero and the
queued settles of calls admitted before the restart find no mark and change
nothing.

On a Redis Cluster the same holds per hash slot: every script and multi-key
call touches the keys of one provider or one client, which share a hash tag
(see `scripts`), and the health channel is a shard channel (see `channel`).
Redis replicates asynchronously: a master that dies may take its last
milliseconds of writes with it, and the replica promoted in its place counts on
from there.

redis-py is imported only when a store is opened (`from_url`), not with this module.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from proxy.state.breaker import StoreBreaker, describe_failure, is_timeout
from proxy.state.channel import ENDED, ShardedChannel, Subscription, subscribe
from proxy.state.connect import open_client, open_cluster
from proxy.state.pending import PENDING_LIMIT, ReplayQueue
from proxy.state.protocol import (
    Admission,
    Lease,
    Record,
    ReplayEvents,
    ReplayStats,
    StoreUnavailable,
    check_quota_args,
    decode_update,
    encode_update,
    stringify,
)
from proxy.state.scripts import ADMIT_LUA, COUNT_LUA, LEASE_LUA, PUT_HEALTH_LUA, SCRIPTS, SETTLE_LUA, RedisKeys
from proxy.state.urls import describe_target

if TYPE_CHECKING:  # redis-py is imported only when a Redis store is opened (~80 ms)
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.sentinel import Sentinel

T = TypeVar("T")

HEALTH_TTL_SECONDS = 86_400.0  # a health record not rewritten for a day describes nothing current


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

    A health record expires `health_ttl_seconds` after it was last written, so the
    records of providers no longer configured anywhere go away.

    `client` is a `RedisCluster` when `sharded` (the cluster's health channel) is given.
    """

    kind: str = "redis"

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        target: str,
        prefix: str = "fp",
        timeout: float = 0.05,
        breaker_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = 64,
        hard_timeout: float | None = None,
        pool_wait: float = 0.5,
        breaker_timeouts: int = 3,
        pending_limit: int = PENDING_LIMIT,
        pubsub_ping_seconds: float = 5.0,
        health_ttl_seconds: float = HEALTH_TTL_SECONDS,
        sentinel: Sentinel | None = None,
        sharded: ShardedChannel | None = None,
    ) -> None:
        self._client = client
        self._sentinel = sentinel
        self._sharded = sharded
        self._topology_known = False
        self._learner: asyncio.Task[None] | None = None  # one call learns the topology; the others wait for it
        self.health_ttl = max(1, round(health_ttl_seconds))
        self.target = target
        self.keys = RedisKeys(prefix)
        self.timeout = timeout
        self.hard_timeout = hard_timeout if hard_timeout is not None else timeout * 2 + 0.02
        self.pool_wait = pool_wait
        self._breaker = StoreBreaker(breaker_seconds, clock, breaker_timeouts)
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)
        self._max_connections = max_connections
        self._ping_seconds = pubsub_ping_seconds
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._put_health = client.register_script(PUT_HEALTH_LUA)
        self._count = client.register_script(COUNT_LUA)
        self._token = secrets.token_hex(8)
        self.failures = 0  # calls that failed (those outside pub/sub may have opened the breaker)
        self.short_circuits = 0  # calls refused without I/O while the breaker was open
        self.busy = 0  # calls that found no free connection in time (not a Redis failure)
        self._pending = ReplayQueue(self._call, limit=pending_limit, pause=breaker_seconds)
        self._closed = False
        self._subscriptions: set[Subscription] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "fp",
        timeout: float = 0.05,
        connect_timeout: float = 0.2,
        breaker_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = 64,
        hard_timeout: float | None = None,
        pool_wait: float = 0.5,
        breaker_timeouts: int = 3,
        pending_limit: int = PENDING_LIMIT,
        pubsub_ping_seconds: float = 5.0,
        health_ttl_seconds: float = HEALTH_TTL_SECONDS,
        cluster: bool = False,
    ) -> RedisStore:
        """`redis://`, `rediss://`, `unix://` or `redis+sentinel://`; with `cluster`,
        the comma-separated `redis://` or `rediss://` URLs of a Redis Cluster's seed
        nodes. Connects lazily: an unreachable server shows up as StoreUnavailable
        on the first call. Query parameters of a plain URL are passed to redis-py
        and win over these."""
        client: Redis | RedisCluster
        sentinel: Sentinel | None = None
        sharded: ShardedChannel | None = None
        if cluster:
            client, node_options = open_cluster(
                url, timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections
            )
            sharded = ShardedChannel(client, node_options)
        else:
            client, sentinel = open_client(
                url,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_connections=max_connections,
                pool_wait=pool_wait,
            )
        return cls(
            client,
            target=describe_target(url),
            prefix=prefix,
            timeout=timeout,
            breaker_seconds=breaker_seconds,
            clock=clock,
            max_connections=max_connections,
            hard_timeout=hard_timeout,
            pool_wait=pool_wait,
            breaker_timeouts=breaker_timeouts,
            pending_limit=pending_limit,
            pubsub_ping_seconds=pubsub_ping_seconds,
            health_ttl_seconds=health_ttl_seconds,
            sentinel=sentinel,
            sharded=sharded,
        )

    def __repr__(self) -> str:
        state = "open" if self.breaker_open else "closed"
        kind = " cluster" if self._sharded is not None else ""
        return (
            f"<RedisStore{kind} {self.target} prefix={self.keys.prefix!r} breaker={state} failures={self.failures}"
            f" pending={len(self._pending)}>"
        )

    @property
    def breaker_open(self) -> bool:
        """True while calls are refused without I/O."""
        return self._breaker.cooling()

    @property
    def pending(self) -> int:
        """Failed settles and releases waiting to be replayed."""
        return len(self._pending)

    @property
    def replayed(self) -> int:
        """Queued writes applied later."""
        return self._pending.replayed

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
        reason = describe_failure(exc, self.hard_timeout)
        if trip:
            self._breaker.failure(f"{operation}: {reason}", timeout=is_timeout(exc), trial=trial)
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
            if self._sharded is not None and not self._topology_known:
                await self._topology(self._sharded.cluster)
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

    async def _topology(self, cluster: RedisCluster) -> None:
        """Wait for the one task learning the topology (start it if none is running
        or the last one failed); its failure is every waiting call's."""
        learner = self._learner
        if learner is None or (learner.done() and (learner.cancelled() or learner.exception() is not None)):
            learner = self._learner = asyncio.get_running_loop().create_task(self._learn_topology(cluster))
        await asyncio.shield(learner)

    async def _learn_topology(self, cluster: RedisCluster) -> None:
        """A cluster client's first call asks a seed for the slot map and the command
        table (tens of milliseconds, more on a busy machine), and loads the scripts
        on every master (a call that met NOSCRIPT would load it on every master in
        its own time): once, with a bound of its own rather than one call's. Later
        changes (a failover) cost a slot map only, which redis-py fetches within the
        call that found the map stale."""
        async with asyncio.timeout(max(1.0, 4 * self.hard_timeout)):
            await cluster.initialize()
            await asyncio.gather(*(cluster.script_load(script) for script in SCRIPTS))
            self._topology_known = True

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
        args: list[int | str] = [
            -1 if requests_limit is None else requests_limit,
            -1 if tokens_limit is None else tokens_limit,
            tokens_estimate,
            ttl_seconds,
            call_id,
        ]
        key = self.keys.quota(provider, day)
        try:
            admitted, requests, tokens = await self._call("admit", lambda: self._admit(keys=[key], args=args))
        except (StoreUnavailable, asyncio.CancelledError) as exc:
            if call_id and getattr(exc, "maybe_applied", True):
                # The admission may have counted: give it back if (and only if) it did.
                refund: list[int | str] = [-1, -tokens_estimate, ttl_seconds, call_id]
                self._pending.add("settle", lambda: self._settle(keys=[key], args=refund))
            raise
        return Admission(bool(admitted), int(requests), int(tokens))

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
        check_quota_args(0, ttl_seconds)
        key = self.keys.quota(provider, day)
        args: list[int | str] = [requests_delta, tokens_delta, ttl_seconds, call_id]

        def run() -> Awaitable[object]:
            return self._settle(keys=[key], args=args)

        try:
            await self._call("settle", run)
        except StoreUnavailable:
            if call_id:  # idempotent: safe to apply later, even if this one did
                self._pending.add("settle", run)
            raise

    async def usage(self, provider: str, day: str) -> tuple[int, int]:
        key = self.keys.quota(provider, day)
        requests, tokens = await self._call("usage", lambda: self._client.hmget(key, ["req", "tok"]))
        return int(requests or 0), int(tokens or 0)

    async def put_health(self, provider: str, record: Mapping[str, str | int | float]) -> None:
        flat = stringify(record)
        key = self.keys.health(provider)
        update = encode_update(provider, flat)
        sharded = self._sharded
        # On one Redis the script publishes too; a shard channel lives in a slot of its own.
        # An operator's switch (a drill's `disable`) lasts until it is lifted: no expiry.
        ttl = 0 if flat.get("disabled") else self.health_ttl
        args: list[str | int | bytes] = [ttl, "" if sharded else self.keys.channel, update]
        args += [part for field in flat.items() for part in field]

        async def replace_and_publish() -> None:
            await self._put_health(keys=[key], args=args)
            if sharded is not None:
                await sharded.publish(self.keys.channel, update)

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
        subscription = await self._call("subscribe", self._subscribe)
        self._subscriptions.add(subscription)
        try:
            async for message in self._messages(subscription.pubsub):
                if message["type"] == subscription.message_type and (update := decode_update(message["data"])):
                    yield update
                elif message["type"] in ENDED:
                    reason = f"{message['type']}: the server ended the subscription (its slot moved)"
                    raise self._failed("subscribe", ConnectionError(reason), trip=False)
        finally:
            self._subscriptions.discard(subscription)
            await subscription.aclose()

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

    async def _subscribe(self) -> Subscription:
        if self._sharded is not None:
            return await self._sharded.subscribe(self.keys.channel, self.timeout)
        plain = cast("Redis", self._client)  # without a sharded channel, not a cluster
        return await subscribe(plain, self.keys.channel, self.timeout)

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
        value = await self._call("count", lambda: self._count(keys=[key], args=[delta, ttl_ms]))
        return int(value)

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
            self._pending.add("release", run)
            raise

    def watch(self, events: ReplayEvents) -> None:
        """Report the replay queue (its length, writes replayed and dropped) to `events`."""
        self._pending.watch(events)

    def replay_stats(self) -> ReplayStats:
        return self._pending.stats()

    async def ping(self) -> None:
        """On a cluster, every master: a cluster with a shard down is not all there."""
        if self._sharded is not None:
            cluster = self._sharded.cluster
            await self._call("ping", lambda: cluster.ping(target_nodes="primaries"))
            return
        await self._call("ping", self._client.ping)

    async def aclose(self, *, flush_seconds: float = 1.0) -> None:
        """Later calls raise StoreUnavailable; every `health_updates` iteration ends.
        Queued writes get `flush_seconds` to be replayed; the rest are dropped."""
        await self._pending.close(flush_seconds)
        self._closed = True
        if self._learner is not None:
            self._learner.cancel()
            await asyncio.gather(self._learner, return_exceptions=True)
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()
