"""The state store: per-provider health records, daily quota counters, shared
client counters and stream leases.

    protocol     StateStore (the protocol), StoreUnavailable, Admission, Lease,
                 the pure decisions both stores share
    memory       MemoryStore: one instance, in-process dicts
    redis_store  RedisStore: shared by every replica (one Redis, Sentinel or Cluster); fails fast
    breaker      StoreBreaker: the RedisStore's circuit breaker
    pending      the queue of failed settles and releases, replayed when Redis answers
    scripts      the Redis key layout (hash tags) and Lua scripts
    channel      the health channel: classic pub/sub, or a shard channel on a cluster
    connect      the redis-py client for a URL (or a cluster's seed URLs)
    urls         Sentinel and Cluster URL parsing

redis-py is imported only when a Redis store is opened, not with this package.
"""

from proxy.state.memory import MemoryStore
from proxy.state.protocol import (
    Admission,
    HealthUpdate,
    Lease,
    Record,
    ReplayEvents,
    ReplayStats,
    StateStore,
    StoreUnavailable,
    decode_update,
    encode_update,
)
from proxy.state.redis_store import RedisStore
from proxy.state.scripts import RedisKeys
from proxy.state.urls import ClusterURL, SentinelURL, parse_cluster_url, parse_sentinel_url

__all__ = [
    "Admission",
    "ClusterURL",
    "HealthUpdate",
    "Lease",
    "MemoryStore",
    "Record",
    "RedisKeys",
    "RedisStore",
    "ReplayEvents",
    "ReplayStats",
    "SentinelURL",
    "StateStore",
    "StoreUnavailable",
    "decode_update",
    "encode_update",
    "parse_cluster_url",
    "parse_sentinel_url",
]
