"""SSE decoding of upstream bytes, however they are split."""

from __future__ import annotations

import pytest

from proxy.sse import SSEDecoder

STREAM = (
    b'event: message_start\r\ndata: {"a": 1}\r\n\r\n'
    b": a comment\n\n"
    b'data: {"b": 2}\n\n'
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
    assert decoder.feed(b'data: {"x": 1}') == []
    assert decoder.flush() == [(None, b'{"x": 1}')]


LF_STREAM = (
    b'data: {"a": 1}\n\n'
    b": a comment\n\n\n"
    b'event: message_delta\ndata: {"b": 2}\n\n'
    b'id: 7\ndata:{"c": 3}\n\n'
    b"data: line one\ndata: line two\n\n"
    b'data: {"d": 4}\n\n'
    b"data: [DONE]\n\n"
)
LF_EXPECTED = [
    (None, b'{"a": 1}'),
    (b"message_delta", b'{"b": 2}'),
    (None, b'{"c": 3}'),
    (None, b"line one\nline two"),
    (None, b'{"d": 4}'),
    (None, b"[DONE]"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 40, len(LF_STREAM)])
def test_decoder_handles_any_split_of_line_feed_only_streams(size: int) -> None:
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(LF_STREAM), size):
        events.extend(decoder.feed(LF_STREAM[i : i + size]))
    events.extend(decoder.flush())
    assert events == LF_EXPECTED


def test_decoder_switches_line_endings_mid_stream() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b'data: {"a": 1}\n\nevent: e\ndata: x\n')
    events += decoder.feed(b'data: y\r\n\r\ndata: {"z": 0}\n\n')
    events += decoder.feed(b"data: tail")
    events += decoder.flush()
    assert events == [(None, b'{"a": 1}'), (b"e", b"x\ny"), (None, b'{"z": 0}'), (None, b"tail")]
