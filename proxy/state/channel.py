"""The health channel: how a RedisStore hears every replica's health records.

On one Redis (or a Sentinel's master) it is a classic channel (SUBSCRIBE /
PUBLISH). On a Redis Cluster it is a shard channel (Redis 7 sharded pub/sub,
SSUBSCRIBE / SPUBLISH): a classic PUBLISH would be broadcast over the cluster
bus to every node, a shard channel's messages go only to the shard that owns
its hash slot. The subscriber holds a connection of its own to that shard's
master; when the master dies, or the slot moves away from it, the subscription
ends (the store raises StoreUnavailable) and the caller subscribes again, to
the new owner.

redis-py is imported only when a subscription is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import RedisCluster


@dataclass(slots=True, eq=False)  # compared and hashed by identity: kept in a set
class Subscription:
    """One subscription to the health channel: its messages are of `message_type`;
    a client of its own (a cluster node's) is closed with it."""

    pubsub: PubSub
    message_type: str = "message"
    owner: Redis | None = None

    async def aclose(self) -> None:
        await self.pubsub.aclose()
        if self.owner is not None:
            await self.owner.aclose()


# A subscription the server ended on its own: the shard channel's slot moved to
# another node (a failover, a reshard). Ours never unsubscribe.
ENDED = frozenset({"unsubscribe", "sunsubscribe"})


async def subscribe(client: Redis, channel: str, confirm_timeout: float) -> Subscription:
    """SUBSCRIBE on one Redis, through its pool."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=confirm_timeout)  # the subscribe confirmation
    except BaseException:
        await pubsub.aclose()
        raise
    return Subscription(pubsub)


class ShardedChannel:
    """The health channel of a Redis Cluster: SPUBLISH through the cluster client,
    SSUBSCRIBE on a connection of its own to the master that owns the channel's
    slot, built with `node_options` (credentials, TLS, timeouts)."""

    def __init__(self, cluster: RedisCluster, node_options: Mapping[str, Any]) -> None:
        self.cluster = cluster
        self.node_options = dict(node_options)

    def __repr__(self) -> str:
        return "<ShardedChannel>"

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.cluster.spublish(channel, payload)

    async def subscribe(self, channel: str, confirm_timeout: float) -> Subscription:
        from redis.asyncio import Redis

        # A read routed like the channel (same name, same slot) finds its owner
        # through the cluster client: a moved slot updates the client's map, a
        # dead owner makes it refresh the map before its next call.
        await self.cluster.exists(channel)
        node = self.cluster.get_node_from_key(channel)
        if node is None:
            raise ConnectionError(f"no node serves the slot of {channel!r}")
        owner = Redis(host=node.host, port=int(node.port), **self.node_options)
        pubsub = owner.pubsub()
        try:
            await pubsub.ssubscribe(channel)
            await pubsub.get_message(timeout=confirm_timeout)  # the ssubscribe confirmation
        except BaseException:
            await pubsub.aclose()
            await owner.aclose()
            raise
        return Subscription(pubsub, "smessage", owner)
