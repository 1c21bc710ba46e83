"""The Responses API as a stream session's wire format (`proxy.stream.Encoder`):
the session decides which chunks reach the client and how the stream ends;
`ResponsesStream` turns that into `response.*` events."""

from __future__ import annotations

from proxy.adapters.base import Chunk, Usage
from proxy.errors import FailureClass, ProviderError
from proxy.responses.events import ResponsesStream
from proxy.stream.encoders import BROKEN_MESSAGE, SHUTDOWN_MESSAGE, interrupted_message


class ResponsesEncoder:
    """`response.created` first, one or more events per chunk, then
    `response.completed` (or `.incomplete`); a stream no provider could finish
    ends with `response.failed` carrying the error, never a `completed`."""

    __slots__ = ("events",)

    final: bytes | None = None  # no `[DONE]`: the last write is followed by the body's end

    def __init__(self, events: ResponsesStream) -> None:
        self.events = events

    def opening(self) -> bytes:
        return self.events.opening()

    def chunk(self, chunk: Chunk, continuing: bool) -> bytes:
        if chunk.data is None and not chunk.tool_calls and chunk.finish_reason is None and chunk.usage is None:
            # read by its shape (`ContentShape`): its text is all it carries, no need to parse it whole
            return self.events.text(chunk.text, chunk.model)
        return self.events.feed(chunk.parsed())

    def finished(self, usage: Usage | None, providers: list[str]) -> bytes:
        return self.events.completed(usage)

    def failed(self, failure: ProviderError, providers: list[str]) -> bytes:
        code = "rate_limit_exceeded" if failure.failure is FailureClass.RATE_LIMITED else "server_error"
        return self.events.failed(code, interrupted_message(failure))

    def shutting_down(self) -> bytes:
        return self.events.failed("server_error", SHUTDOWN_MESSAGE)

    def broken(self) -> bytes:
        return self.events.failed("server_error", BROKEN_MESSAGE)
