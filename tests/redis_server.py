"""A throwaway `redis-server` (or sentinel) subprocess for tests that kill, stall or reconfigure it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ask(port: int, command: bytes, timeout: float = 0.5) -> bytes:
    """Send one inline command over a raw socket and return the first reply chunk."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(65536)


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, no persistence, as a child process.
    `sentinel_of`: run as a sentinel monitoring that port under `service`;
    `extra_args`: more `redis-server` options (a cluster node's, say)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        sentinel_of: int | None = None,
        service: str = "fp-test",
        extra_args: Sequence[str] = (),
    ) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port()
        self.sentinel_of = sentinel_of
        self.service = service
        self.extra_args = tuple(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="fp-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        kind = f"sentinel of :{self.sentinel_of}" if self.sentinel_of else "redis"
        return f"<RedisServer {kind} 127.0.0.1:{self.port} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        return self.dir / "redis.sock"

    def _argv(self) -> list[str]:
        assert REDIS_SERVER is not None
        common = [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.dir),
            "--loglevel",
            "warning",
        ]
        if self.sentinel_of is None:
            unix = ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
            return [REDIS_SERVER, *common, *unix, *self.extra_args]
        config = self.dir / "sentinel.conf"  # a sentinel rewrites its config file: it must exist
        config.write_text(
            f"sentinel monitor {self.service} 127.0.0.1 {self.sentinel_of} 1\n"
            f"sentinel down-after-milliseconds {self.service} 5000\n"
        )
        return [
            REDIS_SERVER,
            str(config),
            "--sentinel",
            *common[:4],
            "--daemonize",
            "no",
            "--dir",
            str(self.dir),
            "--loglevel",
            "warning",
        ]

    def start(self, timeout: float = 5.0, *, same_port: bool = False) -> RedisServer:
        """Start and wait until this very process answers on the port. If another
        process took the port meanwhile, try another one (unless `same_port`)."""
        for _ in range(1 if same_port else 3):
            if self._start(timeout):
                return self
            self.port = free_port()
        raise RuntimeError(f"{self!r} did not start")

    def _start(self, timeout: float) -> bool:
        self.process = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                if f"process_id:{self.process.pid}\r\n".encode() in ask(self.port, b"INFO server"):
                    return True
            except OSError:
                pass
            time.sleep(0.01)
        self.kill()
        return False

    def kill(self) -> None:
        """SIGKILL and wait: the port refuses connections afterwards."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
