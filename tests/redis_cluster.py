"""A throwaway Redis Cluster for tests: six `redis-server --cluster-enabled yes`
processes joined by `redis-cli --cluster create --cluster-replicas 1` (three
masters, each with a replica that can be promoted when its master dies).

`python -m tests.redis_cluster` measures what a quota costs in the store, on one
Redis and on such a cluster: the time of one admission and its settlement, one
after another and 64 at a time."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from redis.crc import key_slot

from proxy.state import RedisStore

from .redis_server import REDIS_SERVER, RedisServer, ask

REDIS_CLI = shutil.which("redis-cli")
MISSING = (
    None
    if REDIS_SERVER and REDIS_CLI
    else "redis-server and redis-cli are needed to start a Redis Cluster (Debian: apt-get install redis-server)"
)
BUS_OFFSET = 10_000  # a cluster node also listens on port + 10000 (the cluster bus)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A port that is free and whose bus port (port + 10000) is free too. Drawn
    below the usual ephemeral range (32768-60999), where the system does not
    hand out ports of its own."""
    for _ in range(1000):
        port = random.randint(12_000, 22_000)
        if not {port, port + BUS_OFFSET} & taken and _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True, slots=True)
class Node:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    master: bool
    master_id: str  # "-" for a master
    failed: bool
    slots: tuple[str, ...]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class RedisClusterProcesses:
    """Six cluster nodes on 127.0.0.1; `node_timeout_ms` is how long a master may
    stay silent before its replica takes over."""

    def __init__(self, *, node_timeout_ms: int = 1000, size: int = 6) -> None:
        if MISSING:
            raise RuntimeError(MISSING)
        self.node_timeout_ms = node_timeout_ms
        self.size = size
        self.servers: dict[int, RedisServer] = {}

    def __repr__(self) -> str:
        return f"<RedisClusterProcesses ports={sorted(self.servers)}>"

    @property
    def ports(self) -> list[int]:
        return sorted(self.servers)

    def url(self, *, seeds: int = 2) -> str:
        """Comma-separated seed URLs (the first `seeds` nodes)."""
        return ",".join(f"redis://127.0.0.1:{port}" for port in self.ports[:seeds])

    def start(self) -> RedisClusterProcesses:
        try:
            self._start_nodes()
            self._create()
            self.wait_healthy(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        taken: set[int] = set()
        while len(self.servers) < self.size:
            port = free_cluster_port(taken)
            taken |= {port, port + BUS_OFFSET}
            server = RedisServer(
                port,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    # A failover needs only the replica's own view: promote it at once.
                    "--cluster-replica-validity-factor",
                    "0",
                ],
            )
            try:
                server.start(same_port=True)
            except RuntimeError:
                server.stop()  # the port was taken meanwhile: draw another
                continue
            self.servers[port] = server

    def _create(self) -> None:
        assert REDIS_CLI is not None
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        done = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-500:]!r} {done.stderr[-500:]!r}")

    def nodes(self, port: int | None = None) -> list[Node]:
        """CLUSTER NODES as seen by `port` (by default any node that answers)."""
        for asked in [port] if port else self.live_ports():
            reply = _ask_text(asked, b"CLUSTER NODES")
            if reply:
                return [_node(line) for line in reply.splitlines() if line.strip()]
        return []

    def live_ports(self) -> list[int]:
        return [port for port, server in sorted(self.servers.items()) if server.process is not None]

    def masters(self) -> list[Node]:
        return [node for node in self.nodes() if node.master and not node.failed and node.slots]

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says the cluster is ok, three masters serve all
        slots, and every live master has a replica in sync."""
        wait_for(self._healthy, timeout, f"{self!r} to be healthy")

    def _healthy(self) -> bool:
        try:
            if not all(b"cluster_state:ok" in ask(port, b"CLUSTER INFO") for port in self.live_ports()):
                return False
            masters = self.masters()
            if len(masters) != 3:
                return False
            for node in self.nodes():
                if not node.master and not node.failed:
                    info = ask(node.port, b"INFO replication")
                    if b"master_link_status:up" not in info:
                        return False
            return True
        except OSError:
            return False

    def master_for(self, key: str) -> Node:
        """The live master serving the slot of `key` (a shard channel's name hashes alike)."""
        slot = key_slot(key.encode())
        for node in self.masters():
            for part in node.slots:
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return node
        raise LookupError(f"no master serves slot {slot}")

    def failover(self, master: Node) -> Node:
        """`CLUSTER FAILOVER` on `master`'s replica: the two swap roles, nothing is lost.
        Returns the replica, to wait for with `wait_promoted`."""
        replica = self.replica_of(master)
        if not ask(replica.port, b"CLUSTER FAILOVER").startswith(b"+OK"):
            raise RuntimeError(f"CLUSTER FAILOVER refused by :{replica.port}")
        return replica

    def replica_of(self, master: Node) -> Node:
        return next(node for node in self.nodes() if node.master_id == master.id)

    def kill(self, port: int) -> None:
        self.servers[port].kill()

    def wait_promoted(self, replica: Node, timeout: float = 30) -> None:
        """Until `replica` is a master with slots and the cluster is ok again."""

        def promoted() -> bool:
            try:
                mine = [node for node in self.nodes(replica.port) if node.id == replica.id]
                state = ask(replica.port, b"CLUSTER INFO")
            except OSError:
                return False
            return bool(mine and mine[0].master and mine[0].slots) and b"cluster_state:ok" in state

        wait_for(promoted, timeout, f"node :{replica.port} to be promoted")

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


def _ask_text(port: int, command: bytes, timeout: float = 2.0) -> str:
    """The text of a bulk string reply (`$<len>\\r\\n<text>\\r\\n`), read whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                return ""
            reply += chunk
        header, _, body = reply.partition(b"\r\n")
        if not header.startswith(b"$"):
            return ""
        length = int(header[1:])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return ""
            body += chunk
        return body[:length].decode()


def _node(line: str) -> Node:
    # <id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <config-epoch> <link-state> <slot> ...
    fields = line.split()
    flags = fields[2].split(",")
    return Node(
        id=fields[0],
        port=int(fields[1].split("@")[0].rpartition(":")[2]),
        master="master" in flags,
        master_id=fields[3],
        failed="fail" in flags or "fail?" in flags,
        slots=tuple(fields[8:]),
    )


async def _admit_and_settle(store: RedisStore, provider: str) -> None:
    call = uuid.uuid4().hex
    quota = {"requests_limit": None, "tokens_limit": None}
    await store.admit(provider, "day", **quota, tokens_estimate=10, ttl_seconds=600, call_id=call)
    await store.settle(provider, "day", requests_delta=0, tokens_delta=-3, ttl_seconds=600, call_id=call)


async def _measure(store: RedisStore, pairs: int) -> str:
    for _ in range(50):
        await _admit_and_settle(store, "warm")
    took = []
    for _ in range(pairs):
        started = time.perf_counter()
        await _admit_and_settle(store, "p")
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    started = time.perf_counter()
    for first in range(0, pairs, 64):
        await asyncio.gather(*(_admit_and_settle(store, f"p{i % 8}") for i in range(first, first + 64)))
    rate = pairs / (time.perf_counter() - started)
    p50, p99 = statistics.median(took), took[int(len(took) * 0.99)]
    return f"admit+settle p50 {p50:.3f} ms, p99 {p99:.3f} ms; 64 at a time over 8 providers: {rate:,.0f}/s"


async def _main(pairs: int = 2000) -> None:
    single, cluster = RedisServer().start(), RedisClusterProcesses().start()
    try:
        for name, store in (
            ("one Redis    ", RedisStore.from_url(single.url, timeout=1.0)),
            ("Redis Cluster", RedisStore.from_url(cluster.url(seeds=3), cluster=True, timeout=1.0)),
        ):
            print(f"{name}: {await _measure(store, pairs)}")
            await store.aclose()
    finally:
        single.stop()
        cluster.stop()


if __name__ == "__main__":
    asyncio.run(_main())
