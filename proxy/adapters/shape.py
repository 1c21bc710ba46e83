"""A stream's content chunks read without parsing each one whole.

An upstream writes its content chunks the same way, byte for byte, except for
the text: `{"id":"c1",...,"choices":[{"index":0,"delta":{"content":"Hi"},
"finish_reason":null}]}`. `ContentShape` learns that shape from a chunk that
was parsed whole (the bytes before and after its text) and reads a later
chunk with the same bytes around a JSON string as that chunk with this text:
one small parse instead of a whole object, for most chunks of most streams.

Why a match is that chunk: the shape is kept only when putting another string
in the text's place parses to the same object with only that text changed (a
probe, checked once per shape); a JSON string token put after the same bytes
leaves the parser in the same state, so the same bytes after it mean the same
rest of the object. The text of a match must parse alone as one JSON string
(orjson refuses anything after it), so it cannot hide more keys. Anything else
(another shape, a finish, usage, an error, a second choice) is parsed whole.
OpenAI ends each chunk with a random `obfuscation` string (padding against
traffic analysis): such chunks are matched with that last key cut off, which
changes nothing a chunk is read for; the client gets the bytes as they came.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from proxy.adapters.base import Chunk

_KEY: Final = b'"content":'
_PROBE: Final = "\x01"
_TEXT_DELTA: Final = frozenset({"role", "content"})  # what `describe` takes as a plain text delta
# OpenAI pads each chunk with a random string as its last key: a shape is learnt
# and matched without it (see `_unpadded`).
_PADDING: Final = b',"obfuscation":'
# A shape that matched no chunk was not worth learning; after this many such
# shapes in a row, the stream is parsed chunk by chunk (its chunks differ more).
_FUTILE: Final = 2


class ContentShape:
    """The learnt shape of one stream's plain content chunks (see the module)."""

    __slots__ = ("_cut", "_end", "_futile", "_hits", "_model", "_padded", "_prefix", "_suffix")

    def __init__(self) -> None:
        self._prefix = b""
        self._suffix = b""
        self._cut = 0  # len(prefix)
        self._end = 0  # len(suffix)
        self._model: str | None = None
        self._hits = 0
        self._futile = 0
        self._padded = False  # learnt from chunks with OpenAI's `obfuscation`: matched without it

    def text(self, payload: bytes) -> str | None:
        """The text of the chunk `payload` is, when it has the learnt shape; None otherwise."""
        cut = self._cut
        if not cut:
            return None
        end = _padding_at(payload) if self._padded else len(payload)  # where the shape's bytes end
        if end <= cut + self._end:
            return None
        if not payload.startswith(self._prefix) or not payload.endswith(self._suffix, 0, end):
            return None
        try:
            text = orjson.loads(payload[cut : end - self._end])
        except orjson.JSONDecodeError:
            return None
        if type(text) is not str:
            return None
        self._hits += 1
        return text

    def read(self, payload: bytes) -> Chunk | None:
        """The chunk `payload` is (as `describe` would say), when it has the learnt shape; None otherwise."""
        text = self.text(payload)
        if text is None:
            return None
        return Chunk(payload, has_content=bool(text), model=self._model, text=text)

    def learn(self, payload: bytes, parsed: dict[str, Any]) -> None:
        """Take the shape of `payload` (parsed whole) if it is a plain content
        chunk (one choice, a delta of text and perhaps a role, no finish, no
        usage) and the probe proves its text the only part that may vary."""
        if self._futile >= _FUTILE or parsed.get("usage") is not None:
            return
        choices = parsed.get("choices")
        if type(choices) is not list or len(choices) != 1 or type(choice := choices[0]) is not dict:
            return
        delta = choice.get("delta")
        if choice.get("finish_reason") is not None or type(delta) is not dict or not delta.keys() <= _TEXT_DELTA:
            return
        text = delta.get("content")
        if type(text) is not str or not text:
            return
        padded = "obfuscation" in parsed
        if padded:  # the shape is the bytes before the padding; the probe puts the object's end back
            padding = _padding_at(payload)
            if padding < 0:
                return
            payload = payload[:padding]
            parsed = {key: value for key, value in parsed.items() if key != "obfuscation"}
        at = payload.find(_KEY)
        if at < 0:
            return
        start = at + len(_KEY)
        literal = orjson.dumps(text)
        end = start + len(literal)
        if payload[start:end] != literal:
            return  # written otherwise (a space, other escapes): this chunk teaches nothing
        prefix, suffix = payload[:start], payload[end:]
        if not _only_the_text_varies(prefix, suffix + b"}" if padded else suffix, parsed, text):
            return
        if self._cut and not self._hits:
            self._futile += 1
        model = parsed.get("model")
        self._prefix, self._suffix, self._cut, self._end = prefix, suffix, len(prefix), len(suffix)
        self._model, self._hits, self._padded = model if type(model) is str else None, 0, padded


def _only_the_text_varies(prefix: bytes, suffix: bytes, parsed: dict[str, Any], text: str) -> bool:
    """Whether another string in the text's place parses to `parsed` with only
    `choices[0].delta.content` changed."""
    try:
        probe = orjson.loads(prefix + orjson.dumps(_PROBE) + suffix)
        delta = probe["choices"][0]["delta"]
        if delta["content"] != _PROBE:
            return False
        delta["content"] = text
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return False
    return bool(probe == parsed)


def _padding_at(payload: bytes) -> int:
    """Where OpenAI's `obfuscation` begins when it is the chunk's last key, with
    a string (`...,"obfuscation":"x7Q"}`); -1 otherwise. Only the object's own
    last key passes: the rest after the key must parse as one string, and then
    the object's closing brace ends the payload."""
    if not payload.endswith(b'"}'):
        return -1
    at = payload.rfind(_PADDING)
    if at < 0:
        return -1
    try:
        value = orjson.loads(payload[at + len(_PADDING) : -1])
    except orjson.JSONDecodeError:
        return -1
    return at if type(value) is str else -1
