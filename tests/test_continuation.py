"""A stream that fails after its first token is continued from where the client
is, never spliced: end to end with the official SDK against fakes that behave as
models do when asked to continue (they continue, start over with the same text,
start over with other text, or refuse a prefill)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.fakes import FakeAnthropic, FakeOpenAI, FakeServer

from .conftest import ServedApp, openai_provider

REPLY = " ".join(f"word-w{i}" for i in range(30)) + "."
FAST = {"connect": 1, "first_token": 2, "total": 10, "idle": 1}
MESSAGES: list[Any] = [{"role": "user", "content": "Count in words."}]


@pytest.fixture
def first() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("first", reply=REPLY) as fake:
        yield fake


@pytest.fixture
def second() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("second", reply=REPLY) as fake:
        yield fake


@pytest.fixture
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic("claude", reply=REPLY) as fake:
        yield fake


def anthropic_provider(url: str) -> dict[str, Any]:
    return {"model": "anthropic/claude-sonnet-4-5-20250929", "api_key": "sk-ant-test", "api_base": url, "timeout": FAST}


def proxy_for(serve: Callable[..., ServedApp], first: FakeServer, second: dict[str, Any]) -> ServedApp:
    providers = {"first": openai_provider(first.url, timeout=FAST), "second": second}
    return serve({"providers": providers, "routes": {"default": ["first", "second"]}})


def stream_text(proxy: ServedApp) -> tuple[str, str]:
    """The text the SDK assembled and the raw SSE body."""
    with (
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk,
        sdk.chat.completions.with_streaming_response.create(model="default", messages=MESSAGES, stream=True) as raw,
    ):
        body = raw.http_response.read().decode()
    events = [line[6:] for line in body.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return text, body


def test_a_continuing_model_finishes_the_answer_exactly(
    serve: Callable[..., ServedApp], first: FakeOpenAI, second: FakeOpenAI
) -> None:
    first.set_fault("die_midstream", after_chunks=10)
    second.continuation = "continue"
    proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST))
    text, body = stream_text(proxy)
    assert text == REPLY
    assert "continued this stream across providers: first,second" in body
    asked = second.requests[-1].body["messages"]
    assert asked[-2] == {"role": "assistant", "content": REPLY[: len(" ".join(REPLY.split()[:10]))]}
    assert asked[-1]["role"] == "user" and "Continue" in asked[-1]["content"]


LONG_REPLY = " ".join(f"token-{i}" for i in range(150)) + "."


def test_a_long_answer_cut_late_is_continued_and_deduplicated_exactly(serve: Callable[..., ServedApp]) -> None:
    """The text sent so far is kept compactly (joined as it grows): after 100
    chunks, a model that starts over is still cut at exactly the right place."""
    with FakeOpenAI("first", reply=LONG_REPLY) as first, FakeOpenAI("second", reply=LONG_REPLY) as second:
        first.set_fault("die_midstream", after_chunks=100)
        second.continuation = "restart"
        proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST))
        text, _ = stream_text(proxy)
    assert text == LONG_REPLY  # 150 tokens once, not 250


@pytest.mark.parametrize("fault", ["die_midstream", "stall"])
def test_a_model_that_starts_over_with_the_same_text_is_not_repeated(
    serve: Callable[..., ServedApp], first: FakeOpenAI, second: FakeOpenAI, fault: str
) -> None:
    first.set_fault(fault, after_chunks=7)
    second.continuation = "restart"  # ignores "continue" and answers from the start
    proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST))
    text, _ = stream_text(proxy)
    assert text == REPLY  # 30 words, not 37: nothing sent twice


def test_a_model_that_starts_over_with_other_text_ends_the_stream_honestly(
    serve: Callable[..., ServedApp], first: FakeOpenAI, second: FakeOpenAI
) -> None:
    first.set_fault("die_midstream", after_chunks=5)
    second.continuation = "restart_different"
    proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST))
    received: list[str] = []
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.APIError) as caught:
            for chunk in sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True):
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    text = "".join(received)
    assert text == " ".join(REPLY.split()[:5])  # what the first provider gave, and nothing spliced on
    assert "other-" not in text
    assert "first" in str(caught.value.message) and "incomplete" in str(caught.value.message)


def test_a_prefill_continues_an_anthropic_answer(
    serve: Callable[..., ServedApp], first: FakeOpenAI, claude: FakeAnthropic
) -> None:
    first.set_fault("die_midstream", after_chunks=12)
    claude.continuation = "continue"
    proxy = proxy_for(serve, first, anthropic_provider(claude.url))
    text, _ = stream_text(proxy)
    assert text == REPLY
    asked = claude.requests[-1].body["messages"]
    sent = " ".join(REPLY.split()[:12])
    assert asked[-1]["role"] == "assistant"  # a prefill: the model goes on from it by construction
    assert json.dumps(asked[-1]["content"]).find(sent) >= 0


def test_a_refused_prefill_is_asked_again_as_an_instruction(
    serve: Callable[..., ServedApp], first: FakeOpenAI, second: FakeOpenAI
) -> None:
    first.set_fault("die_midstream", after_chunks=10)
    second.continuation = "reject_prefill"  # 400 to a trailing assistant message, else starts over
    proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST, continue_with="prefill"))
    text, _ = stream_text(proxy)
    assert text == REPLY
    roles = [request.body["messages"][-1]["role"] for request in second.requests]
    assert roles == ["assistant", "user"]  # the prefill, refused; then the instruction
    status = httpx.get(proxy.url + "/readyz").json()["health"]["second"]
    assert status["state"] == "healthy"  # a refused prefill is no failure of the provider


def test_a_refused_continuation_never_masks_the_real_failure(
    serve: Callable[..., ServedApp], first: FakeOpenAI, claude: FakeAnthropic
) -> None:
    first.set_fault("die_midstream", after_chunks=4)
    claude.continuation = "reject_prefill"
    claude.set_fault("status", status=400, times=None)  # and it refuses the instruction form too
    proxy = proxy_for(serve, first, anthropic_provider(claude.url))
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.APIError) as caught:
            for _ in sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True):
                pass
    message = str(caught.value.message)
    assert "'first' failed mid-stream (connection_error)" in message  # not claude's 400


def test_a_malformed_chunk_is_skipped_and_the_stream_goes_on(
    serve: Callable[..., ServedApp], first: FakeOpenAI, second: FakeOpenAI
) -> None:
    first.set_fault("malformed", after_chunks=6)
    proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST))
    text, body = stream_text(proxy)
    assert text == REPLY and "continued" not in body
    assert second.request_count == 0
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'fallback_proxy_malformed_chunks_total{provider="first"} 1.0' in metrics


def test_a_non_stream_request_gets_the_whole_answer_of_one_provider(
    serve: Callable[..., ServedApp], first: FakeOpenAI, second: FakeOpenAI
) -> None:
    """Before the client has a byte, a provider that dies half-way is replaced, not continued."""
    first.set_fault("die_midstream", after_chunks=10)
    second.continuation = "continue"
    proxy = proxy_for(serve, first, openai_provider(second.url, timeout=FAST))
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-proxy-provider"] == "second"
    assert raw.headers["x-proxy-fallbacks"] == "first=connection_error"
    assert second.requests[-1].body["messages"] == MESSAGES  # the request itself, not a continuation
