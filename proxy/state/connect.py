"""The redis-py client behind a RedisStore, built from a URL.

`redis://`, `rediss://`, `unix://` or `redis+sentinel://`; connects lazily.
No retries inside redis-py (the store decides what a failure means), a
blocking pool with room for pub/sub subscribers, and stale connections
checked and replaced after a Redis restart. redis-py is imported here only
when a client is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.state.urls import SENTINEL_SCHEMES, parse_sentinel_url

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel

PUBSUB_HEADROOM = 4  # pool connections beyond max_connections, for health_updates subscribers


def open_client(
    url: str,
    *,
    timeout: float,
    connect_timeout: float,
    max_connections: int,
    pool_wait: float,
) -> tuple[Redis, Sentinel | None]:
    """A client for `url` (and the Sentinel it asks, if any). Query parameters of
    a plain URL are passed to redis-py and win over these."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.sentinel import Sentinel
    from redis.maint_notifications import MaintNotificationsConfig

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": _no_retry(),
        "health_check_interval": 0,
        "decode_responses": True,
        "max_connections": max_connections + PUBSUB_HEADROOM,
        # redis-py 8 leaves its stale-connection check off while maintenance
        # notifications are "auto": after a Redis restart every pooled
        # connection would fail once (and reopen the breaker). Off, they are
        # checked and replaced.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    if url.partition("://")[0].lower() in SENTINEL_SCHEMES:
        parsed = parse_sentinel_url(url)
        sentinel = Sentinel(
            list(parsed.hosts),
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": connect_timeout,
                "retry": _no_retry(),
                "password": parsed.sentinel_password,
            },
        )
        client = sentinel.master_for(
            parsed.service,
            db=parsed.db,
            username=parsed.username,
            password=parsed.password,
            ssl=parsed.ssl,
            **options,
        )
        return client, sentinel
    # Calls are bounded by the store's own semaphore; pub/sub subscribers
    # beyond the headroom wait for a connection instead of failing.
    pool = BlockingConnectionPool.from_url(url, timeout=pool_wait, **options)
    return Redis.from_pool(pool), None


def _no_retry() -> Retry:
    """No retries, and no failure callback either. redis-py's default is 10 retries
    with backoff up to 1 s; `retry=None` still runs the callback once, which for
    pub/sub means reconnecting (even to a store being closed) before raising."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0, supported_errors=())
