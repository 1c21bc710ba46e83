"""Counters end exact across Redis outages: failed settles and lease releases are
queued and replayed once Redis is back; a settle or refund applies once, and
only for an admission that counted. Each test starts its own `redis-server`
(append-only, fsync before each reply, so a SIGKILL loses no acknowledged write)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from proxy.config import LimitSettings
from proxy.errors import ClientRateLimited
from proxy.limits import ClientLimits
from proxy.metrics import Metrics
from proxy.observe import OperatorEvents
from proxy.quota import QuotaGate
from proxy.state import Lease, RedisStore, ReplayStats, StoreUnavailable
from tests.redis_server import REDIS_SERVER
from tests.soak.procs import DurableRedis

DAY = "2025-01-31"
TTL = 86400


@pytest.fixture
def durable() -> Iterator[DurableRedis]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = DurableRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def store_on(server: DurableRedis, **options: float) -> RedisStore:
    return RedisStore.from_url(server.url, breaker_seconds=0.1, **options)  # type: ignore[arg-type]


def watched(store: RedisStore) -> CollectorRegistry:
    """The registry whose metrics the store's replay queue moves, wired as the app wires it."""
    registry = CollectorRegistry()
    QuotaGate(store, "UTC", OperatorEvents(Metrics(registry)))
    return registry


def queue_metrics(registry: CollectorRegistry) -> tuple[float | None, ...]:
    return tuple(
        registry.get_sample_value(name)
        for name in (
            "fallback_proxy_store_pending",
            "fallback_proxy_store_replayed_total",
            "fallback_proxy_store_dropped_total",
        )
    )


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_settle_that_meets_a_dead_redis_is_replayed_once_it_is_back(durable: DurableRedis) -> None:
    store = store_on(durable)
    registry = watched(store)
    try:
        admission = await store.admit(
            "p", DAY, requests_limit=None, tokens_limit=10_000, tokens_estimate=512, ttl_seconds=TTL, call_id="call-1"
        )
        assert admission.admitted and await store.usage("p", DAY) == (1, 512)
        durable.kill()
        with pytest.raises(StoreUnavailable):
            await store.settle("p", DAY, requests_delta=0, tokens_delta=40 - 512, ttl_seconds=TTL, call_id="call-1")
        assert store.pending == 1
        # The interval is the point: over a few of the replayer's tries (each 0.1 s, the breaker's
        # time) against the dead Redis, the write is kept, neither dropped nor counted as replayed.
        await asyncio.sleep(0.3)
        assert store.pending == 1 and queue_metrics(registry) == (1, 0, 0)
        durable.restart()

        async def replayed() -> bool:
            return store.pending == 0

        await eventually(replayed)
        assert await store.usage("p", DAY) == (1, 40)  # the real usage, not the estimate
        assert store.replayed == 1 and queue_metrics(registry) == (0, 1, 0)
        # A second delivery of the same settle (its first reply lost) changes nothing.
        await store.settle("p", DAY, requests_delta=0, tokens_delta=40 - 512, ttl_seconds=TTL, call_id="call-1")
        assert await store.usage("p", DAY) == (1, 40)
    finally:
        await store.aclose()


@pytest.mark.asyncio
async def test_a_full_replay_queue_drops_the_oldest_and_closing_drops_the_rest(durable: DurableRedis) -> None:
    store = store_on(durable, pending_limit=2)
    registry = watched(store)
    for call in ("a", "b"):
        await store.admit(
            "p", DAY, requests_limit=None, tokens_limit=None, tokens_estimate=0, ttl_seconds=TTL, call_id=call
        )
    durable.kill()
    for call in ("a", "b", "c"):
        with pytest.raises(StoreUnavailable):
            await store.settle("p", DAY, requests_delta=-1, tokens_delta=0, ttl_seconds=TTL, call_id=call)
    assert store.replay_stats() == ReplayStats(pending=2, replayed=0, dropped=1)
    assert queue_metrics(registry) == (2, 0, 1)
    await store.aclose(flush_seconds=0.05)  # Redis is still down: the two left are given up
    assert store.replay_stats() == ReplayStats(pending=0, replayed=0, dropped=3)
    assert queue_metrics(registry) == (0, 0, 3)


@pytest.mark.asyncio
async def test_an_admission_whose_reply_is_lost_is_given_back_only_if_it_counted(durable: DurableRedis) -> None:
    store = store_on(durable, timeout=0.05)
    try:
        await store.ping()
        durable.pause()  # the admit is sent; Redis runs it (or not) only after it resumes
        with pytest.raises(StoreUnavailable) as caught:
            await store.admit(
                "p", DAY, requests_limit=10, tokens_limit=None, tokens_estimate=0, ttl_seconds=TTL, call_id="lost"
            )
        assert caught.value.maybe_applied and store.pending == 1
        durable.resume()

        async def settled() -> bool:
            return store.pending == 0

        await eventually(settled)
        assert await store.usage("p", DAY) == (0, 0)  # not called, not counted, whatever Redis did
        # A refund for an admission that never counted changes nothing either.
        await store.admit(
            "p", DAY, requests_limit=10, tokens_limit=None, tokens_estimate=0, ttl_seconds=TTL, call_id="real"
        )
        await store.settle("p", DAY, requests_delta=-1, tokens_delta=0, ttl_seconds=TTL, call_id="never-admitted")
        assert await store.usage("p", DAY) == (1, 0)
    finally:
        await store.aclose()


@pytest.mark.asyncio
async def test_an_open_stream_whose_release_meets_a_dead_redis_does_not_lock_the_key_out(
    durable: DurableRedis,
) -> None:
    store = store_on(durable)
    errors: list[tuple[str, StoreUnavailable]] = []
    limits = ClientLimits(LimitSettings(concurrent_streams=1), store, lambda op, exc: errors.append((op, exc)))
    try:
        ticket = await limits.enter("client-a", stream=True)
        with pytest.raises(ClientRateLimited):
            await limits.enter("client-a", stream=True)
        durable.kill()
        await limits.leave(ticket)  # Redis is down: the release is queued
        assert [op for op, _ in errors] == ["release_lease"] and store.pending == 1
        durable.restart()

        async def released() -> bool:
            return store.pending == 0

        await eventually(released)
        await limits.leave(await limits.enter("client-a", stream=True))  # the key is not locked out
    finally:
        await store.aclose()


@pytest.mark.asyncio
async def test_a_lease_left_by_a_crashed_replica_expires_by_itself(durable: DurableRedis) -> None:
    crashed, alive = store_on(durable), store_on(durable)
    try:
        settings = LimitSettings(concurrent_streams=2)
        await ClientLimits(settings, crashed, lambda op, exc: None, lease_seconds=0.3).enter("client-b", stream=True)
        await crashed.aclose()  # never leaves
        limits = ClientLimits(settings, alive, lambda op, exc: None, lease_seconds=0.3)
        second = await limits.enter("client-b", stream=True)
        with pytest.raises(ClientRateLimited):
            await limits.enter("client-b", stream=True)
        await limits.leave(second)
        held = [await limits.enter("client-b", stream=True)]

        async def crashed_lease_expired() -> bool:
            try:
                held.append(await limits.enter("client-b", stream=True))
            except ClientRateLimited:
                return False
            return True

        await eventually(crashed_lease_expired)  # a second stream fits once the crashed one's lease ran out
        assert all(ticket.lease for ticket in held)
    finally:
        await alive.aclose()


@pytest.mark.asyncio
async def test_leases_are_shared_by_replicas_and_a_release_is_idempotent(durable: DurableRedis) -> None:
    one, two = store_on(durable), store_on(durable)
    try:
        assert await one.acquire_lease("streams:c", "s1", limit=2, ttl_seconds=60) == Lease(True, 1)
        assert await two.acquire_lease("streams:c", "s2", limit=2, ttl_seconds=60) == Lease(True, 2)
        assert await one.acquire_lease("streams:c", "s3", limit=2, ttl_seconds=60) == Lease(False, 2)
        await two.release_lease("streams:c", "s1")
        await one.release_lease("streams:c", "s1")
        assert await one.acquire_lease("streams:c", "s3", limit=2, ttl_seconds=60) == Lease(True, 2)
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.asyncio
async def test_many_concurrent_calls_wait_for_a_pooled_connection_instead_of_failing(durable: DurableRedis) -> None:
    store = store_on(durable, max_connections=1, timeout=0.2, pool_wait=2.0)
    busy_loop = (
        "local t = redis.call('TIME') local stop = t[1] * 1e6 + t[2] + 50000 "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop return 1"
    )

    async def slow_call() -> object:  # 50 ms of Redis's time: 10 of them queue for 0.5 s
        return await store._call("slow", lambda: store._client.eval(busy_loop, 0))

    try:
        assert await asyncio.gather(*(slow_call() for _ in range(10))) == [1] * 10
        assert store.busy == 0 and store.failures == 0 and not store.breaker_open
    finally:
        await store.aclose()


def test_importing_the_state_store_does_not_import_redis() -> None:
    code = "import sys, proxy.state, proxy.quota, proxy.limits; print(any(m.startswith('redis') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
