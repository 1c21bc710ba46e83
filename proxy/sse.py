"""The `text/event-stream` codec: a leaf that adapters (reading upstream) and
the stream module (writing to the client) both import; it imports nothing of
ours.

`SSEDecoder` splits bytes into `(event, data)` pairs without building any
object per event; `format_event` frames one `data:` event; `DONE` is the
OpenAI end-of-stream event.
"""

from __future__ import annotations

from typing import Final

DONE: Final = b"data: [DONE]\n\n"

Event = tuple[bytes | None, bytes]


class SSEDecoder:
    """Incremental `text/event-stream` decoder yielding `(event, data)` pairs.

    Only `event:` and `data:` fields matter to us; comments and ids are ignored.
    Lines may end in LF or CRLF, and the ending may change mid-stream.
    """

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        events: list[Event] = []
        for line in lines:
            self._line(line.rstrip(b"\r"), events)
        return events

    def flush(self) -> list[Event]:
        """Whatever remains when the upstream closes (a last event without its blank line)."""
        events: list[Event] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._data:
                events.append((self._event, b"\n".join(self._data)))
            self._event = None
            self._data = []
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()


def format_event(payload: bytes, event: bytes | None = None) -> bytes:
    """One SSE event carrying `payload` (JSON without newlines), named `event` when given."""
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event + b"\ndata: " + payload + b"\n\n"


def format_comment(text: str) -> bytes:
    """An SSE comment line: ignored by every client, visible to an operator reading the wire."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"
