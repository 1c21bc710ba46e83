"""A stream assembled into the exact non-stream body, checked by the openai SDK's own types."""

from __future__ import annotations

from typing import Any

import orjson
from openai.types.chat import ChatCompletion

from proxy.adapters import Chunk
from proxy.adapters.shape import ContentShape
from proxy.stream import Assembler

ENVELOPE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "gpt-x"}


def chunk(choices: list[dict[str, Any]], **extra: Any) -> Chunk:
    return Chunk.from_dict({**ENVELOPE, "choices": choices, **extra})


def assemble(chunks: list[Chunk]) -> dict[str, Any]:
    assembler = Assembler()
    for c in chunks:
        assembler.add(c)
    completion = assembler.completion()
    body: dict[str, Any] = orjson.loads(completion.body)
    ChatCompletion.model_validate(body)  # the SDK reads it as it reads OpenAI's own
    return body


def test_text_of_every_choice_with_logprobs_usage_and_fingerprint() -> None:
    lp = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    body = assemble(
        [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
            chunk([{"index": 0, "delta": {"content": "Hi"}, "logprobs": {"content": [lp]}, "finish_reason": None}]),
            chunk([{"index": 1, "delta": {"role": "assistant", "content": "Yo"}, "finish_reason": None}]),
            chunk([{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}], system_fingerprint="fp_1"),
            chunk([{"index": 1, "delta": {}, "finish_reason": "length"}]),
            chunk([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        ]
    )
    assert body["id"] == "chatcmpl-1" and body["object"] == "chat.completion" and body["created"] == 7
    assert body["model"] == "gpt-x" and body["system_fingerprint"] == "fp_1"
    first, second = body["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hi there", "refusal": None}
    assert first["finish_reason"] == "stop" and first["logprobs"] == {"content": [lp]}
    assert second["index"] == 1 and second["message"]["content"] == "Yo" and second["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_tool_calls_are_joined_by_index() -> None:
    def call(index: int, **fields: Any) -> Chunk:
        return chunk([{"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}, "finish_reason": None}])

    body = assemble(
        [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]),
            call(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
            call(0, function={"arguments": '{"city": '}),
            call(1, id="call_b", type="function", function={"name": "get_time", "arguments": "{}"}),
            call(0, function={"arguments": '"Paris"}'}),
            chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        ]
    )
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_a_refusal_and_reasoning() -> None:
    body = assemble(
        [
            chunk([{"index": 0, "delta": {"reasoning_content": "thinking"}, "finish_reason": None}]),
            chunk([{"index": 0, "delta": {"refusal": "I can't"}, "finish_reason": None}]),
            chunk([{"index": 0, "delta": {"refusal": " help."}, "finish_reason": "stop"}]),
        ]
    )
    message = body["choices"][0]["message"]
    assert message["refusal"] == "I can't help." and message["content"] is None
    assert message["reasoning_content"] == "thinking"
    assert "usage" not in body


def test_a_legacy_function_call_is_joined_and_odd_pieces_are_skipped() -> None:
    def delta(**fields: Any) -> Chunk:
        return chunk([{"index": 0, "delta": fields, "finish_reason": None}])

    body = assemble(
        [
            delta(role="assistant", content=None),
            delta(function_call={"name": "get_weather", "arguments": ""}),
            delta(function_call={"arguments": '{"city": "Paris"}'}, tool_calls=["not a call"]),
            delta(function_call={"arguments": 7}),  # not a string: nothing to join
            chunk([{"index": 0, "finish_reason": "function_call"}]),  # no delta at all
        ]
    )
    (choice,) = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert choice["finish_reason"] == "function_call"


def test_texts_of_a_learnt_shape_assemble_as_their_chunks_would() -> None:
    """A non-stream answer's plain content chunks reach the assembler as their
    text (`ContentShape`): the body is the one the whole chunks make."""
    payloads = [
        orjson.dumps({**ENVELOPE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        *(
            orjson.dumps({**ENVELOPE, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            for piece in ("Hel", "lo", "", ' "world"')
        ),
        orjson.dumps({**ENVELOPE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        orjson.dumps({**ENVELOPE, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4}}),
    ]
    whole, shaped = Assembler(), Assembler()
    shape = ContentShape()
    texts = 0
    for data in payloads:
        whole.add_data(orjson.loads(data))
        text = shape.text(data)
        if text is None:
            shaped.add_data(orjson.loads(data))
            shape.learn(data, orjson.loads(data))
        else:
            assert shaped.add_read([text]) is bool(text)
            texts += 1
    assert texts == 3  # "lo", "" and ' "world"': the first content chunk taught the shape
    assert shaped.completion().body == whole.completion().body
    assert orjson.loads(shaped.completion().body)["choices"][0]["message"]["content"] == 'Hello "world"'
