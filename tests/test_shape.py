"""ContentShape: a stream's content chunks read by their learnt shape are
exactly the chunks a whole parse describes, and nothing else is read by it."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.adapters import shape as shape_module
from proxy.adapters.base import Chunk, describe
from proxy.adapters.shape import ContentShape


def payload(content: Any, *, finish: str | None = None, tail: str = "", **delta: Any) -> bytes:
    """A chunk as an OpenAI-compatible server writes it (compact JSON, UTF-8)."""
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m-1",
        "choices": [{"index": 0, "delta": {**delta, "content": content}, "logprobs": None, "finish_reason": finish}],
    }
    return orjson.dumps(chunk)[:-1] + tail.encode() + b"}"


def parsed(data: bytes) -> Chunk:
    return describe(data, orjson.loads(data))


def taught(*payloads: bytes) -> ContentShape:
    shape = ContentShape()
    for data in payloads:
        shape.learn(data, orjson.loads(data))
    return shape


def same(ours: Chunk | None, data: bytes) -> None:
    assert ours is not None
    whole = parsed(data)
    fields = ("payload", "has_content", "finish_reason", "usage", "model", "text", "tool_calls")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(whole, f) for f in fields}
    assert ours.parsed() == whole.parsed()


@given(st.text())
def test_a_chunk_of_the_learnt_shape_is_the_chunk_a_whole_parse_gives(text: str) -> None:
    shape = taught(payload("Hello"))
    data = payload(text)
    same(shape.read(data), data)


@pytest.mark.parametrize("text", ['say "hi"', "back\\slash", "line\nbreak", "é and 中", "\u2028", "", "\x00"])
def test_escapes_written_the_other_way_read_the_same(text: str) -> None:
    """Python's json.dumps (ASCII escapes, as many servers write) and orjson agree on the text."""
    shape = taught(payload("Hello"))
    ascii_escaped = payload("X").replace(b'"X"', json.dumps(text).encode())
    same(shape.read(ascii_escaped), ascii_escaped)


@pytest.mark.parametrize(
    "middle",
    [
        b'"a","x":"b"',  # a second key hidden in the text's place
        b'"a"},"evil":{"content":"b"',
        b"12",
        b"null",
        b'"unterminated',
        b'["a"]',
    ],
)
def test_what_is_not_one_string_in_the_texts_place_is_parsed_whole(middle: bytes) -> None:
    shape = taught(payload("Hello"))
    template = payload("Hello")
    assert shape.read(template.replace(b'"Hello"', middle)) is None


@pytest.mark.parametrize(
    "other",
    [
        payload("x", finish="stop"),
        payload("x", role="assistant"),
        payload("x", tail=',"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'),
        payload("x", tail=',"obfuscation":"abc"'),
        b'{"error":{"message":"overloaded"}}',
    ],
)
def test_other_shapes_are_not_read_by_it(other: bytes) -> None:
    assert taught(payload("Hello")).read(other) is None


@pytest.mark.parametrize(
    "teacher",
    [
        payload("", role="assistant"),  # no text
        payload("x", finish="stop"),
        payload("x", tail=',"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'),
        payload("x").replace(b'"content":"x"', b'"content": "x"'),  # written with a space: not located
        orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "a"}}]}),
    ],
)
def test_only_a_plain_content_chunk_teaches_a_shape(teacher: bytes) -> None:
    shape = taught(teacher)
    assert shape.read(teacher) is None
    assert shape.read(payload("y")) is None


def test_a_shape_whose_content_key_is_not_the_deltas_is_refused() -> None:
    """The first `"content":` in the bytes is another object's: the probe shows
    that the text's place is not the delta's content."""
    teacher = orjson.dumps(
        {"meta": {"content": "hi"}, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    )
    shape = taught(teacher)
    assert shape.read(teacher.replace(b'"hi"', b'"other"', 1)) is None


def test_a_stream_whose_chunks_all_differ_stops_learning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose every chunk differs outside its text (here a `created`
    that moves) shares no shape between chunks: after a few futile shapes the
    stream is parsed as it always was, without a probe per chunk."""
    probes: list[bytes] = []
    real = shape_module._only_the_text_varies

    def counted(prefix: bytes, suffix: bytes, whole: dict[str, Any], text: str) -> bool:
        probes.append(prefix)
        return real(prefix, suffix, whole, text)

    monkeypatch.setattr(shape_module, "_only_the_text_varies", counted)
    shape = ContentShape()
    for i in range(50):
        data = payload(f"t{i}").replace(b'"created":1', b'"created":%d' % (1000 + i))
        assert shape.read(data) is None
        shape.learn(data, orjson.loads(data))
    assert len(probes) <= 3


def padded(content: str, padding: str) -> bytes:
    """A chunk as OpenAI writes it: a random `obfuscation` string as its last key."""
    return payload(content, tail=f',"obfuscation":{json.dumps(padding)}')


@given(st.text(), st.text())
def test_openai_chunks_padded_at_random_are_read_by_their_shape(text: str, padding: str) -> None:
    shape = taught(padded("Hello", "Zx3"))
    data = padded(text, padding)
    same(shape.read(data), data)  # the payload kept as it came, padding included


@pytest.mark.parametrize(
    "other",
    [
        padded("x", "p")[:-1] + b',"more":1}',  # the padding not the last key
        payload("x", tail=',"obfuscation":7'),  # not a string
        payload("x", tail=',"obfuscation":"p","obfuscation":"q"'),  # a string and more after the key
        payload("x", tail=',"meta":{"obfuscation":"p"}'),  # someone else's key
        payload("x", finish="stop", tail=',"obfuscation":"p"'),
        payload("x"),  # no padding: another shape
    ],
)
def test_padding_is_cut_only_where_it_is_the_chunks_last_key(other: bytes) -> None:
    assert taught(padded("Hello", "Zx3")).read(other) is None
