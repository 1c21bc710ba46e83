"""Accepting new connections in batches: uvloop's event loop with its own listener.

uvloop's server accepts one connection per turn of the event loop. When a turn
takes 100 ms or more (thousands of live streams in one worker), the accept rate
falls to a few connections a second, the kernel's backlog fills, and clients see
their connection closed before any answer, where the proxy would have refused
them cleanly and cheaply with its own `503 server_overloaded` (`_shed` in
proxy/app.py).

`BatchAcceptLoop` is uvloop's loop with one change: a plain TCP (or Unix) server
made by `create_server` is a `BatchAcceptServer`, which, whenever a listening
socket is readable, accepts every pending connection (up to `ACCEPT_BATCH`) and
hands each to the protocol uvicorn gave `create_server`, through the loop's own
`connect_accepted_socket`. Serving and closing connections stays uvloop's and
uvicorn's. uvicorn takes the loop by its import string (proxy/server.py), so one
process and each worker of `serve --workers` (which listens on the socket the
supervisor bound) get it alike.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import uvloop

log = logging.getLogger("fallback_proxy")

ACCEPT_BATCH: Final = 512  # connections accepted per wakeup at most, so that one wakeup stays short
PAUSE_SECONDS: Final = 1.0  # listening stops this long after accept() failed for want of resources
# What Linux's accept(2) reports about a connection that failed while queued: skip it, take the next.
_FAILED_WHILE_QUEUED: Final = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETDOWN,
        errno.ENETUNREACH,
    }
)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def new_event_loop() -> BatchAcceptLoop:
    """A new `BatchAcceptLoop` (uvicorn's `loop` setting names this function)."""
    return BatchAcceptLoop()


class BatchAcceptLoop(uvloop.Loop):
    """uvloop's event loop whose plain servers accept connections in batches."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> asyncio.AbstractServer:
        """As `loop.create_server`. What uvicorn asks for (a socket, or a host and
        port, with asyncio's default options) gets a `BatchAcceptServer`; anything
        else (TLS, other socket options, not serving yet, an invalid call) stays
        with uvloop's own listener."""
        addressed = host is not None or port is not None
        plain = (
            addressed != (sock is not None)
            and ssl is None
            and ssl_handshake_timeout is None
            and ssl_shutdown_timeout is None
            and reuse_address is not False
            and not reuse_port
            and start_serving
        )
        if not plain:
            uvloop_create_server: Any = super().create_server
            uvloop_server: asyncio.AbstractServer = await uvloop_create_server(
                protocol_factory,
                host,
                port,
                family=family,
                flags=flags,
                sock=sock,
                backlog=backlog,
                ssl=ssl,
                reuse_address=reuse_address,
                reuse_port=reuse_port,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
                start_serving=start_serving,
            )
            return uvloop_server
        sockets = [sock] if sock is not None else await self._bind(host, port, family, flags)
        server = BatchAcceptServer(self, sockets, protocol_factory)
        server.listen(backlog)
        return server

    async def _bind(
        self, host: str | Sequence[str] | None, port: int | None, family: int, flags: int
    ) -> list[socket.socket]:
        """Sockets bound to every address `host` names (all interfaces for None or
        ""), as asyncio binds them: SO_REUSEADDR, and IPv6 sockets IPv6 only."""
        hosts: Iterable[str | None] = [host or None] if host is None or isinstance(host, str) else host
        addresses = {
            info
            for name in hosts
            for info in await self.getaddrinfo(name, port, family=family, type=socket.SOCK_STREAM, flags=flags)
        }
        sockets: list[socket.socket] = []
        try:
            for family_, type_, proto, _, address in addresses:
                sockets.append(_bound(family_, type_, proto, address))
        except BaseException:
            for bound in sockets:
                bound.close()
            raise
        return sockets


def _bound(family: int, type_: int, proto: int, address: Any) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:  # asyncio's wording, which uvicorn logs before it exits
            raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


class BatchAcceptServer(asyncio.AbstractServer):
    """Listens on `sockets`; on each wakeup accepts what is pending, up to
    `ACCEPT_BATCH`, and hands every connection to a transport with the protocol
    `protocol_factory` makes. `wakeups` and `accepted` count what it did.

    `close()` stops listening; a connection accepted but not yet handed over is
    then closed before any answer, as the kernel closes those still in the
    backlog: a connection is the server's once its protocol has it before the
    close (uvicorn then shuts those down gracefully).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket], protocol_factory: ProtocolFactory
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._protocol_factory = protocol_factory
        self._handoffs: set[asyncio.Task[None]] = set()
        self._paused: dict[int, asyncio.TimerHandle] = {}
        self._serving = False
        self.wakeups = 0
        self.accepted = 0

    def __repr__(self) -> str:
        names = [sock.getsockname() for sock in self._sockets if sock.fileno() != -1]
        return f"<BatchAcceptServer {names} serving={self._serving} wakeups={self.wakeups} accepted={self.accepted}>"

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once closed)."""
        return tuple(self._sockets) if self._serving else ()

    def listen(self, backlog: int) -> None:
        """Start listening (with a backlog of `backlog`) and accepting on every socket."""
        for sock in self._sockets:
            sock.setblocking(False)
            sock.listen(backlog)
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)
        self._serving = True

    def close(self) -> None:
        """Stop listening: close the sockets (what was accepted but not handed over closes on its turn)."""
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()

    async def wait_closed(self) -> None:
        """Wait for the hand-overs under way to end (uvicorn calls this after `close()`)."""
        if self._handoffs:
            await asyncio.wait(set(self._handoffs))

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Nothing to do: the server serves from its creation."""

    async def serve_forever(self) -> None:
        """Serve until cancelled, then close (as asyncio's servers do)."""
        try:
            await self._loop.create_future()
        finally:
            self.close()

    def _on_readable(self, sock: socket.socket) -> None:
        self.wakeups += 1
        self.accepted += self.accept_batch(sock)

    def accept_batch(self, sock: socket.socket) -> int:
        """Accept the connections pending on `sock`, up to `ACCEPT_BATCH`, and hand
        each over; returns how many were handed over."""
        count = 0
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _FAILED_WHILE_QUEUED:
                    continue
                self._pause(sock, exc)  # out of file descriptors or memory: retrying at once would spin
                break
            self._hand_over(conn)
            count += 1
        return count

    def _hand_over(self, conn: socket.socket) -> None:
        task = self._loop.create_task(self._connect(conn))
        self._handoffs.add(task)
        task.add_done_callback(functools.partial(self._handed_over, conn))

    async def _connect(self, conn: socket.socket) -> None:
        """Give `conn` a transport and a protocol, unless the server closed first.

        Closed in between, the connection is closed through its transport, so that
        its protocol hears of it (`connection_lost`): uvicorn shuts down only the
        connections it knows when it closes the server, and waits for all of them.
        (Cancelling `connect_accepted_socket` instead would close the socket under
        a protocol that may already have been told `connection_made`.)"""
        if not self._serving:
            conn.close()
            return
        # No setblocking() or TCP_NODELAY here: uvloop's transport sets both when it opens the socket.
        transport, _protocol = await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        if not self._serving:
            transport.close()

    def _handed_over(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        self._handoffs.discard(task)
        if task.cancelled():  # the loop is closing
            conn.close()  # a no-op once a transport has it: the transport detaches it when it closes
            return
        exc = task.exception()
        if exc is not None:
            log.error("a new connection could not be served: %r", exc, exc_info=exc)
            conn.close()

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        log.error("accepting connections failed (%s); listening again in %.0f s", exc, PAUSE_SECONDS)
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._paused[fd] = self._loop.call_later(PAUSE_SECONDS, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._paused.pop(sock.fileno(), None)
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)
