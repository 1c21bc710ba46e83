"""The ASGI response of a stream: client writes, a client gone or too slow,
and the in-band end of a stream the server cuts at shutdown or a bug cuts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from proxy.deadline import Deadline
from proxy.stream.session import CLIENT_DISCONNECTED, INTERNAL_ERROR

SERVER_SHUTTING_DOWN = "server_shutting_down"
SHUTDOWN_WRITE_SECONDS = 1.0


class SSEResponse(Response):
    """A server-sent-event response that always closes its source: when the
    stream ends, fails, or the client goes away mid-stream.

    A client reading slower than `write_timeout` (a send still blocked after
    it) pins buffers: it is dropped. When the server cancels the response (its
    shutdown grace period is over), the client is sent what `shutdown()` makes
    (an in-band error and the stream's end) before the stream ends; so is what
    `broken()` makes when a bug cuts it (the bug is raised all the same, to be
    logged with its traceback). A write ending with
    `final` is the last (one send saved); otherwise an empty write ends the
    body. `cut_reason` says why the stream was cut short, for its log line.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        headers: dict[str, str],
        *,
        shutdown: Callable[[], bytes],
        final: bytes | None,
        write_timeout: float = 30.0,
        broken: Callable[[], bytes] | None = None,
    ) -> None:
        self.chunks = chunks
        self.write_timeout = write_timeout
        self.shutdown = shutdown
        self.broken = broken
        self.final = final
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self.cut_reason = SERVER_SHUTTING_DOWN  # until the client is seen to go away, or a bug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, task, self))
        writes = Deadline()
        now, write_timeout, final = writes.now, self.write_timeout, self.final
        started = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            started = True
            self.raw_headers = []  # sent: not kept for the stream's life (memory per open stream)
            async for data in self.chunks:
                last = final is not None and data.endswith(final)
                writes.enter(now() + write_timeout)
                await send({"type": "http.response.body", "body": data, "more_body": not last})
                writes.leave()
                if last:
                    return
                del data  # not held while the next chunk is awaited (memory per open stream)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.cut_reason = CLIENT_DISCONNECTED  # the client went away while we were sending
        except Exception:
            self.cut_reason = INTERNAL_ERROR  # logged with its traceback by the app
            if started and (broken := self.broken) is not None:
                await self._after_a_bug(send, writes, broken)
            raise
        except asyncio.CancelledError:
            if writes.expired():
                self.cut_reason = CLIENT_DISCONNECTED  # it read too slowly: dropped
            if watcher.done() and not watcher.cancelled():
                task.uncancel()  # the watcher saw the client go away: nothing more to send
            if task.cancelling() > cancelling:  # the server cancelled us: it is stopping
                if not started:
                    raise
                await self._shutting_down(send, writes)
                task.uncancel()
        finally:
            watcher.cancel()
            writes.close()
            await self.chunks.aclose()

    async def _after_a_bug(self, send: Send, writes: Deadline, broken: Callable[[], bytes]) -> None:
        """A bug cut the stream: end it in-band, so the client sees an error
        rather than a broken connection. Best effort: the bug may be in what
        would write it, and the bug that matters is the one being raised."""
        writes.leave()  # a bug raised between enter and leave leaves the write deadline set
        with contextlib.suppress(Exception):
            await self._end_in_band(send, writes, broken)

    async def _shutting_down(self, send: Send, writes: Deadline) -> None:
        """The server cancelled this response: end the stream in-band, so the
        client sees why it stopped (bounded: the server is on its way out)."""
        await self._end_in_band(send, writes, self.shutdown)

    async def _end_in_band(self, send: Send, writes: Deadline, end: Callable[[], bytes]) -> None:
        """Send `end()` as the last write (bounded: the stream is over either way)."""
        writes.enter(writes.now() + min(self.write_timeout, SHUTDOWN_WRITE_SECONDS))
        try:
            await send({"type": "http.response.body", "body": end(), "more_body": False})
        except OSError:
            pass  # the client went away meanwhile
        except asyncio.CancelledError:
            if not writes.expired():
                raise
        finally:
            writes.leave()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any], response: SSEResponse) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            response.cut_reason = CLIENT_DISCONNECTED
            task.cancel()
            return
