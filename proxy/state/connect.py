"""The redis-py client behind a RedisStore, built from a URL.

`redis://`, `rediss://`, `unix://` or `redis+sentinel://`; or, with `cluster`,
the seed nodes of a Redis Cluster. Connects lazily. No retries inside redis-py
(the store decides what a failure means), a blocking pool with room for pub/sub
subscribers, and stale connections checked and replaced after a Redis restart.
redis-py is imported here only when a client is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.state.urls import SENTINEL_SCHEMES, parse_cluster_url, parse_sentinel_url

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
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

    options = _options(timeout, connect_timeout, max_connections)
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


def open_cluster(
    url: str,
    *,
    timeout: float,
    connect_timeout: float,
    max_connections: int,
) -> tuple[RedisCluster, dict[str, Any]]:
    """A Redis Cluster client for comma-separated seed URLs, and the options of a
    client of one of its nodes (the health channel's subscriber connects to the
    node that owns the channel's slot). `max_connections` is per node; query
    parameters of the seeds are passed to redis-py and win over these."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import parse_url

    parsed = parse_cluster_url(url)
    options = _options(timeout, connect_timeout, max_connections)
    # redis-py casts the query parameters as it does for a plain URL.
    scheme = "rediss" if parsed.ssl else "redis"
    query: Mapping[str, Any] = parse_url(f"{scheme}://seed/?{parsed.options}")
    options.update({k: v for k, v in query.items() if k not in ("host", "port", "db", "connection_class")})
    options.update(ssl=parsed.ssl, username=parsed.username, password=parsed.password)
    node_options = {**options, "max_connections": PUBSUB_HEADROOM}
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        # No retries here either: a command that failed (a dead master) fails
        # fast; redis-py refreshes the slot map before the next one.
        **options,
    )
    return cluster, node_options


def _options(timeout: float, connect_timeout: float, max_connections: int) -> dict[str, Any]:
    """What every client of the store is built with."""
    from redis.maint_notifications import MaintNotificationsConfig

    return {
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


def _no_retry() -> Retry:
    """No retries, and no failure callback either. redis-py's default is 10 retries
    with backoff up to 1 s; `retry=None` still runs the callback once, which for
    pub/sub means reconnecting (even to a store being closed) before raising."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0, supported_errors=())
