"""`POST /v1/responses` end to end: the official SDK's `responses.create` / `responses.stream`
-> the proxy -> OpenAI-format and Anthropic-format fakes, with fallback and the agent loop."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.errors import InvalidRequest
from proxy.fakes import FakeAnthropic, FakeOpenAI, FakeServer
from proxy.responses import from_completion, translate

from .conftest import ServedApp, openai_provider

FAST = {"connect": 1, "first_token": 2, "total": 3, "idle": 2}
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    }
]
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def anthropic_provider(url: str) -> dict[str, Any]:
    return {"model": "anthropic/claude-sonnet-4-5", "api_key": "sk-ant-test", "api_base": url, "timeout": FAST}


@pytest.fixture(params=["openai", pytest.param("anthropic", marks=pytest.mark.litellm)])
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fakes(wire: str) -> Iterator[tuple[FakeServer, FakeServer]]:
    kind = FakeOpenAI if wire == "openai" else FakeAnthropic
    with kind("cloud") as cloud, kind("backup") as backup:
        cloud.call_tools = backup.call_tools = True
        yield cloud, backup


@pytest.fixture
def proxy(serve: Callable[..., ServedApp], wire: str, fakes: tuple[FakeServer, FakeServer]) -> ServedApp:
    make = (lambda url: openai_provider(url, timeout=FAST)) if wire == "openai" else anthropic_provider
    cloud, backup = fakes
    return serve(
        {
            "providers": {"cloud": make(cloud.url), "backup": make(backup.url)},
            "routes": {"default": ["cloud", "backup"], "solo": {"chain": ["cloud"], "continuation": False}},
        }
    )


@pytest.fixture
def client(proxy: ServedApp) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def strict(response: Response) -> Response:
    """Validate the JSON the proxy sent against the SDK's own `Response` type."""
    return Response.model_validate(response.model_dump(mode="json"))


def test_text_answer(client: openai.OpenAI, fakes: tuple[FakeServer, FakeServer], wire: str) -> None:
    raw = client.responses.with_raw_response.create(
        model="default",
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        max_output_tokens=50,
        temperature=0.2,
        metadata={"ticket": "42"},
    )
    response = strict(raw.parse())
    assert response.output_text == "Hello from cloud."
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    (message,) = response.output
    assert message.type == "message" and message.status == "completed" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.instructions == "Be brief." and response.metadata == {"ticket": "42"}
    assert response.max_output_tokens == 50 and response.temperature == 0.2 and response.store is False
    assert response.previous_response_id is None and response.tool_choice == "auto" and response.tools == []
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens == 3
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert raw.headers["x-proxy-provider"] == "cloud" and raw.headers["x-proxy-route"] == "default"
    sent = fakes[0].requests[-1].body
    assert "metadata" not in sent
    if wire == "openai":
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
        assert sent["max_completion_tokens"] == 50 and sent["temperature"] == 0.2
    else:
        assert "Be brief." in json.dumps(sent["system"]) and sent["max_tokens"] == 50


def test_agent_loop_with_a_function_tool(client: openai.OpenAI, fakes: tuple[FakeServer, FakeServer]) -> None:
    """A function call comes out whole; its output sent back as `function_call_output` reaches the provider."""
    first = strict(client.responses.create(model="default", input="Weather in Paris?", tools=TOOLS))
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id and call.id and call.id.startswith("fc_")
    assert first.tools[0].type == "function" and first.tools[0].name == "get_weather"
    follow_up: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
    ]
    final = strict(client.responses.create(model="default", input=follow_up, tools=TOOLS))
    assert final.output_text == "Hello from cloud. The tool said: sunny, 21 C"
    assert "sunny, 21 C" in json.dumps(fakes[0].requests[-1].body)


@pytest.mark.parametrize("fault", [{"kind": "status", "status": 500}, {"kind": "hang"}], ids=["500", "hang"])
def test_fallback_before_answering(
    client: openai.OpenAI, fakes: tuple[FakeServer, FakeServer], fault: dict[str, Any]
) -> None:
    fakes[0].set_fault(**fault)
    raw = client.responses.with_raw_response.create(model="default", input="Hi")
    assert strict(raw.parse()).output_text == "Hello from backup."
    assert raw.headers["x-proxy-provider"] == "backup" and raw.headers["x-proxy-attempts"] == "2"
    assert raw.headers["x-proxy-fallbacks"].startswith("cloud=")


def test_stream_accumulates_the_deltas(client: openai.OpenAI) -> None:
    with client.responses.stream(model="default", input="Hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Hello from cloud."
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert final.usage is not None and final.usage.output_tokens == 3


def test_stream_function_call_and_fallback(client: openai.OpenAI, fakes: tuple[FakeServer, FakeServer]) -> None:
    fakes[0].set_fault("status", status=503)
    with client.responses.with_streaming_response.create(
        model="default", input="Weather?", tools=TOOLS, stream=True
    ) as raw:
        assert raw.headers["x-proxy-provider"] == "backup" and raw.headers["x-proxy-fallbacks"] == "cloud=server_error"
        lines = raw.read().decode()
    events = [EVENTS.validate_json(line[6:]) for line in lines.splitlines() if line.startswith("data: ")]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(done.arguments) == json.loads(deltas) == {"city": "Paris"} and done.name == "get_weather"
    assert events[-1].type == "response.completed"
    (call,) = events[-1].response.output
    assert call.type == "function_call" and call.arguments == done.arguments


def test_mid_stream_failure_is_response_failed(client: openai.OpenAI, fakes: tuple[FakeServer, FakeServer]) -> None:
    """The provider dies after its first words and no one may continue: `response.failed`
    with the error, never `response.completed`."""
    fakes[0].set_fault("die_midstream", after_chunks=1)
    with client.responses.with_streaming_response.create(model="solo", input="Hi", stream=True) as raw:
        lines = raw.read().decode()
    events = [EVENTS.validate_json(line[6:]) for line in lines.splitlines() if line.startswith("data: ")]
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
    assert "cloud" in failed.error.message
    assert failed.output[0].type == "message" and failed.output[0].status == "incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))


UNSUPPORTED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
]


@pytest.mark.parametrize(("extra", "param"), UNSUPPORTED, ids=[p for _, p in UNSUPPORTED])
def test_state_and_builtin_tools_are_refused(
    proxy: ServedApp, http: httpx.Client, fakes: tuple[FakeServer, FakeServer], extra: dict[str, Any], param: str
) -> None:
    answer = http.post(proxy.url + "/v1/responses", json={"model": "default", "input": "Hi", **extra})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"]
    assert fakes[0].request_count == 0


def test_unknown_model_and_bad_body(proxy: ServedApp, http: httpx.Client) -> None:
    missing = http.post(proxy.url + "/v1/responses", json={"model": "nope", "input": "Hi"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    for body, param in [
        ({"model": "default"}, "input"),
        ({"input": "x"}, "model"),
        ({"model": "default", "input": 3}, "input"),
    ]:
        answer = http.post(proxy.url + "/v1/responses", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param


# -- the translation itself, without a network ---------------------------------------------------


MALFORMED = [
    ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ({"include": "reasoning.encrypted_content"}, "include", None),
    ({"temperature": "hot"}, "temperature", None),
    ({"top_p": True}, "top_p", None),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", None),
    ({"metadata": {"k": 1}}, "metadata", None),
    ({"instructions": 3}, "instructions", None),
    ({"input": [], "instructions": ""}, "input", None),
    ({"input": ["hi"]}, "input[0]", None),
    ({"input": [{"type": 7}]}, "input[0].type", None),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", None),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content", None),
    ({"input": [{"role": "user", "content": ["x"]}]}, "input[0].content[0]", None),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]},
        "input[0].content[0].file_id",
        "unsupported_parameter",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x"}]}]},
        "input[0].content[0].file_url",
        "unsupported_parameter",
    ),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type", None),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}, "input[0].arguments", None),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output", None),
    ({"tools": {"type": "function"}}, "tools", None),
    ({"tools": ["f"]}, "tools[0]", None),
    ({"tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, "tools[0].parameters", None),
    ({"tool_choice": "sometimes"}, "tool_choice", None),
    ({"text": "json"}, "text", None),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", None),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", None),
    ({"reasoning": "high"}, "reasoning", None),
    ({"reasoning": {"effort": 3}}, "reasoning.effort", None),
]


@pytest.mark.parametrize(("extra", "param", "code"), MALFORMED, ids=[p for _, p, _ in MALFORMED])
def test_a_malformed_request_is_refused_naming_the_field(extra: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate({"model": "m", "input": "Hi", **extra})
    assert caught.value.param == param and param.split("[")[0].split(".")[0] in caught.value.message
    assert caught.value.code == code


def test_translation_of_the_less_common_shapes() -> None:
    chat, _ = translate(
        {
            "model": "m",
            "instructions": [{"role": "system", "content": "Sys"}],
            "input": [
                {"role": "user", "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,AA"}]},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                {"role": "assistant", "content": ""},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            ],
            "tool_choice": "required",
            "text": {"verbosity": "low", "format": {"type": "json_object"}},
            "reasoning": {"summary": "auto"},
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,AA"}}]},
        {"role": "assistant", "content": "No."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]
    assert chat["tool_choice"] == "required" and chat["verbosity"] == "low"
    assert chat["response_format"] == {"type": "json_object"} and "reasoning_effort" not in chat
    plain, _ = translate({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})
    assert "response_format" not in plain


def test_translation_of_a_full_request() -> None:
    chat, echo = translate(
        {
            "model": "default",
            "instructions": "Sys",
            "input": [
                {"type": "message", "role": "developer", "content": "Dev"},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Look"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                    ],
                },
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Calling"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
            "reasoning": {"effort": "low"},
            "parallel_tool_calls": False,
            "max_output_tokens": 99,
            "user": "u1",
            "metadata": {"k": "v"},
            "include": ["reasoning.encrypted_content"],
            "top_k": 5,
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "system", "content": "Dev"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Calling",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert chat["tools"][0]["function"]["name"] == "get_weather" and chat["tools"][0]["function"]["strict"] is True
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }
    assert chat["reasoning_effort"] == "low" and chat["parallel_tool_calls"] is False
    assert chat["max_completion_tokens"] == 99 and chat["user"] == "u1" and chat["top_k"] == 5
    assert not {"metadata", "include", "input", "instructions", "text", "reasoning"} & set(chat)
    assert echo["metadata"] == {"k": "v"} and echo["instructions"] == "Sys" and echo["store"] is False


@pytest.mark.parametrize(
    ("finish", "status", "reason"),
    [
        ("stop", "completed", None),
        ("length", "incomplete", "max_output_tokens"),
        ("content_filter", "incomplete", "content_filter"),
    ],
)
def test_from_completion_status(finish: str, status: str, reason: str | None) -> None:
    _, echo = translate({"model": "m", "input": "x"})
    completion = {
        "model": "gpt-test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }
    response = Response.model_validate(from_completion(completion, echo))
    assert response.status == status and response.model == "gpt-test" and response.output_text == "Hi"
    assert (response.incomplete_details.reason if response.incomplete_details else None) == reason
    assert response.output[0].status == ("completed" if reason is None else "incomplete")
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 3
    assert response.usage.output_tokens_details.reasoning_tokens == 1 and response.usage.total_tokens == 7


def test_a_stream_cut_mid_way_is_continued_into_one_answer(serve: Callable[..., ServedApp], wire: str) -> None:
    """The first provider dies after its first words; the next continues from where
    the client is: the SDK accumulates one answer, nothing repeated, then `completed`."""
    reply = " ".join(f"word-w{i}" for i in range(20)) + "."
    kind = FakeOpenAI if wire == "openai" else FakeAnthropic
    make = (lambda url: openai_provider(url, timeout=FAST)) if wire == "openai" else anthropic_provider
    with kind("cloud", reply=reply) as cloud, kind("backup", reply=reply) as backup:
        cloud.set_fault("die_midstream", after_chunks=6)
        backup.continuation = "continue"
        proxy = serve(
            {
                "providers": {"cloud": make(cloud.url), "backup": make(backup.url)},
                "routes": {"default": ["cloud", "backup"]},
            }
        )
        with (
            openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk,
            sdk.responses.stream(model="default", input="Count.") as stream,
        ):
            events = list(stream)
            final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == reply
    assert events[-1].type == "response.completed" and final.status == "completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
