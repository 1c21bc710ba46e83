"""What the answer path costs in Redis round trips (issue 5): nothing for health in
steady state (each replica keeps a local view, kept fresh by pub/sub), and for a
provider with a quota one admission before the call and one settlement after it.
Counted by the server itself (`INFO commandstats`) on a Redis of the test's own."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator

import openai
import pytest
from redis import Redis as SyncRedis

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider
from .redis_server import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

MESSAGES = [{"role": "user", "content": "hi"}]
REQUESTS = 40


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


class Monitor:
    """Redis MONITOR on a socket of its own: every command a client sent, one line
    each; the commands a Lua script runs are marked `lua` and are not round trips."""

    def __init__(self, redis: RedisServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[str] = []
        self.buffer = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.wait_for(lambda: self.lines[:1] == ["+OK"])

    def _read(self) -> None:
        while chunk := self._recv():
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\r\n")
            self.lines.extend(line.decode(errors="replace") for line in lines)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def wait_for(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline, self.lines[-5:]
            time.sleep(0.01)

    def round_trips(self) -> list[str]:
        """The commands clients sent since MONITOR started (not a script's own)."""
        return [line for line in self.lines[1:] if " lua] " not in line]

    def close(self) -> None:
        self.sock.close()
        self.thread.join(2)


def command(line: str) -> str:
    match = re.search(r'\] "([^"]+)"', line)
    return match.group(1).lower() if match else line


def run(proxy: ServedApp, model: str, stream: bool) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(REQUESTS):
            if stream:
                chunks = sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                assert sdk.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content


@pytest.fixture
def proxy(serve: Callable[..., ServedApp], redis: RedisServer, cloud: FakeOpenAI, backup: FakeOpenAI) -> ServedApp:
    served = serve(
        {
            "redis": {"url": redis.url},
            "providers": {
                "cloud": openai_provider(cloud.url, quota={"requests_per_day": 10_000, "tokens_per_day": 10_000_000}),
                "backup": openai_provider(backup.url),
            },
            "routes": {"metered": ["cloud"], "free": ["backup"]},
        }
    )
    run(served, "free", stream=False)  # warm: connections open, the health view loaded
    run(served, "metered", stream=False)
    wait_settled(redis, "cloud", REQUESTS)  # the warm-up's settlements land before anything is counted
    return served


def wait_settled(redis: RedisServer, provider: str, admitted: int) -> None:
    """Until the provider's quota hash counts `admitted` calls and holds no call's mark: the
    settle script removes the mark its admission left, so every admission was settled."""
    with SyncRedis(port=redis.port) as client:

        def settled() -> bool:
            keys = client.keys(f"*{{{provider}}}:quota:*")
            if len(keys) != 1:
                return False
            fields = client.hgetall(keys[0])
            return int(fields.get(b"req", 0)) == admitted and not any(key.startswith(b"m:") for key in fields)

        deadline = time.monotonic() + 10
        while not settled():
            assert time.monotonic() < deadline, client.hgetall(client.keys(f"*{{{provider}}}:quota:*")[0])
            time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_provider_without_quota_costs_no_round_trip(proxy: ServedApp, redis: RedisServer, stream: bool) -> None:
    monitor = Monitor(redis)
    try:
        run(proxy, "free", stream)
        sent = [command(line) for line in monitor.round_trips()]
        with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as probe:
            probe.sendall(b"ECHO monitor-sees-this\r\n")
            probe.recv(100)
        monitor.wait_for(lambda: any("monitor-sees-this" in line for line in monitor.lines))  # it was listening
    finally:
        monitor.close()
    # Background work of the replica (a health refresh, a pub/sub ping) may tick once or
    # twice during the run; per request there is none.
    assert len(sent) <= 4, sent


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_provider_with_a_quota_costs_one_admission_and_one_settlement(
    proxy: ServedApp, redis: RedisServer, stream: bool
) -> None:
    monitor = Monitor(redis)
    try:
        run(proxy, "metered", stream)
        # settlements are sent after the answer
        monitor.wait_for(lambda: sum(command(line) == "evalsha" for line in monitor.round_trips()) >= 2 * REQUESTS)
        time.sleep(0.2)  # the interval is the point: no command beyond those comes afterwards
        sent = [command(line) for line in monitor.round_trips()]
    finally:
        monitor.close()
    scripts = sent.count("evalsha")
    assert scripts == 2 * REQUESTS, sent  # one admission, one settlement per request
    assert len(sent) - scripts <= 4, [c for c in sent if c != "evalsha"]
