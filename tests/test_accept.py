"""The batch listener (proxy/accept.py): connections that queue while the event
loop is busy are all accepted at its next turn, and served, over real sockets."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest
import uvicorn

from proxy.accept import ACCEPT_BATCH, PAUSE_SECONDS, BatchAcceptLoop, BatchAcceptServer, new_event_loop
from proxy.config import Config
from proxy.server import bound_port, build_server

from .conftest import build_config, openai_provider

BURST = 400  # connections opened while the loop is blocked: under the backlog (2,048), under one batch
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"


def proxy_config() -> Config:
    """A proxy whose one provider is never called: these tests ask only /healthz."""
    return build_config(
        {"providers": {"cloud": openai_provider("http://127.0.0.1:9")}, "routes": {"default": ["cloud"]}}
    )


class Running:
    """`build_server(...)` (the proxy as `serve` runs it, on port 0) in a thread."""

    def __init__(self) -> None:
        self.server: uvicorn.Server = build_server(proxy_config(), host="127.0.0.1", port=0)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="batch-accept-proxy")

    def start(self) -> Running:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def listener(self) -> BatchAcceptServer:
        (listener,) = self.server.servers
        assert isinstance(listener, BatchAcceptServer)
        return listener

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", bound_port(self.server))


@pytest.fixture
def proxy() -> Iterator[Running]:
    running = Running().start()
    yield running
    running.stop()


def block_the_loop(loop: asyncio.AbstractEventLoop, seconds: float) -> threading.Event:
    """Make `loop` sleep `seconds` in a callback (as a turn full of work would);
    returns once the sleep has begun. The event is set when it ends."""
    began, ended = threading.Event(), threading.Event()

    def sleep() -> None:
        began.set()
        time.sleep(seconds)
        ended.set()

    loop.call_soon_threadsafe(sleep)
    assert began.wait(5)
    return ended


def answer_of(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    client.close()
    return b"".join(chunks)


def test_a_burst_that_queued_while_the_loop_was_blocked_is_accepted_in_one_or_two_wakeups_and_answered(
    proxy: Running,
) -> None:
    listener = proxy.listener
    wakeups, accepted = listener.wakeups, listener.accepted

    ended = block_the_loop(listener.get_loop(), 0.5)
    clients = []
    for _ in range(BURST):
        client = socket.create_connection(proxy.address, timeout=15)  # the kernel completes it; nothing accepts yet
        client.sendall(HEALTHZ)
        clients.append(client)
    assert not ended.is_set(), "the burst took longer than the blocked turn: it proves nothing"

    answers = [answer_of(client) for client in clients]
    assert all(answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}') for answer in answers)
    assert listener.accepted - accepted == BURST
    assert listener.wakeups - wakeups <= 3  # uvloop's own listener: one wakeup (a turn) per connection


def test_the_connections_it_accepts_have_nagle_off(proxy: Running) -> None:
    with socket.create_connection(proxy.address, timeout=5) as client:
        client.sendall(HEALTHZ.replace(b"Connection: close", b"Connection: keep-alive"))
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
        (connection,) = proxy.server.server_state.connections
        accepted = connection.transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_after_shutdown_new_connections_are_refused(proxy: Running) -> None:
    address = proxy.address
    proxy.stop()
    assert not proxy.thread.is_alive()
    assert proxy.listener.sockets == ()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


def test_a_port_in_use_ends_startup_with_uvicorns_message(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = build_server(proxy_config(), host="127.0.0.1", port=taken.getsockname()[1])
        with caplog.at_level(logging.ERROR, logger="uvicorn.error"), pytest.raises(SystemExit) as stopped:
            server.run()
    assert stopped.value.code == 3
    assert "address already in use" in caplog.text.lower()


# --- the listener itself, on a BatchAcceptLoop -----------------------------------------------


class Greeter(asyncio.Protocol):
    """Says hello to each connection and closes it."""

    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Greeter.made += 1
        stream = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        stream.write(b"hello")
        stream.close()


@pytest.fixture
def loop() -> Iterator[BatchAcceptLoop]:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, BatchAcceptLoop)
        yield loop


async def greeting(address: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def test_one_wakeup_accepts_at_most_one_batch(loop: BatchAcceptLoop) -> None:
    async def scenario() -> None:
        server = await loop.create_server(Greeter, "127.0.0.1", 0, backlog=ACCEPT_BATCH + 100)
        assert isinstance(server, BatchAcceptServer)
        (listening,) = server.sockets
        clients = [socket.create_connection(listening.getsockname()) for _ in range(ACCEPT_BATCH + 10)]
        try:
            assert server.accept_batch(listening) == ACCEPT_BATCH
            assert server.accept_batch(listening) == 10
            assert server.accept_batch(listening) == 0  # nothing pending: EAGAIN, not a wait
            for client in clients:
                client.setblocking(False)
            assert await asyncio.gather(*(loop.sock_recv(client, 5) for client in clients)) == [b"hello"] * len(clients)
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())


def test_close_drops_connections_accepted_but_not_yet_handed_over(loop: BatchAcceptLoop) -> None:
    async def scenario() -> None:
        made = Greeter.made
        server = await loop.create_server(Greeter, "127.0.0.1", 0)
        (listening,) = server.sockets
        clients = [socket.create_connection(listening.getsockname(), timeout=5) for _ in range(3)]
        assert isinstance(server, BatchAcceptServer)
        assert server.accept_batch(listening) == 3  # accepted; handed over at the loop's next turn
        server.close()
        await server.wait_closed()
        for client in clients:
            with client:
                assert client.recv(5) == b""  # closed before any answer, as if it had stayed in the backlog
        assert Greeter.made == made

    loop.run_until_complete(scenario())


class Idle(asyncio.Protocol):
    """Keeps its connection open, as a keep-alive connection between requests
    does, and notes whether it was told the connection was made and lost."""

    def __init__(self) -> None:
        self.made = self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def test_a_protocol_that_connects_after_close_hears_its_connection_is_lost(loop: BatchAcceptLoop) -> None:
    """uvicorn shuts down the connections it knows when it closes the server and
    waits for all of them: one that connected later and was never closed would
    hold the shutdown for its whole grace period."""

    async def scenario() -> None:
        protocols: list[Idle] = []

        def idle() -> Idle:
            protocols.append(Idle())
            return protocols[-1]

        server = await loop.create_server(idle, "127.0.0.1", 0)
        assert isinstance(server, BatchAcceptServer)
        (listening,) = server.sockets
        clients = [socket.create_connection(listening.getsockname(), timeout=5) for _ in range(3)]
        assert server.accept_batch(listening) == 3
        await asyncio.sleep(0)  # one turn: the transports exist, `connection_made` is due at the next
        assert len(protocols) == 3 and not any(protocol.made for protocol in protocols)
        server.close()
        await server.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0)
        assert all(protocol.made and protocol.lost for protocol in protocols)
        for client in clients:
            with client:
                assert client.recv(5) == b""

    loop.run_until_complete(scenario())


def test_a_connection_its_protocol_cannot_take_is_logged_and_closed(
    loop: BatchAcceptLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> asyncio.Protocol:
        raise RuntimeError("no protocol today")

    async def scenario() -> None:
        server = await loop.create_server(broken, "127.0.0.1", 0)
        (listening,) = server.sockets
        assert await greeting(listening.getsockname()) == b""  # closed, not left hanging
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="fallback_proxy"):
        loop.run_until_complete(scenario())
    assert "a new connection could not be served: RuntimeError('no protocol today')" in caplog.text


class RunsOutOfFiles(socket.socket):
    """A listening socket whose first accept() fails as when the process has no file descriptor left."""

    failures = 1

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_out_of_file_descriptors_it_pauses_instead_of_spinning_then_serves(
    loop: BatchAcceptLoop, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        listening = RunsOutOfFiles(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind(("127.0.0.1", 0))
        server = await loop.create_server(Greeter, sock=listening)
        assert isinstance(server, BatchAcceptServer)
        began = time.monotonic()
        assert await greeting(listening.getsockname()) == b"hello"
        assert time.monotonic() - began >= PAUSE_SECONDS - 0.1
        assert server.wakeups == 2  # the failed one, then the one after the pause; never a busy loop
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="fallback_proxy"):
        loop.run_until_complete(scenario())
    assert "accepting connections failed" in caplog.text


def test_what_it_does_not_cover_stays_with_uvloops_listener(loop: BatchAcceptLoop) -> None:
    async def scenario() -> None:
        server = await loop.create_server(Greeter, "127.0.0.1", 0, reuse_port=True)
        assert not isinstance(server, BatchAcceptServer)
        (listening,) = server.sockets
        assert await greeting(listening.getsockname()) == b"hello"
        server.close()
        await server.wait_closed()

    loop.run_until_complete(scenario())


def test_serve_forever_serves_until_cancelled_then_closes(loop: BatchAcceptLoop) -> None:
    async def scenario() -> None:
        server = await loop.create_server(Greeter, "127.0.0.1", 0)
        (listening,) = server.sockets
        serving = asyncio.ensure_future(server.serve_forever())
        assert await greeting(listening.getsockname()) == b"hello"
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert not server.is_serving()

    loop.run_until_complete(scenario())
