"""SSE decoding of upstream bytes, however they are split."""

from __future__ import annotations

import pytest

from proxy.relay import SSEDecoder

STREAM = (
    b"event: message_start\r\ndata: {\"a\": 1}\r\n\r\n"
    b": a comment\n\n"
    b"data: {\"b\": 2}\n\n"
    b"data: line one\ndata: line two\n\n"
    b"data:[DONE]\n\n"
)
EXPECTED = [
    (b"message_start", b'{"a": 1}'),
    (None, b'{"b": 2}'),
    (None, b"line one\nline two"),
    (None, b"[DONE]"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, len(STREAM)])
def test_decoder_handles_any_split(size: int) -> None:
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(STREAM), size):
        events.extend(decoder.feed(STREAM[i : i + size]))
    events.extend(decoder.flush())
    assert events == EXPECTED


def test_last_event_without_blank_line_is_flushed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: {\"x\": 1}") == []
    assert decoder.flush() == [(None, b'{"x": 1}')]
