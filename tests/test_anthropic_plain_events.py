"""The Anthropic parser reads plain events itself (litellm's parser is costly):
what it gives must be what litellm's parser gives, chunk for chunk, for plain
answers, and litellm must take over, with its state right, the moment an answer
is not plain (a tool call, thinking, cache usage, JSON mode)."""

from __future__ import annotations

import importlib
from typing import Any

import orjson
import pytest

from proxy.adapters.translated.dialects import AnthropicParser
from proxy.adapters.translated.wire import ChunkWriter
from proxy.litellm_import import load_litellm

pytestmark = pytest.mark.litellm


def start(usage: dict[str, int]) -> dict[str, Any]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": []}
    return {"type": "message_start", "message": {**message, "stop_reason": None, "usage": usage}}


def text_block(index: int, *texts: str) -> list[dict[str, Any]]:
    deltas = [
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}} for text in texts
    ]
    begin = {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
    return [begin, {"type": "ping"}, *deltas, {"type": "content_block_stop", "index": index}]


def end(reason: str, usage: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": usage},
        {"type": "message_stop"},
    ]


TOOL = [
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
    {"type": "content_block_stop", "index": 1},
]
THINKING = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
    {"type": "content_block_stop", "index": 0},
]

STREAMS = {
    "plain text": [start({"input_tokens": 12, "output_tokens": 1}), *text_block(0, "Hel", "lo."), *end("end_turn", {"output_tokens": 5})],
    "cut by max_tokens": [start({"input_tokens": 3, "output_tokens": 1}), *text_block(0, "a"), *end("max_tokens", {"output_tokens": 1})],
    "text then a tool call": [
        start({"input_tokens": 40, "output_tokens": 1}),
        *text_block(0, "Let me look."),
        *TOOL,
        *end("tool_use", {"output_tokens": 30}),
    ],
    "cache usage": [
        start({"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0}),
        *text_block(0, "Hi"),
        *end("end_turn", {"output_tokens": 2}),
    ],
    "thinking first": [start({"input_tokens": 8, "output_tokens": 1}), *THINKING, *text_block(1, "Yes."), *end("end_turn", {"output_tokens": 9})],
    "input tokens in the delta": [
        start({"input_tokens": 8, "output_tokens": 1}),
        *text_block(0, "Yes."),
        *end("end_turn", {"input_tokens": 8, "output_tokens": 4}),
    ],
}  # fmt: skip


def chunks_of(events: list[dict[str, Any]], *, plain: bool, json_mode: bool = False) -> list[dict[str, Any]]:
    """The OpenAI chunks the writer makes of what the parser gives (ids and times set aside)."""
    litellm = load_litellm()
    handler = importlib.import_module("litellm.llms.anthropic.chat.handler")
    core = importlib.import_module("litellm.litellm_core_utils.core_helpers")

    def litellms() -> Any:
        return handler.ModelResponseIterator(streaming_response=None, sync_stream=False, json_mode=json_mode)

    assert litellm is not None
    parser = AnthropicParser(litellms, plain=plain)
    writer = ChunkWriter("claude-x", True, core.map_finish_reason, id="c", created=1)
    out = []
    for event in events:
        piece = parser.feed(orjson.dumps(event))
        if piece is not None and (chunk := writer.chunk(piece)) is not None:
            out.append(orjson.loads(chunk.payload))
    out += [orjson.loads(chunk.payload) for chunk in writer.finish()]
    assert parser.complete
    return out


@pytest.mark.parametrize("name", list(STREAMS))
def test_what_the_parser_gives_is_what_litellm_gives(name: str) -> None:
    events = STREAMS[name]
    assert chunks_of(events, plain=True) == chunks_of(events, plain=False)


def test_json_mode_is_left_to_litellm_from_the_first_event() -> None:
    """JSON mode (a tool that litellm turns back into text) is never read here."""
    built: list[int] = []

    def litellms() -> Any:
        built.append(1)
        handler = importlib.import_module("litellm.llms.anthropic.chat.handler")
        return handler.ModelResponseIterator(streaming_response=None, sync_stream=False, json_mode=True)

    load_litellm()
    parser = AnthropicParser(litellms, plain=False)
    parser.feed(orjson.dumps(STREAMS["plain text"][0]))
    assert built == [1]


def test_a_plain_answer_never_builds_litellms_parser() -> None:
    built: list[int] = []

    def litellms() -> Any:
        built.append(1)
        raise AssertionError("litellm's parser was built for a plain answer")

    parser = AnthropicParser(litellms, plain=True)
    for event in STREAMS["plain text"]:
        parser.feed(orjson.dumps(event))
    assert parser.complete and built == []
