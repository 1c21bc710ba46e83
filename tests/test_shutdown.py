"""Graceful shutdown of `fallback-proxy serve`, as a real process and real signals.

On SIGTERM uvicorn closes the listener (new connections are refused), lets the
requests under way finish for up to `server.shutdown_grace_seconds`, cancels
what is left, then runs the app's lifespan shutdown (which closes the upstream
HTTP client and the state store) and exits.

The rolling-restart test models what a Kubernetes Service gives a client: when
a connection to a terminating pod is refused (or closed before any answer),
the client retries on another endpoint. That retry lives in the test client
below; the property under test is that no stream which had *started* is cut.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from proxy.fakes import FakeOpenAI

from .proxy_process import ProxyProcess
from .redis_server import REDIS_SERVER, RedisServer, free_port

REPLY = " ".join(f"word{i}" for i in range(25))  # 25 content chunks: ~5 s at 0.2 s a token
SHORT_REPLY = " ".join(f"tok{i}" for i in range(20))  # ~2 s at 0.1 s a token
REQUEST = {"model": "default", "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
# uvicorn re-raises the captured SIGTERM after a clean shutdown, so the process
# ends "killed by SIGTERM" (-15; 143 in a shell) rather than with status 0.
CLEAN_EXIT = (0, -signal.SIGTERM)


@pytest.fixture
def processes() -> Iterator[list[ProxyProcess]]:
    """Every proxy a test starts, killed at the end if still running."""
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.close()


def write_config(path: Path, fake: FakeOpenAI, *, grace: float, redis_url: str | None = None) -> Path:
    config: dict[str, Any] = {
        "providers": {
            "cloud": {
                "model": "openai/gpt-test",
                "api_key": "sk-upstream",
                "api_base": fake.url + "/v1",
                "timeout": {"connect": 2, "first_token": 5, "idle": 5, "total": 30},
            },
        },
        "routes": {"default": ["cloud"]},
        "health": {"probe_interval_seconds": 0},
        "server": {"shutdown_grace_seconds": grace, "reload_check_seconds": 0},
    }
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
    path.write_text(yaml.safe_dump(config))
    return path


def start_proxy(processes: list[ProxyProcess], config: Path, port: int, log: Path) -> ProxyProcess:
    proxy = ProxyProcess(config, port, log)
    processes.append(proxy)
    return proxy


def refused(port: int) -> bool:
    """True when a new connection to the port is refused (or not answered)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except (ConnectionRefusedError, TimeoutError):
        return True
    return False


def wait_refused(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if refused(port):
            return True
        time.sleep(0.02)
    return False


def content_of(data: str) -> str:
    """The text of one `chat.completion.chunk` (empty for role, finish and usage chunks)."""
    chunk = json.loads(data)
    assert "error" not in chunk, f"in-band error: {data}"
    choices = chunk.get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or ""


@pytest.fixture
def slow_fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("cloud", reply=REPLY) as fake:
        fake.set_fault("slow", token_delay=0.2)
        yield fake


def test_sigterm_lets_the_in_flight_stream_finish_and_refuses_new_connections(
    tmp_path: Path, slow_fake: FakeOpenAI, processes: list[ProxyProcess]
) -> None:
    config = write_config(tmp_path / "proxy.yaml", slow_fake, grace=30)
    proxy = start_proxy(processes, config, free_port(), tmp_path / "proxy.log")
    proxy.wait_ready()

    texts: list[str] = []
    after_sigterm = 0
    last = ""
    refused_after_sigterm = False
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=REQUEST, timeout=15) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last == "[DONE]":
                break
            texts.append(content_of(last))
            if proxy.sigterm_at is None and sum(1 for t in texts if t) == 3:
                proxy.terminate()
                refused_after_sigterm = wait_refused(proxy.port, timeout=2)
            elif proxy.sigterm_at is not None:
                after_sigterm += 1
    stream_ended = time.monotonic()

    assert proxy.sigterm_at is not None
    assert refused_after_sigterm, "a new connection was still accepted 2 s after SIGTERM"
    assert last == "[DONE]"
    assert "".join(texts) == REPLY
    assert after_sigterm >= 15, "the stream should still have been in flight, well after SIGTERM"
    assert refused(proxy.port), "still refused while the process drains or after it exits"
    returncode = proxy.wait(timeout=5)
    exited = time.monotonic()
    assert returncode in CLEAN_EXIT, proxy.stderr()
    assert exited - stream_ended < 3, "the process exits once its last stream is done"
    assert exited - proxy.sigterm_at < 30, "and well within the grace period"
    log = proxy.stderr()
    assert "Application shutdown complete" in log  # the lifespan closed the upstream client and the store
    assert "Traceback" not in log and '"level":"error"' not in log, log


def test_the_grace_period_is_a_limit_and_a_cut_stream_says_why(
    tmp_path: Path, slow_fake: FakeOpenAI, processes: list[ProxyProcess]
) -> None:
    config = write_config(tmp_path / "proxy.yaml", slow_fake, grace=1)
    proxy = start_proxy(processes, config, free_port(), tmp_path / "proxy.log")
    proxy.wait_ready()

    texts: list[str] = []
    events: list[str] = []
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=REQUEST, timeout=15) as response:
        assert response.status_code == 200
        for line in response.iter_lines():  # the body ends properly: no RemoteProtocolError
            if line.startswith("data: "):
                events.append(line[6:])
                if "error" not in events[-1] and events[-1] != "[DONE]":
                    texts.append(content_of(events[-1]))
                if proxy.sigterm_at is None and sum(1 for t in texts if t) == 2:
                    proxy.terminate()
    cut = time.monotonic()

    assert proxy.sigterm_at is not None
    assert 0.9 < cut - proxy.sigterm_at < 2.5, f"cut {cut - proxy.sigterm_at:.2f}s after SIGTERM"
    assert len("".join(texts)) < len(REPLY)
    # The client is told, in-band and OpenAI-shaped, why its stream stopped; then [DONE].
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "server_shutting_down", error
    assert proxy.wait(timeout=5) in CLEAN_EXIT
    assert time.monotonic() - proxy.sigterm_at < 4
    log = proxy.stderr()
    assert "Application shutdown complete" in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"event":"request"')]
    assert [line["outcome"] for line in lines] == ["server_shutting_down"], lines
    assert "Traceback" not in log, log


def test_the_openai_sdk_sees_a_cut_stream_as_an_error(
    tmp_path: Path, slow_fake: FakeOpenAI, processes: list[ProxyProcess]
) -> None:
    config = write_config(tmp_path / "proxy.yaml", slow_fake, grace=1)
    proxy = start_proxy(processes, config, free_port(), tmp_path / "proxy.log")
    proxy.wait_ready()

    received = ""
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as sdk:
        with pytest.raises(openai.APIError) as caught:
            for chunk in sdk.chat.completions.create(**REQUEST):
                received += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if proxy.sigterm_at is None and received:
                    proxy.terminate()
    assert "shutting down" in caught.value.message
    assert received and REPLY.startswith(received) and received != REPLY
    assert proxy.wait(timeout=5) in CLEAN_EXIT


# --- a rolling restart of one of two replicas -------------------------------------


@dataclass
class Outcome:
    """One client request: where it was answered, and how."""

    port: int | None = None  # the replica that answered (None: none did)
    started: float | None = None  # when the 200 headers arrived
    ended: float | None = None
    text: str = ""
    done: bool = False
    cut: str | None = None  # what broke a started stream
    retries: list[str] = field(default_factory=list)  # "<port>: <why>" for each connection not answered

    def spans(self, moment: float) -> bool:
        return self.started is not None and self.ended is not None and self.started < moment < self.ended


class NotStarted(Exception):
    """The replica refused the connection or closed it before any answer: safe to send elsewhere."""


async def stream_once(client: httpx.AsyncClient, port: int, outcome: Outcome) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with client.stream("POST", url, json=REQUEST) as response:
            outcome.port, outcome.started = port, time.monotonic()
            assert response.status_code == 200, await response.aread()
            try:
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        outcome.done = True
                    elif line.startswith("data: "):
                        outcome.text += content_of(line[6:])
            except httpx.HTTPError as exc:
                outcome.cut = f"{type(exc).__name__}: {exc}"
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        if outcome.started is not None:
            raise
        raise NotStarted(f"{port}: {type(exc).__name__}") from exc
    finally:
        outcome.ended = time.monotonic()


async def ask(client: httpx.AsyncClient, ports: tuple[int, int], first: int) -> Outcome:
    """One request, sent to `ports[first]`; a connection that is not answered is
    retried on the other replica (a bounded number of times)."""
    outcome = Outcome()
    for attempt in range(4):
        try:
            await stream_once(client, ports[(first + attempt) % 2], outcome)
            return outcome
        except NotStarted as exc:
            outcome.retries.append(str(exc))
            await asyncio.sleep(0.05 * attempt)
    return outcome


async def clients(ports: tuple[int, int], until: list[float], count: int = 20) -> list[Outcome]:
    """`count` clients sending streams round-robin over both replicas until `until[0]`."""
    turn = itertools.count()
    limits = httpx.Limits(max_connections=count * 2, max_keepalive_connections=0)  # a new connection each time
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(15, connect=2)) as client:

        async def one_client() -> list[Outcome]:
            done: list[Outcome] = []
            while time.monotonic() < until[0]:
                done.append(await ask(client, ports, next(turn) % 2))
            return done

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one_client() for _ in range(count)))
    return [outcome for per_client in results for outcome in per_client]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_rolling_restart_of_one_replica_cuts_no_stream(tmp_path: Path, processes: list[ProxyProcess]) -> None:
    """Two replicas sharing one Redis, as deployed (the shared health and quota
    state is part of what each replica opens and closes on the way down)."""
    redis = RedisServer().start()
    try:
        with FakeOpenAI("cloud", reply=SHORT_REPLY) as fake:
            fake.set_fault("slow", token_delay=0.1)
            _rolling_restart(tmp_path, fake, redis.url, processes)
    finally:
        redis.stop()


def _rolling_restart(tmp_path: Path, fake: FakeOpenAI, redis_url: str, processes: list[ProxyProcess]) -> None:
    config = write_config(tmp_path / "proxy.yaml", fake, grace=10, redis_url=redis_url)
    ports = (free_port(), free_port())
    old = start_proxy(processes, config, ports[0], tmp_path / "replica1.log")
    other = start_proxy(processes, config, ports[1], tmp_path / "replica2.log")
    old.wait_ready()
    other.wait_ready()

    until = [time.monotonic() + 60]
    timeline: dict[str, float] = {}
    returncodes: list[int] = []

    async def scenario() -> list[Outcome]:
        load = asyncio.create_task(clients(ports, until))
        await asyncio.sleep(1.5)  # streams in flight on both replicas
        old.terminate()
        timeline["sigterm"] = time.monotonic()
        exited = asyncio.create_task(asyncio.to_thread(old.wait, 15))
        exited.add_done_callback(lambda _: timeline.setdefault("old_exited", time.monotonic()))
        # The same port, as a new pod behind the same Service: it can bind as
        # soon as the old process has closed its listener.
        assert await asyncio.to_thread(wait_refused, ports[0], 2.0)
        # A new pod takes a moment to be scheduled: the streams under way at SIGTERM
        # end (~0.5 s after it) well before the new replica can answer, so clients
        # are sure to meet the refused port in between.
        await asyncio.sleep(1.0)
        new = start_proxy(processes, config, ports[0], tmp_path / "replica1-new.log")
        await asyncio.to_thread(new.wait_ready)
        timeline["new_ready"] = time.monotonic()
        until[0] = time.monotonic() + 2.5  # keep sending to both, then stop
        outcomes = await load
        returncodes.append(await exited)
        return outcomes

    outcomes = asyncio.run(scenario())

    started = [o for o in outcomes if o.started is not None]
    assert len(outcomes) >= 40 and len(started) == len(outcomes), [o for o in outcomes if o.started is None]
    broken = [o for o in started if o.cut or not o.done or o.text != SHORT_REPLY]
    assert not broken, broken
    drained = [o for o in started if o.port == ports[0] and o.spans(timeline["sigterm"])]
    assert drained, "no stream was in flight on the stopping replica at SIGTERM"
    retried = [o for o in outcomes if o.retries]
    assert retried, "no client hit the stopping replica between SIGTERM and the new replica's start"
    assert all(o.port == ports[1] for o in retried if o.retries[-1].startswith(f"{ports[0]}:"))
    assert any(o.port == ports[0] and (o.started or 0) > timeline["new_ready"] for o in started)
    assert returncodes[0] in CLEAN_EXIT, old.stderr()
    assert timeline["old_exited"] - timeline["sigterm"] < 10, "within the grace period"
    log = old.stderr()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log and '"level":"error"' not in log, log
