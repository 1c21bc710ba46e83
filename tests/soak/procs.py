"""The soak's processes: a Redis that survives SIGKILL, fake providers, the proxy,
and what /proc says about the proxy (memory, file descriptors, sockets)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from tests.redis_server import RedisServer


class DurableRedis(RedisServer):
    """redis-server with an append-only file written before every reply, so that
    SIGKILL and a restart on the same port keep every acknowledged counter. Its
    files live in /dev/shm when there is one: a disk's fsync latency would show
    up as Redis timeouts that have nothing to do with the proxy."""

    def __init__(self) -> None:
        super().__init__()
        if Path("/dev/shm").is_dir():
            self.dir.rmdir()
            self.dir = Path(tempfile.mkdtemp(prefix="fp-soak-redis-", dir="/dev/shm"))

    def _argv(self) -> list[str]:
        argv = super()._argv()
        at = argv.index("--appendonly")
        argv[at + 1] = "yes"
        return [*argv, "--appendfsync", "always"]

    def restart(self) -> None:
        self.start(same_port=True)


class Child:
    """A child process with its output in a log file; killed by `close`."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("ab")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._out.close()
        return self.process.returncode


def start_fake(name: str, port: int, reply: str, logs: Path) -> Child:
    argv = [sys.executable, "-m", "tests.soak.fake", "--port", str(port), "--name", name, "--reply", reply]
    return Child(argv, logs / f"fake-{name}.log")


def start_proxy(config: Path, port: int, logs: Path) -> Child:
    exe = shutil.which("fallback-proxy", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "proxy.cli"]
    return Child(
        [*command, "serve", "--config", str(config), "--port", str(port), "--log-level", "info"], logs / "proxy.log"
    )


def wait_http(url: str, child: Child, timeout: float = 30.0) -> None:
    """Until `url` answers 200 (the child must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.process.args!r} exited with {child.process.returncode}; see {child.log}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s; see {child.log}")


# --- /proc ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The proxy process at one moment."""

    t: float  # seconds since the load started (negative: before)
    label: str
    cpu_seconds: float  # user + system, since the process started
    rss_mb: float
    threads: int
    fds: int
    sockets: Counter[str]  # live by peer (clients, upstream, redis, other), listen, unix, dead (dead-<peer>)

    def row(self, previous: Sample | None) -> str:
        peers = " ".join(f"{k}={v}" for k, v in sorted(self.sockets.items()) if v)
        cpu = "    "
        if previous is not None and self.t > previous.t:
            cpu = f"{100 * (self.cpu_seconds - previous.cpu_seconds) / (self.t - previous.t):3.0f}%"
        return (
            f"{self.t:7.1f}s  {self.label:<9} cpu {cpu}  rss {self.rss_mb:6.1f} MB  fds {self.fds:4d}  "
            f"threads {self.threads:2d}  sockets: {peers}"
        )


def sample(
    pid: int,
    t: float,
    label: str,
    *,
    own_port: int,
    upstream_ports: set[int],
    redis_port: int,
    peers: dict[str, str] | None = None,
) -> Sample:
    """The process now. `peers` remembers each socket's peer across samples, so that
    a socket reset since (no longer in the TCP tables) is still attributed."""
    peers = {} if peers is None else peers
    status = _status(pid)
    inodes: set[str] = set()
    fds = 0
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        fds += 1
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    sockets: Counter[str] = Counter(clients=0, upstream=0, redis=0, listen=0, other=0, dead=0)
    seen: set[str] = set()
    for local, remote, state, inode in _tcp_table(pid):
        if inode not in inodes:
            continue
        seen.add(inode)
        if state == "0A":
            sockets["listen"] += 1
            continue
        peer = peers[inode] = _peer(local, remote, own_port, upstream_ports, redis_port)
        if state == "01":
            sockets[peer] += 1
        else:  # CLOSE_WAIT and the like: the peer is gone, the descriptor is still held
            sockets["dead"] += 1
            sockets[f"dead-{peer}"] += 1
    unix = inodes & _unix_inodes(pid)
    sockets["unix"] = len(unix)
    # Neither TCP-hashed nor unix: TCP sockets that were reset while this process
    # still holds their descriptor.
    for inode in inodes - seen - unix:
        sockets["dead"] += 1
        sockets[f"dead-{peers.get(inode, 'unknown')}"] += 1
    rss_mb = int(status["VmRSS"].split()[0]) / 1024
    return Sample(t, label, _cpu_seconds(pid), rss_mb, int(status["Threads"]), fds, sockets)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peer(local: int, remote: int, own_port: int, upstream_ports: set[int], redis_port: int) -> str:
    if local == own_port:
        return "clients"
    if remote in upstream_ports:
        return "upstream"
    return "redis" if remote == redis_port else "other"


def _unix_inodes(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/net/unix") as file:
            return {line.split()[6] for line in file.readlines()[1:] if len(line.split()) > 6}
    except OSError:
        return set()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def _tcp_table(pid: int) -> list[tuple[int, int, str, str]]:
    rows = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as file:
                lines = file.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            rows.append((local_port, remote_port, fields[3], fields[9]))
    return rows
