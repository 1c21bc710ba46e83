"""The stream codecs: `text/event-stream` (SSE), and the NDJSON lines some
providers stream instead. A leaf that adapters (reading upstream), the stream
module (writing to the client), the fakes, the demo and the drill all import;
it imports nothing of ours.

Reading: `SSEDecoder` splits bytes into `(event, data)` pairs; where the event
names do not matter, `payload_decoder("sse" | "ndjson")` gives only the
payloads (each event's data, or each line), without building a pair per event.
Every payload here is JSON (or `[DONE]`), so the whitespace around a `data:`
value is dropped. Writing: `format_event` frames one event, `format_comment` a
comment; `DONE` is the OpenAI end-of-stream event.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol

DONE: Final = b"data: [DONE]\n\n"

Event = tuple[bytes | None, bytes]
Framing = Literal["sse", "ndjson"]


class _SSELines:
    """The one SSE parser: lines may end in LF or CRLF (the ending may change
    mid-stream); `data:` lines gather, a blank line ends the event, `event:`
    names it; comments and ids are ignored."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def _decode(self, chunk: bytes, out: list[Any], names: bool) -> None:
        """Append to `out` each event that `chunk` completes: `(event, data)`
        pairs with `names`, else the data alone (one loop for both: it runs per
        upstream read, so nothing in it calls out per line)."""
        lines = (self._buffer + chunk if self._buffer else chunk).split(b"\n")
        self._buffer = lines.pop()
        data = self._data
        for line in lines:
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif not line.rstrip(b"\r"):
                if data:
                    out.append((self._event, b"\n".join(data)) if names else b"\n".join(data))
                    data.clear()
                self._event = None
            elif names and line.startswith(b"event:"):
                self._event = line[6:].strip()

    def _end(self, out: list[Any], names: bool) -> None:
        """What remains when the upstream closes (a last event without its blank line)."""
        self._decode(b"\n\n" if self._buffer else b"\n", out, names)


class SSEDecoder(_SSELines):
    """Incremental `text/event-stream` decoder yielding `(event, data)` pairs."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        self._decode(chunk, events, True)
        return events

    def flush(self) -> list[Event]:
        """Whatever remains when the upstream closes (a last event without its blank line)."""
        events: list[Event] = []
        self._end(events, True)
        return events


class PayloadDecoder(Protocol):
    """The payloads of a stream, block by block."""

    def feed(self, block: bytes) -> list[bytes]: ...

    def flush(self) -> list[bytes]:
        """What remains when the upstream closes (a last event or line without its end)."""
        ...


class SSEPayloads(_SSELines):
    """Each SSE event's data, without its name."""

    __slots__ = ()

    def feed(self, block: bytes) -> list[bytes]:
        payloads: list[bytes] = []
        self._decode(block, payloads, False)
        return payloads

    def flush(self) -> list[bytes]:
        payloads: list[bytes] = []
        self._end(payloads, False)
        return payloads


class NDJSONLines:
    """Each non-blank line of a newline-delimited JSON stream."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, block: bytes) -> list[bytes]:
        lines = (self._buffer + block if self._buffer else block).split(b"\n")
        self._buffer = lines.pop()
        payloads: list[bytes] = []
        for line in lines:
            if line.strip():
                payloads.append(line)
        return payloads

    def flush(self) -> list[bytes]:
        buffer, self._buffer = self._buffer, b""
        return [buffer] if buffer.strip() else []


def payload_decoder(framing: Framing) -> PayloadDecoder:
    """The decoder for a stream framed as SSE events or as NDJSON lines."""
    return SSEPayloads() if framing == "sse" else NDJSONLines()


def format_event(payload: bytes, event: bytes | None = None) -> bytes:
    """One SSE event carrying `payload` (JSON without newlines), named `event` when given."""
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event + b"\ndata: " + payload + b"\n\n"


def format_comment(text: str) -> bytes:
    """An SSE comment line: ignored by every client, visible to an operator reading the wire."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"
