"""A port whose TCP connects hang, like a firewall silently dropping SYNs."""

from __future__ import annotations

import select
import socket
import threading
from types import TracebackType
from typing import Self

_MAX_FILLERS = 16
_FILLER_WAIT = 0.05


class Blackhole:
    """A listening socket on 127.0.0.1 that never accepts and whose accept queue is full.

    The socket listens with backlog 0 and is pre-filled with its own client connections, so the
    Linux kernel drops every further SYN: other clients' ``connect()`` hangs in SYN-SENT until
    their connect timeout (httpx raises ``httpx.ConnectTimeout``). The filler connections are
    made until one of them itself stops completing, which proves the queue is full.

    Use as a context manager or ``start()`` / ``stop()``; ``start()`` after ``stop()`` reuses the port.
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("Blackhole has no port yet: start() it first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._listener is not None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Blackhole 127.0.0.1:{self._port or '?'} {state}>"

    def start(self) -> Self:
        """Bind, listen and fill the accept queue (no-op if running)."""
        with self._lock:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self._port))
                listener.listen(0)
                self._port = listener.getsockname()[1]
                self._fillers = self._fill(self._port)
            except OSError:
                listener.close()
                self._close_fillers()
                raise
            self._listener = listener
        return self

    def stop(self) -> None:
        """Close the listener and the filler connections (the port then refuses connections)."""
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._close_fillers()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _fill(port: int) -> list[socket.socket]:
        """Connect to ``port`` until a connect stays pending: the accept queue is then full."""
        fillers: list[socket.socket] = []
        for _ in range(_MAX_FILLERS):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [filler], [], _FILLER_WAIT)
            if not writable:
                return fillers
        for filler in fillers:
            filler.close()
        raise OSError(f"could not fill the accept queue of 127.0.0.1:{port}; connects would not hang")

    def _close_fillers(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers = []
