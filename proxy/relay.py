"""SSE parsing and formatting, and the client-facing stream.

The client always receives one OpenAI-format event stream:
`data: <chat.completion.chunk>` events, at most one in-band error event, then
`data: [DONE]`. Upstream bytes are split into events without building any
object per chunk beyond one `orjson.loads` done by the adapter.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

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
    start: StreamStart, record: RequestRecord, on_end: Callable[[str], None]
) -> AsyncGenerator[bytes, None]:
    """The bytes sent to the client: the held chunks, the rest of the upstream
    stream (each read bounded by the idle and total deadlines), then `[DONE]`.

    A failure after the first token ends the stream with an in-band error
    event. Closing this generator (client gone) closes the upstream; `on_end`
    gets the outcome once: "ok", "stream_interrupted" or "client_disconnected".
    """
    outcome = "client_disconnected"
    try:
        for chunk in start.head:
            if chunk.usage is not None:
                record.usage = chunk.usage
            yield format_event(chunk.payload)
        while True:
            try:
                chunk_or_end = await start.next_chunk()
            except ProviderError as exc:
                outcome = "stream_interrupted"
                record.interrupted = exc.failure.value
                yield error_event(exc)
                break
            if chunk_or_end is None:
                outcome = "ok"
                break
            if chunk_or_end.usage is not None:
                record.usage = chunk_or_end.usage
            yield format_event(chunk_or_end.payload)
        yield DONE
    finally:
        await start.close()
        on_end(outcome)
