"""SSE parsing and formatting, and the client-facing stream.

The client always receives one OpenAI-format event stream:
`data: <chat.completion.chunk>` events, at most one in-band error event, then
`data: [DONE]`. Upstream bytes are split into events without building any
object per chunk beyond one `orjson.loads` done by the adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from proxy.adapters.base import Chunk
from proxy.dispatch import StreamStart
from proxy.errors import ProviderError, error_body
from proxy.observe import RequestRecord

DONE = b"data: [DONE]\n\n"


class SSEDecoder:
    """Incremental `text/event-stream` decoder yielding `(event, data)` pairs.

    Only `event:` and `data:` fields matter to us; comments and ids are ignored.
    """

    __slots__ = ("_buffer", "_event", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        events: list[tuple[bytes | None, bytes]] = []
        for line in lines:
            self._line(line.rstrip(b"\r"), events)
        return events

    def flush(self) -> list[tuple[bytes | None, bytes]]:
        """Whatever remains when the upstream closes (a last event without its blank line)."""
        events: list[tuple[bytes | None, bytes]] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[tuple[bytes | None, bytes]]) -> None:
        if not line:
            if self._data:
                events.append((self._event, b"\n".join(self._data)))
            self._event = None
            self._data = []
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()


async def iter_sse(byte_stream: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes | None, bytes]]:
    decoder = SSEDecoder()
    async for chunk in byte_stream:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event


def format_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_event(error: ProviderError) -> bytes:
    """The in-band error sent when a provider fails after the first token."""
    message = f"The provider '{error.provider}' failed mid-stream ({error.failure.value}): {error.message}"
    return format_event(error_body(message, "server_error", "stream_interrupted"))


async def client_stream(
    start: StreamStart, record: RequestRecord, on_end: Callable[[str, ProviderError | None], None]
) -> AsyncGenerator[bytes, None]:
    """The bytes sent to the client: the held chunks, the rest of the upstream
    stream (each read bounded by the idle and total deadlines), then `[DONE]`.

    A failure after the first token ends the stream with an in-band error
    event. Closing this generator (client gone) closes the upstream; `on_end`
    is called once with the outcome ("ok", "stream_interrupted" or
    "client_disconnected") and the failure, if any.
    """
    outcome = "client_disconnected"
    failure: ProviderError | None = None
    try:
        for chunk in start.head:
            if _forward(chunk, start, record):
                yield format_event(chunk.payload)
        while True:
            try:
                next_chunk = await start.next_chunk()
            except ProviderError as exc:
                outcome, failure = "stream_interrupted", exc
                record.interrupted = exc.failure.value
                yield error_event(exc)
                break
            if next_chunk is None:
                outcome = "ok"
                break
            if _forward(next_chunk, start, record):
                yield format_event(next_chunk.payload)
        yield DONE
    finally:
        await start.close()
        on_end(outcome, failure)


def _forward(chunk: Chunk, start: StreamStart, record: RequestRecord) -> bool:
    """Note the chunk's usage; False for a usage-only chunk the client did not ask for."""
    if chunk.usage is None:
        return True
    record.usage = chunk.usage
    return not (start.hide_usage and not chunk.has_content and chunk.finish_reason is None)


class SSEResponse(Response):
    """A server-sent-event response that always closes its source: when the
    stream ends, fails, or the client goes away mid-stream."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, task))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were sending
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise
            task.uncancel()  # the watcher saw the client go away: nothing more to send
        finally:
            watcher.cancel()
            await self.chunks.aclose()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


