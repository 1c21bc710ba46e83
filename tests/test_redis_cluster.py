"""Shared state on a Redis Cluster: the config that names one, and the proxy
end to end (the openai SDK against proxy replicas and fake providers) on a real
cluster of six `redis-server` processes (three masters, three replicas) that
the tests start themselves: one daily quota held exactly by three replicas,
a master killed mid-load, the failover, and what a request costs in Redis.

The store's own behaviour on a cluster (every call of the StateStore protocol)
is tested in test_state.py, over the same cluster."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis import Redis as SyncRedis
from redis.cluster import RedisCluster as SyncCluster

from proxy.cli import main
from proxy.config import ConfigError, RedisSettings, parse_config
from proxy.fakes import FakeOpenAI
from proxy.limits import client_id
from proxy.quota import quota_day

from .conftest import ServedApp, openai_provider
from .redis_cluster import MISSING, RedisClusterProcesses, wait_for
from .redis_server import RedisServer, ask

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
PROVIDERS = {"a": {"model": "openai/gpt-4o-2024-08-06"}}


# --- the config ------------------------------------------------------------------


def redis_section(redis: dict[str, Any], environ: dict[str, str] | None = None) -> RedisSettings:
    return parse_config({"redis": redis, "providers": PROVIDERS}, environ=environ or {}).redis


def problems(redis: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        redis_section(redis)
    return caught.value.problems


def test_a_cluster_is_named_by_its_seed_urls_as_a_list_or_comma_separated() -> None:
    seeds = "redis://:pw@a:7000,redis://:pw@b:7001"
    listed = redis_section({"cluster": True, "url": ["redis://:pw@a:7000", "redis://:pw@b:7001"]})
    assert listed == RedisSettings(url=seeds, cluster=True)
    assert redis_section({"cluster": True, "url": seeds}) == listed
    from_env = redis_section(
        {"cluster": "${REDIS_CLUSTER}", "url": "${REDIS_URL}"}, {"REDIS_URL": seeds, "REDIS_CLUSTER": "true"}
    )
    assert from_env == listed
    tls = redis_section({"cluster": True, "url": "rediss://a:7000", "health_ttl_seconds": 3600})
    assert (tls.url, tls.cluster, tls.health_ttl) == ("rediss://a:7000", True, 3600)
    assert redis_section({"url": "rediss+sentinel://s1,s2/mymaster"}).url == "rediss+sentinel://s1,s2/mymaster"


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        (
            {"url": "redis://a:7000,redis://b:7001"},
            "redis.url: several URLs are the seed nodes of a Redis Cluster: set redis.cluster: true",
        ),
        (
            {"url": ["redis://a:7000", "redis://b:7001"]},
            "redis.url: several URLs are the seed nodes of a Redis Cluster: set redis.cluster: true",
        ),
        ({"cluster": True}, "redis.cluster: true needs redis.url: the URL of one or more of the cluster's nodes"),
        (
            {"cluster": True, "url": []},
            "redis.cluster: true needs redis.url: the URL of one or more of the cluster's nodes",
        ),
        (
            {"cluster": True, "url": "unix:///run/redis.sock"},
            "redis.url: a Redis Cluster seed must be a redis:// or rediss:// URL, got unix://",
        ),
        (
            {"cluster": True, "url": "redis+sentinel://s:26379/svc"},
            "redis.url: a Redis Cluster seed must be a redis:// or rediss:// URL, got redis+sentinel://",
        ),
        (
            {"cluster": True, "url": "redis://a:7000,rediss://b:7001"},
            "redis.url: Redis Cluster seeds mix redis:// and rediss://: use one scheme for all",
        ),
        ({"cluster": True, "url": "redis://a:7000/1"}, "redis.url: a Redis Cluster has database 0 only, got /1"),
        (
            {"cluster": True, "url": ["redis://a:7000", "http://b:7001"]},
            "redis.url[1]: expected a redis://, rediss://, unix:// or redis+sentinel:// URL, got 'http://b:7001'",
        ),
        (
            {"cluster": True, "url": "redis://a:7000", "prefix": "fp{x}"},
            "redis.prefix: must not contain { or } on a Redis Cluster: every key would share one hash slot",
        ),
        ({"cluster": "maybe", "url": "redis://a"}, "redis.cluster: expected true or false, got 'maybe'"),
        (
            {"url": "redis://a", "health_ttl_seconds": 5},
            "redis.health_ttl_seconds: must be at least 60 (seconds; a record must outlive any cooldown), got 5",
        ),
    ],
)
def test_a_bad_cluster_config_names_the_key(redis: dict[str, Any], expected: str) -> None:
    assert expected in problems(redis)


def test_check_config_shows_every_seed_without_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "redis:\n  cluster: true\n  url: [rediss://:s3cret-a@a:7000, rediss://:s3cret-a@b:7001]\n"
        "providers:\n  a: {model: openai/gpt-4o-2024-08-06}\nroutes:\n  default: [a]\n"
    )
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rediss://:***@a:7000,rediss://:***@b:7001" in out
    assert "s3cret" not in out


# --- end to end on a real cluster ------------------------------------------------------


def ask_proxy(proxy: ServedApp, model: str) -> tuple[str, dict[str, str]]:
    """One request through the SDK: (provider that answered, headers)."""
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        raw.parse()
        return raw.headers["x-proxy-provider"], dict(raw.headers)


def stream_proxy(proxy: ServedApp, model: str) -> tuple[str, dict[str, str]]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with sdk.chat.completions.with_streaming_response.create(model=model, messages=MESSAGES, stream=True) as raw:
            assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            return raw.headers["x-proxy-provider"], dict(raw.headers)


def cluster_config(
    cluster: RedisClusterProcesses, prefix: str, cloud: FakeOpenAI, backup: FakeOpenAI, **extra: Any
) -> dict[str, Any]:
    return {
        # All six nodes as seeds: whichever dies, the client still finds the cluster.
        "redis": {"url": cluster.url(seeds=6), "cluster": True, "prefix": prefix, **extra.pop("redis", {})},
        "providers": {
            "cloud": openai_provider(cloud.url, quota=extra.pop("quota")),
            "backup": openai_provider(backup.url),
        },
        "routes": {"metered": ["cloud", "backup"], "free": ["backup"]},
        **extra,
    }


def admin(cluster: RedisClusterProcesses) -> SyncCluster:
    return SyncCluster(host="127.0.0.1", port=cluster.live_ports()[0], decode_responses=True)


def quota_used(cluster: RedisClusterProcesses, prefix: str, provider: str) -> int:
    with admin(cluster) as client:
        used = client.hget(f"{prefix}:{{{provider}}}:quota:{quota_day(time.time(), dt.UTC)}", "req")
    return int(used or 0)


def test_three_replicas_hold_one_daily_quota_exactly(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, redis_cluster: RedisClusterProcesses
) -> None:
    """Admission is one Lua script on the quota key's slot: however the requests
    interleave across replicas, exactly the quota is admitted. The per-client
    limits (a lease set and a rate counter in one script) run on the cluster too."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = cluster_config(
        redis_cluster,
        prefix,
        cloud,
        backup,
        quota={"requests_per_day": 13},
        # A generous timeout: this test is about atomicity, not about a slow Redis.
        redis={"timeout_ms": 2000},
        limits={"requests_per_minute": 100_000, "concurrent_streams": 1000},
    )
    replicas = [serve(config) for _ in range(3)]
    calls = [(replicas[i % 3], ask_proxy if i % 2 else stream_proxy) for i in range(45)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=15) as pool:
        answers = list(pool.map(lambda call: call[1](call[0], "metered"), calls))
    by_cloud = [h for p, h in answers if p == "cloud"]
    by_backup = [h for p, h in answers if p == "backup"]
    assert len(by_cloud) == 13 and cloud.request_count == 13
    assert len(by_backup) == 32
    assert all(h["x-proxy-fallbacks"] == "cloud=quota_exhausted" for h in by_backup)
    assert quota_used(redis_cluster, prefix, "cloud") == 13
    me = client_id("Bearer x")  # the client, by its key
    window = int(time.time() // 60)
    with admin(redis_cluster) as client:  # every request was counted once, every stream's lease given back
        counted = sum(int(client.get(f"{prefix}:{{{me}}}:count:rate:{me}:{w}") or 0) for w in (window - 1, window))
        leases = client.zcard(f"{prefix}:{{{me}}}:lease:streams:{me}")
    assert (counted, leases) == (45, 0)


def test_replicas_share_a_breaker_through_the_shard_channel(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, redis_cluster: RedisClusterProcesses
) -> None:
    """One replica sees the provider fail and opens its breaker; the other hears it
    on the shard channel and skips the provider without calling it."""
    config = cluster_config(
        redis_cluster,
        f"t{uuid.uuid4().hex[:8]}",
        cloud,
        backup,
        quota={"requests_per_day": 1000},
        # A generous timeout: this test is about the shard channel, not about a slow Redis
        # (on a busy box a quota call past the default fails closed and skips the cloud).
        redis={"timeout_ms": 2000},
    )
    config["health"] = {"failure_threshold": 1, "cooldown_seconds": 600}
    one, two = serve(config), serve(config)
    cloud.set_fault("status", status=503)
    assert ask_proxy(one, "metered")[1]["x-proxy-fallbacks"] == "cloud=server_error"
    calls = cloud.request_count

    def two_sees_the_breaker() -> bool:
        return bool(httpx.get(two.url + "/readyz").json()["health"]["cloud"]["breaker"] == "open")

    until(two_sees_the_breaker, 10, "the second replica to hear of the open breaker")
    provider, headers = ask_proxy(two, "metered")
    assert (provider, headers["x-proxy-fallbacks"]) == ("backup", "cloud=unhealthy")
    assert cloud.request_count == calls  # the second replica never called the failing provider


@dataclass
class Answer:
    route: str
    started: float
    provider: str = ""
    fallbacks: str = ""
    error: str = ""


class Load:
    """Threads sending requests to the replicas without pause, round robin, each
    noting what came back; `routes` says which routes they ask (changed on the fly)."""

    def __init__(self, replicas: list[ServedApp], threads: int = 6) -> None:
        self.replicas = replicas
        self.routes = ["metered", "free"]
        self.answers: list[Answer] = []
        self.in_flight: dict[str, int] = {"metered": 0, "free": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, seed: int) -> None:
        turn = seed
        while not self._stop.is_set():
            turn += 1
            routes = self.routes
            answer = Answer(routes[turn % len(routes)], time.monotonic())
            with self._lock:
                self.in_flight[answer.route] += 1
            try:
                answer.provider, headers = ask_proxy(self.replicas[turn % len(self.replicas)], answer.route)
                answer.fallbacks = headers.get("x-proxy-fallbacks", "")
            except openai.OpenAIError as exc:
                answer.error = repr(exc)
            with self._lock:
                self.in_flight[answer.route] -= 1
                self.answers.append(answer)

    def since(self, moment: float, route: str) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.started >= moment and a.route == route]


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcesses]:
    """A cluster of this test's own: it kills one of the nodes."""
    if MISSING:
        pytest.skip(MISSING)
    cluster = RedisClusterProcesses(node_timeout_ms=1000).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    wait_for(condition, timeout, what)


@pytest.mark.slow
def test_a_master_killed_mid_load_fails_closed_then_counting_resumes_after_failover(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, own_cluster: RedisClusterProcesses
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = cluster_config(
        own_cluster, prefix, cloud, backup, quota={"requests_per_day": 1_000_000}, redis={"breaker_seconds": 0.5}
    )
    replicas = [serve(config) for _ in range(3)]
    for proxy in replicas:
        assert ask_proxy(proxy, "metered")[0] == "cloud"
    master = own_cluster.master_for("{cloud}")  # holds the quota counter of `cloud`
    replica = own_cluster.replica_of(master)
    # The replica takes over only when the test says so: the outage lasts as long as the test needs.
    assert ask(replica.port, b"CONFIG SET cluster-replica-no-failover yes").startswith(b"+OK")

    with Load(replicas) as load:
        until(lambda: len(load.since(0, "metered")) >= 10 and len(load.since(0, "free")) >= 10, 20, "some load")
        own_cluster.kill(master.port)
        killed = time.monotonic()

        def failing_closed() -> bool:
            return any(a.provider == "backup" for a in load.since(killed, "metered"))

        until(failing_closed, 10, "the quota gate to fail closed")
        # With only the free route under load, nothing else may call the quota'd provider.
        load.routes = ["free"]
        until(lambda: load.in_flight["metered"] == 0, 10, "metered requests under way to end")
        calls = cloud.request_count
        for proxy in replicas:
            provider, headers = ask_proxy(proxy, "metered")
            assert (provider, headers["x-proxy-fallbacks"]) == ("backup", "cloud=quota_exhausted")
            assert ask_proxy(proxy, "free")[0] == "backup"  # no quota: answers as ever
        assert cloud.request_count == calls  # fail closed: the provider with a quota was not called
        ready = httpx.get(replicas[0].url + "/readyz")
        assert ready.status_code == 200 and ready.json()["store"]["status"].startswith("unavailable"), ready.text
        load.routes = ["metered", "free"]

        assert ask(replica.port, b"CONFIG SET cluster-replica-no-failover no").startswith(b"+OK")
        own_cluster.wait_promoted(replica, timeout=30)  # automatic: its master is gone

        def resumed() -> bool:
            return all(ask_proxy(proxy, "metered")[0] == "cloud" for proxy in replicas)

        until(resumed, 20, "every replica to call the quota'd provider again")

        def store_ok() -> bool:
            return all(httpx.get(p.url + "/readyz").json()["store"]["status"] == "ok" for p in replicas)

        until(store_ok, 20, "every replica to find every master answering")
    metered, free = load.since(0, "metered"), load.since(0, "free")
    assert not [a for a in metered + free if a.error], "a client saw an error"
    assert {a.provider for a in free} == {"backup"}
    outage = [a for a in metered if a.provider == "backup"]
    assert outage and {a.fallbacks for a in outage} == {"cloud=quota_exhausted"}

    # Counting resumed on the promoted replica: each call admitted is one more on the counter.
    before = quota_used(own_cluster, prefix, "cloud")
    for i in range(9):
        assert ask_proxy(replicas[i % 3], "metered")[0] == "cloud"
    assert quota_used(own_cluster, prefix, "cloud") == before + 9


# --- what a request costs in Redis --------------------------------------------------


class Monitor:
    """MONITOR on each of `ports`, on sockets of its own: the commands clients sent
    (one line each); those a Lua script runs are marked `lua` and are no round trips."""

    def __init__(self, ports: list[int]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for port in ports]
        self.threads = [threading.Thread(target=self._read, args=(sock,), daemon=True) for sock in self.socks]
        for sock, thread in zip(self.socks, self.threads, strict=True):
            sock.sendall(b"MONITOR\r\n")
            thread.start()
        wait_for(lambda: self.lines.count("+OK") == len(ports), 5, "MONITOR to start")

    def _read(self, sock: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            *lines, buffer = (buffer + chunk).split(b"\r\n")
            with self._lock:
                self.lines.extend(line.decode(errors="replace") for line in lines)

    def commands(self) -> list[str]:
        """The commands clients sent, by name (not a script's own)."""
        with self._lock:
            lines = [line for line in self.lines if line != "+OK" and " lua] " not in line]
        return [match.group(1).lower() if (match := re.search(r'\] "([^"]+)"', line)) else line for line in lines]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        for thread in self.threads:
            thread.join(2)


def commands_per_request(
    proxy: ServedApp, ports: list[int], requests: int, client: SyncCluster | SyncRedis, prefix: str
) -> dict[str, float]:
    """Every command the replica sends while answering `requests` metered requests."""
    warm_up = 5
    for _ in range(warm_up):  # warm: connections open, scripts loaded, the slot map known
        ask_proxy(proxy, "metered")
    # The warm-up's settlements land before MONITOR starts: each removes the mark its admission
    # left in the quota hash, so the hash counts every call and holds no mark.
    key = f"{prefix}:{{cloud}}:quota:{quota_day(time.time(), dt.UTC)}"

    def settled() -> bool:
        fields = client.hgetall(key)
        return int(fields.get("req", 0)) == warm_up and not any(name.startswith("m:") for name in fields)

    wait_for(settled, 10, "the warm-up's settlements")
    monitor = Monitor(ports)
    try:
        for _ in range(requests):
            assert ask_proxy(proxy, "metered")[0] == "cloud"
        wait_for(lambda: monitor.commands().count("evalsha") >= 2 * requests, 10, "every settlement")
        time.sleep(0.2)  # the interval is the point: nothing more comes
        sent = monitor.commands()
    finally:
        monitor.close()
    return {command: sent.count(command) / requests for command in sorted(set(sent))}


def test_a_request_costs_the_same_round_trips_on_a_cluster_as_on_one_redis(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, redis_cluster: RedisClusterProcesses
) -> None:
    """Admission and settlement: two EVALSHA per request, each sent straight to the
    master of the provider's slot: no redirection (MOVED, ASK), no slot map lookups
    (CLUSTER SLOTS) on the way, no round trip more than on one Redis."""
    requests = 25
    prefix = f"t{uuid.uuid4().hex[:8]}"
    quota = {"requests_per_day": 1_000_000}
    on_cluster = serve(cluster_config(redis_cluster, prefix, cloud, backup, quota=quota))
    masters = [node.port for node in redis_cluster.masters()]
    with admin(redis_cluster) as client:
        cluster_costs = commands_per_request(on_cluster, masters, requests, client, prefix)

    single = RedisServer().start()
    try:
        config = cluster_config(redis_cluster, prefix, cloud, backup, quota=quota)
        config["redis"] = {"url": single.url, "prefix": prefix}
        with SyncRedis(port=single.port, decode_responses=True) as client:
            single_costs = commands_per_request(serve(config), [single.port], requests, client, prefix)
    finally:
        single.stop()
    print(f"\nRedis commands per request: cluster {cluster_costs}, one Redis {single_costs}")
    # Background work (a pub/sub ping, a replica's own traffic) may tick once or twice in a run.
    for costs in (cluster_costs, single_costs):
        assert costs.get("evalsha") == 2.0, costs
        assert sum(costs.values()) - 2.0 <= 4 / requests, costs
