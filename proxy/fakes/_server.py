"""The threaded uvicorn server every fake provider runs on, with the ``/_fault`` control endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._core import CONTINUATIONS, AbortConnection, FakeCore, ReceivedRequest, wait_disconnect
from ._fault import Fault

_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 10.0


def _find_transport(send: Send) -> asyncio.BaseTransport | None:
    """The connection's transport, found through uvicorn's bound ``send`` method (None if not there)."""
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


class _ConnectionGuard:
    """Outermost ASGI layer: tags responses with the fake's name and turns AbortConnection into a dropped connection."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self._app = app
        self._name_header = (b"x-fake-provider", name.encode("ascii", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        transport = _find_transport(send)

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._name_header]}
            await send(message)

        try:
            await self._app(scope, receive, tagged_send)
        except AbortConnection:
            if transport is None:
                raise  # not under uvicorn: let the server drop the connection its own way
            transport.close()  # flushes what was already written, then FIN: an incomplete response
            with contextlib.suppress(TimeoutError):  # the transport is closed either way; uvicorn will notice
                await asyncio.wait_for(wait_disconnect(receive), timeout=1.0)


@dataclass
class _Run:
    """One start()..stop() lifetime of the server thread."""

    server: uvicorn.Server
    sock: socket.socket
    thread: threading.Thread | None = None
    loop: asyncio.AbstractEventLoop | None = None
    stopping: asyncio.Event | None = None
    crashed: list[BaseException] = field(default_factory=list)


class FakeServer:
    """Base class of the fakes: a real HTTP server on 127.0.0.1 in a background thread.

    Use as a context manager or with ``start()`` / ``stop()``. After ``stop()`` the port is closed,
    so connections are refused (that is the "refuse" fault); ``start()`` again reuses the same port.
    """

    default_name = "fake"

    def __init__(
        self,
        name: str | None = None,
        *,
        reply: str | None = None,
        chunks: int | None = None,
        model: str | None = None,
        port: int = 0,
        api_key: str | None = None,
    ) -> None:
        name = name or self.default_name
        self._core = FakeCore(
            name=name,
            reply=f"Hello from {name}." if reply is None else reply,
            chunks=chunks,
            model=model,
            api_key=api_key,
        )
        self._port = port
        self._lock = threading.Lock()
        self._run: _Run | None = None

    # -- provider hooks ----------------------------------------------------------------------

    def _routes(self) -> list[BaseRoute]:
        """The provider's API routes."""
        raise NotImplementedError

    def _not_found(self, request: Request) -> Response:
        """The answer for unknown paths."""
        return PlainTextResponse("404 page not found", status_code=404)

    # -- identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def reply(self) -> str:
        return self._core.base_reply

    @property
    def continuation(self) -> str:
        """How it answers a request to continue a cut answer (see `continued_reply`)."""
        return self._core.continuation

    @continuation.setter
    def continuation(self, how: str) -> None:
        if how not in CONTINUATIONS:
            raise ValueError(f"unknown continuation {how!r}; expected one of {', '.join(CONTINUATIONS)}")
        self._core.continuation = how

    @property
    def port(self) -> int:
        """The listening port (known after the first start(), or when given to the constructor)."""
        if not self._port:
            raise RuntimeError(f"{self!r} has no port yet: start() it first")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (stays valid after stop(): then it refuses connections)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._run is not None

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._port else "unbound"
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name!r} {where} {state}>"

    # -- faults and records ------------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        return self._core.faults.fault

    @fault.setter
    def fault(self, fault: Fault) -> None:
        self._core.faults.fault = fault

    def set_fault(self, kind: str, **fields: Any) -> Fault:
        """Set ``Fault(kind, **fields)`` as the current fault and return it."""
        fault = Fault(kind, **fields)
        self.fault = fault
        return fault

    def clear_fault(self) -> None:
        self.fault = Fault()

    @property
    def call_tools(self) -> bool:
        """When True, a request that offers tools and has no tool result yet is answered with a
        call of its first tool; the answer after a tool result quotes the result."""
        return self._core.call_tools

    @call_tools.setter
    def call_tools(self, value: bool) -> None:
        self._core.call_tools = value

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of the requests received since the last reset() (control calls excluded)."""
        return self._core.records

    @property
    def request_count(self) -> int:
        return len(self._core.records)

    def reset(self) -> None:
        """Forget the recorded requests."""
        self._core.clear_records()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving (no-op if running); returns once the port accepts connections."""
        with self._lock:
            if self._run is None:
                self._run = self._launch()
        return self

    def stop(self) -> None:
        """Stop serving and close the port; hung or slow requests are dropped. Returns within ~1 s."""
        with self._lock:
            run, self._run = self._run, None
        if run is None:
            return
        if run.loop is not None and run.stopping is not None and not run.loop.is_closed():
            run.loop.call_soon_threadsafe(run.stopping.set)
        run.server.should_exit = True
        if run.thread is not None:
            run.thread.join(timeout=_STOP_TIMEOUT)
        run.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _launch(self) -> _Run:
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto is TCP
        # (with proto 0, keep-alive requests stall ~40 ms on Nagle + delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=self._port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        run = _Run(server=uvicorn.Server(config), sock=sock)
        run.thread = threading.Thread(target=self._serve, args=(run,), name=f"fake-{self.name}", daemon=True)
        run.thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not run.server.started:
            if not run.thread.is_alive() or time.monotonic() > deadline:
                run.server.should_exit = True
                run.thread.join(timeout=_STOP_TIMEOUT)
                sock.close()
                raise RuntimeError(f"{self!r} failed to start: {run.crashed or 'timeout'}")
            time.sleep(0.002)
        return run

    def _serve(self, run: _Run) -> None:
        """Server thread body: a private event loop running uvicorn until stop()."""
        try:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                runner.run(self._serve_async(run))
        except (SystemExit, OSError) as exc:  # uvicorn exits on startup errors; start() reports it
            run.crashed.append(exc)

    async def _serve_async(self, run: _Run) -> None:
        run.loop = asyncio.get_running_loop()
        run.stopping = asyncio.Event()
        self._core.stopping = run.stopping
        await run.server.serve(sockets=[run.sock])

    # -- the ASGI app ------------------------------------------------------------------------

    def _app(self) -> ASGIApp:
        control = Route("/_fault", self._control, methods=["GET", "POST", "DELETE"])

        async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
            await self._not_found(Request(scope, receive))(scope, receive, send)

        router = Router(routes=[control, *self._routes()], default=not_found)
        return _ConnectionGuard(router, self.name)

    async def _control(self, request: Request) -> Response:
        """``GET /_fault`` shows the fault, ``POST`` sets it from JSON fields, ``DELETE`` clears it."""
        if request.method == "POST":
            try:
                data = await request.json()
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of Fault fields")
                self.fault = Fault.from_dict(data)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        elif request.method == "DELETE":
            self.clear_fault()
        return JSONResponse({**self.fault.to_dict(), "remaining": self._core.faults.remaining})
