"""The Redis layout: key names and the Lua scripts that change them atomically.

`fp` is the prefix; every key of one provider carries the Redis Cluster hash
tag `{provider}`, and every key of one client the tag `{client}`, so a script
only ever touches one slot (LEASE_LUA's lease set and counter are the same
client's):

    fp:{openai-4o}:health           hash: the provider's health record (expires a day,
                                    by default, after its last change)
    fp:{openai-4o}:quota:2025-01-31 hash: req, tok, m:<call id> for each admitted call not
                                    yet settled (expires ttl_seconds after creation)
    fp:{<client>}:count:rate:<client>:<window>  a counter (INCRBY, PEXPIRE)
    fp:{<client>}:lease:streams:<client>  sorted set: member = stream id, score = lease
                                    expiry (ms, Redis's clock)
    fp:{openai-4o}:lock:probe:openai-4o   SET NX PX lock
    fp:health                       pub/sub channel: {"provider": ..., "record": {...}}
                                    (a shard channel on a Redis Cluster)

The admit script leaves the mark `m:<id>` in the quota hash; the settle script
applies only if it removes that mark. The scripts mirror `protocol.admits` and
`protocol.settled`.

Every write of more than one command is a script rather than a MULTI: on a
cluster whose slot moved (a failover, a reshard), redis-py follows the MOVED
answer to a script, while a MULTI fails.
"""

from __future__ import annotations

from dataclasses import dataclass


def _hash_tag(name: str) -> str:
    # Redis hashes what lies between the first `{` and the next `}`; an empty tag is
    # none at all (the whole key is hashed). So no `}` inside, and never empty.
    return "{" + (name.replace("}", "") or "_") + "}"


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

# KEYS: the health record. ARGV: ttl_seconds, channel ('': publish nothing), update, then
# field, value, ... Replaces the record (none: deleted), and publishes the update in the
# same step where the channel may be published from here (one Redis, not a cluster).
PUT_HEALTH_LUA = """
redis.call('DEL', KEYS[1])
if #ARGV > 3 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
  if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"""

# KEYS: the counter. ARGV: delta, ttl_ms. Returns the new value; the counter expires ttl_ms
# after its last change.
COUNT_LUA = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return value
"""

SCRIPTS = (ADMIT_LUA, SETTLE_LUA, LEASE_LUA, PUT_HEALTH_LUA, COUNT_LUA)
