"""The pure `ResponsesStream` encoder, checked by the official SDK's own stream parsing:
its bytes are served by a tiny local server and read with `client.responses.stream(...)`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.adapters import Usage
from proxy.adapters.base import describe
from proxy.adapters.shape import ContentShape
from proxy.responses import ResponsesStream, translate
from proxy.responses.encoder import ResponsesEncoder

from .conftest import ServedApp

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-test", "choices": choices, **extra}


TEXT = [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in ["Hel", "lo ", "there."])]
CALLS = [
    chunk({"role": "assistant", "content": "Let me check."}),
    chunk(
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
    chunk(
        {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    ),
    chunk({}, "tool_calls"),
]
USAGE = chunk(None, usage={"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})


def encoder() -> ResponsesStream:
    counter = itertools.count()
    _, echo = translate({"model": "default", "input": "hi", "metadata": {"a": "b"}})
    return ResponsesStream(echo, "default", new_id=lambda prefix: f"{prefix}_{next(counter)}", now=lambda: 1700000000)


def encode(chunks: list[dict[str, Any]], end: Callable[[ResponsesStream], bytes]) -> bytes:
    stream = encoder()
    return stream.opening() + b"".join(stream.feed(c) for c in chunks) + end(stream)


def events_of(data: bytes) -> list[Any]:
    """Each SSE event, validated by the SDK's event union; `event:` must name the data's type."""
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        name, payload = block.split("\n")
        event = EVENTS.validate_json(payload.removeprefix("data: "))
        assert name == f"event: {event.type}"
        out.append(event)
    return out


@pytest.fixture
def replay(serve_asgi: Callable[[Any], ServedApp]) -> Iterator[Callable[[bytes], openai.OpenAI]]:
    """A server whose `/v1/responses` answers the given bytes as an event stream."""
    clients: list[openai.OpenAI] = []

    def start(data: bytes) -> openai.OpenAI:
        async def answer(request: Request) -> HttpResponse:
            return HttpResponse(data, media_type="text/event-stream")

        served = serve_asgi(Starlette(routes=[Route("/v1/responses", answer, methods=["POST"])]))
        clients.append(openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0))
        return clients[-1]

    yield start
    for client in clients:
        client.close()


def test_text_stream_through_the_sdk(replay: Callable[[bytes], openai.OpenAI]) -> None:
    data = encode([*TEXT, chunk({}, "stop"), USAGE], lambda s: s.completed())
    with replay(data).responses.stream(model="default", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Hello there."
    assert final.status == "completed" and final.model == "gpt-test" and final.metadata == {"a": "b"}
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (7, 4)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    Response.model_validate(final.model_dump(mode="json"))


def test_function_calls_come_out_whole(replay: Callable[[bytes], openai.OpenAI]) -> None:
    data = encode(CALLS, lambda s: s.completed(Usage(prompt_tokens=3, completion_tokens=2)))
    events = events_of(data)
    with replay(data).responses.stream(model="default", input="hi") as stream:
        final = stream.get_final_response()
    message, first, second = final.output
    assert message.type == "message" and final.output_text == "Let me check."
    assert (first.type, first.call_id, first.name, first.arguments) == ("function_call", "call_a", "f", '{"x": 1}')
    assert (second.call_id, second.name, second.arguments, second.status) == ("call_b", "g", "{}", "completed")
    assert final.usage is not None and final.usage.total_tokens == 5
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.output_index, e.name, e.arguments) for e in done] == [(1, "f", '{"x": 1}'), (2, "g", "{}")]
    # each item is closed before the next one is added, as OpenAI's own streams do
    order = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item.")]
    assert order == [
        ("response.output_item.added", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.output_item.done", 2),
    ]


def test_ids_and_indexes_are_consistent() -> None:
    events = events_of(encode([*CALLS[:1], *TEXT[1:], *CALLS[1:]], lambda s: s.completed()))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    items: dict[int, str] = {}
    for event in events:
        if event.type == "response.output_item.added":
            assert event.output_index == len(items)
            items[event.output_index] = event.item.id
        elif hasattr(event, "item_id"):
            assert items[event.output_index] == event.item_id
    texts = [e for e in events if e.type == "response.output_text.delta"]
    assert {e.content_index for e in texts} == {0}


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_cut_answers_end_incomplete(finish: str, reason: str) -> None:
    events = events_of(encode([*TEXT, chunk({}, finish)], lambda s: s.completed()))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == reason
    assert last.response.output[0].status == "incomplete"
    assert "response.completed" not in [e.type for e in events]


def test_failure_after_the_first_event_is_response_failed(replay: Callable[[bytes], openai.OpenAI]) -> None:
    stream = encoder()
    data = stream.opening() + b"".join(stream.feed(c) for c in TEXT[:2]) + stream.failed("stream_interrupted", "boom")
    assert stream.completed() == b"" and stream.feed(TEXT[2]) == b"", "a stream has one end"
    events = events_of(data)
    kinds = [e.type for e in events]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message == "boom"
    assert failed.output[0].status == "incomplete" and failed.output[0].content[0].text == "Hel"
    with replay(data).responses.stream(model="default", input="hi") as sdk_stream:
        assert [e.type for e in sdk_stream][-1] == "response.failed"
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            sdk_stream.get_final_response()


def test_a_bug_mid_stream_ends_it_with_response_failed() -> None:
    """What the stream's response sends when a bug cuts it (`Encoder.broken`): the
    Responses API's own end of a failed stream, saying the answer is incomplete."""
    responses = ResponsesEncoder(encoder())
    data = responses.opening() + b"".join(responses.chunk(describe(orjson.dumps(c), c), False) for c in TEXT[:2])
    events = events_of(data + responses.broken())
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.error.code == "server_error"
    assert "internal error" in failed.response.error.message
    assert failed.response.output[0].status == "incomplete" and failed.response.output[0].content[0].text == "Hel"


def test_refusal_and_reasoning_parts() -> None:
    chunks = [
        chunk({"role": "assistant", "reasoning_content": "Thinking"}),
        chunk({"content": "No."}),
        chunk({"refusal": "I can't help with that."}),
        chunk({}, "stop"),
    ]
    events = events_of(encode(chunks, lambda s: s.completed()))
    final = events[-1].response
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Thinking"
    assert [p.type for p in message.content] == ["output_text", "refusal"]
    assert message.content[1].refusal == "I can't help with that."
    refusal_done = next(e for e in events if e.type == "response.refusal.done")
    assert refusal_done.content_index == 1


def test_opening_echoes_the_request() -> None:
    created, progress = events_of(encoder().opening())
    assert (created.type, progress.type) == ("response.created", "response.in_progress")
    response = created.response
    assert response.status == "in_progress" and response.output == [] and response.usage is None
    assert response.id == "resp_0" and response.created_at == 1700000000 and response.metadata == {"a": "b"}
    assert json.loads(Response.model_validate(response.model_dump(mode="json")).model_dump_json())["store"] is False


def test_chunks_read_by_their_shape_make_the_events_their_whole_parse_makes() -> None:
    """A content chunk read by its learnt shape reaches the Responses encoder as
    its text alone (not parsed whole): the events are byte for byte the same."""
    payloads = [orjson.dumps(c) for c in [*TEXT, chunk({"content": ' "quoted"'}), chunk({}, "stop"), USAGE]]
    whole, shaped = ResponsesEncoder(encoder()), ResponsesEncoder(encoder())
    shape = ContentShape()
    read_by_shape = 0
    out_whole, out_shaped = [whole.opening()], [shaped.opening()]
    for data in payloads:
        out_whole.append(whole.chunk(describe(data, orjson.loads(data)), False))
        by_shape = shape.read(data)
        if by_shape is None:
            out_shaped.append(shaped.chunk(describe(data, orjson.loads(data)), False))
            shape.learn(data, orjson.loads(data))
        else:
            out_shaped.append(shaped.chunk(by_shape, False))
            read_by_shape += 1
    out_whole.append(whole.finished(None, ["p"]))
    out_shaped.append(shaped.finished(None, ["p"]))
    assert read_by_shape == 3  # "lo ", "there." and ' "quoted"': "Hel" taught the shape
    assert b"".join(out_shaped) == b"".join(out_whole)
    events_of(b"".join(out_shaped))
