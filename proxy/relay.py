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

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from proxy.adapters.base import Chunk
from proxy.deadline import Deadline
from proxy.dispatch import StreamSession, StreamStart
from proxy.errors import ProviderError, error_body
from proxy.observe import RequestRecord

DONE = b"data: [DONE]\n\n"
CLIENT_DISCONNECTED = "client_disconnected"
SERVER_SHUTTING_DOWN = "server_shutting_down"
INTERNAL_ERROR = "internal_error"  # a bug ended the stream: its traceback is logged
SHUTTING_DOWN_EVENT = (
    b"data: "
    + error_body(
        "The proxy is shutting down and cut this stream before its end; send the request again.",
        "server_error",
        SERVER_SHUTTING_DOWN,
    )
    + b"\n\n"
)
SHUTDOWN_WRITE_SECONDS = 1.0


class SSEDecoder:
    """Incremental `text/event-stream` decoder yielding `(event, data)` pairs.

    Only `event:` and `data:` fields matter to us; comments and ids are ignored.
    """

    __slots__ = ("_buffer", "_data", "_event")

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


class _Transcript:
    """What the client has been sent: the text so far (to continue it), the
    stream's id and created (kept when another provider continues it)."""

    __slots__ = ("identity", "parts", "tool_calls")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tool_calls = False
        self.identity: tuple[object, object] | None = None

    def note(self, chunk: Chunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
        self.tool_calls = self.tool_calls or chunk.tool_calls
        if self.identity is None:
            first = orjson.loads(chunk.payload)
            self.identity = (first.get("id"), first.get("created"))

    @property
    def partial(self) -> str:
        """The text to continue; empty when it cannot be continued as text."""
        return "" if self.tool_calls else "".join(self.parts)

    def rebrand(self, chunk: Chunk) -> bytes:
        """A continuing provider's chunk under the stream's own id and created."""
        assert self.identity is not None
        data = orjson.loads(chunk.payload)
        data["id"], data["created"] = self.identity
        return orjson.dumps(data)


async def client_stream(
    session: StreamSession,
    on_end: Callable[[str, ProviderError | None], None],
    cut_by: Callable[[], str] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The bytes sent to the client: the held chunks, the rest of the upstream
    stream (each read bounded by the idle and total deadlines), then `[DONE]`.

    When the provider fails after the first token, the next provider on the
    graph continues the answer in the same stream (same id and created, no
    repeated text) if the route allows it; otherwise the stream ends with an
    in-band error event. Closing this generator (client gone) closes the
    upstream; `on_end` is called once with the outcome ("ok",
    "stream_interrupted", or when the stream is cut short what `cut_by` says:
    by default "client_disconnected") and the last failure. The held chunks go
    out as one write, and so do the chunks of one upstream read (`Chunk.more`);
    `[DONE]` is always the end of the last write.
    """
    record = session.record
    transcript = _Transcript()
    start, continuing = session.start, False
    outcome: str | None = None
    failure: ProviderError | None = None

    def emit(chunk: Chunk) -> bytes | None:
        if not _forward(chunk, start, record):
            return None
        transcript.note(chunk)
        return format_event(transcript.rebrand(chunk) if continuing else chunk.payload)

    ending = b""
    batch: list[bytes] = []  # events of one upstream read not yet sent: they go out as one write
    try:
        while outcome is None:
            more = bool(start.head) and start.head[-1].more
            batch += [data for chunk in _pending(start, continuing) if (data := emit(chunk))]
            if batch and not more:
                yield b"".join(batch)
                batch = []
            try:
                while (chunk_or_end := await start.next_chunk()) is not None:
                    if (data := emit(chunk_or_end)) is not None:
                        batch.append(data)
                    if batch and not chunk_or_end.more:
                        yield batch[0] if len(batch) == 1 else b"".join(batch)
                        batch = []
                outcome = "ok"
            except ProviderError as exc:
                failure = record_interruption(record, exc)
                if batch:  # what came before the failure in its read: sent before any wait
                    yield b"".join(batch)
                    batch = []
                await start.close()
                resumed = await session.continue_after(exc, transcript.partial)
                if resumed is None:
                    outcome = "stream_interrupted"
                    ending = error_event(exc)
                else:
                    start, continuing = resumed, True
        ending = b"".join(batch) + ending if batch else ending
        yield ending + _continued_comment(session) + DONE if session.continued else ending + DONE
    except Exception:
        outcome = INTERNAL_ERROR  # a bug: logged with its traceback by the app
        raise
    finally:
        await start.close()
        if outcome != "stream_interrupted":  # an interrupted provider was accounted for already
            session.ended(None)
        on_end(outcome or (cut_by() if cut_by is not None else "client_disconnected"), failure)


def record_interruption(record: RequestRecord, failure: ProviderError) -> ProviderError:
    record.interrupted = failure.failure.value
    return failure


def _pending(start: StreamStart, continuing: bool) -> list[Chunk]:
    """The chunks to send now; a continuing provider's opening role chunk is dropped."""
    head, start.head = start.head, []
    if not continuing:
        return head
    return [c for c in head if c.has_content or c.finish_reason is not None or c.usage is not None]


def _continued_comment(session: StreamSession) -> bytes:
    """An SSE comment (ignored by OpenAI clients) naming who answered, for operators."""
    providers = ",".join(session.providers)
    return f": fallback-proxy continued this stream across providers: {providers}\n\n".encode()


def _forward(chunk: Chunk, start: StreamStart, record: RequestRecord) -> bool:
    """Note the chunk's usage; False for a usage-only chunk the client did not ask for."""
    if chunk.usage is None:
        return True
    record.usage = chunk.usage
    return not (start.hide_usage and not chunk.has_content and chunk.finish_reason is None)


class SSEResponse(Response):
    """A server-sent-event response that always closes its source: when the
    stream ends, fails, or the client goes away mid-stream.

    A client reading slower than `write_timeout` (a send still blocked after
    it) pins buffers: it is dropped. When the server cancels the response (its
    shutdown grace period is over), the client is sent an in-band
    `server_shutting_down` error event and `[DONE]` before the stream ends.
    `cut_reason` says why the stream was cut short, for its log line.
    """

    media_type = "text/event-stream"

    def __init__(
        self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str], write_timeout: float = 30.0
    ) -> None:
        self.chunks = chunks
        self.write_timeout = write_timeout
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
        now, write_timeout = writes.now, self.write_timeout
        started = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            started = True
            async for data in self.chunks:
                last = data.endswith(DONE)
                writes.enter(now() + write_timeout)
                await send({"type": "http.response.body", "body": data, "more_body": not last})
                writes.leave()
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.cut_reason = CLIENT_DISCONNECTED  # the client went away while we were sending
        except Exception:
            self.cut_reason = INTERNAL_ERROR  # logged with its traceback by the app
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

    async def _shutting_down(self, send: Send, writes: Deadline) -> None:
        """The server cancelled this response: end the stream in-band, so the
        client sees why it stopped (bounded: the server is on its way out)."""
        writes.enter(writes.now() + min(self.write_timeout, SHUTDOWN_WRITE_SECONDS))
        try:
            await send({"type": "http.response.body", "body": SHUTTING_DOWN_EVENT + DONE, "more_body": False})
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
