"""Needs, eligibility and shaping: unit level and through the proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.config import parse_config
from proxy.errors import FailureClass, ProviderError
from proxy.fakes import FakeOpenAI
from proxy.shaping import Needs, Shaper, drop_oldest_turn, eligibility, needs_of, with_system_prompt

from .conftest import ServedApp, openai_provider

IMAGE = {
    "role": "user",
    "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ],
}
TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]


def test_needs_of_a_request() -> None:
    assert needs_of({"messages": [{"role": "user", "content": "hi"}]}, None) == Needs()
    assert needs_of({"messages": [IMAGE]}, None).vision
    assert needs_of({"messages": [], "tools": TOOLS}, None).tools
    assert needs_of({"messages": []}, "true").local_only and not needs_of({"messages": []}, "false").local_only


def test_eligibility_by_capability_and_privacy() -> None:
    config = parse_config(
        {
            "providers": {
                "cloud": {"model": "openai/gpt-4o-2024-08-06", "capabilities": ["vision"]},
                "undeclared": {"model": "openai/x"},
                "local": {"model": "ollama_chat/qwen2.5:7b", "local": True, "capabilities": []},
            },
            "routes": {"r": ["cloud", "undeclared", "local"]},
        },
        environ={},
    )
    route = config.routes["r"]
    cloud, undeclared, local = (config.providers[n] for n in ("cloud", "undeclared", "local"))
    assert eligibility(cloud, route, Needs(vision=True)) is None
    error = eligibility(cloud, route, Needs(tools=True))
    assert error is not None and error.failure is FailureClass.UNSUPPORTED
    assert eligibility(undeclared, route, Needs(vision=True, tools=True)) is None
    error = eligibility(cloud, route, Needs(local_only=True))
    assert error is not None and error.failure is FailureClass.POLICY
    assert eligibility(local, route, Needs(local_only=True)) is None


def test_system_prompt_replaces_the_clients() -> None:
    messages = [{"role": "system", "content": "long"}, {"role": "user", "content": "hi"}]
    assert with_system_prompt(messages, "short") == [
        {"role": "system", "content": "short"},
        {"role": "user", "content": "hi"},
    ]


def test_drop_oldest_turn_keeps_system_and_drops_orphaned_tool_results() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "tool_call_id": "1", "content": "r"},
        {"role": "user", "content": "last"},
    ]
    assert drop_oldest_turn(messages) == [messages[0], messages[3]]
    assert drop_oldest_turn([messages[0], messages[3]]) is None


def words(n: int, tag: str) -> dict[str, Any]:
    return {"role": "user", "content": " ".join([tag] * n)}


async def count_words(model: str, messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", "")).split()) + 4 for m in messages)


def provider(**extra: Any) -> Any:
    return parse_config({"providers": {"p": {"model": "openai/x", **extra}}}, environ={}).providers["p"]


@pytest.mark.asyncio
async def test_trimming_drops_oldest_turns_until_it_fits() -> None:
    body = {
        "messages": [{"role": "system", "content": "sys"}, words(300, "a"), words(300, "b"), words(100, "c")],
        "max_tokens": 100,
    }
    shaped = await Shaper(count_words).shape(provider(context_window=450), body)
    assert shaped.trimmed == 2
    assert [m["content"].split()[0] for m in shaped.body["messages"]] == ["sys", "c"]
    assert body["messages"][1]["content"].startswith("a")  # the client's request is not changed


@pytest.mark.asyncio
async def test_small_prompts_are_not_counted_at_all() -> None:
    async def never(model: str, messages: list[dict[str, Any]]) -> int:
        raise AssertionError("counted a prompt that obviously fits")

    body = {"messages": [words(10, "a")]}
    assert (await Shaper(never).shape(provider(context_window=32768), body)).body is body


@pytest.mark.asyncio
async def test_a_prompt_that_cannot_fit_skips_the_provider() -> None:
    with pytest.raises(ProviderError) as caught:
        await Shaper(count_words).shape(provider(context_window=200), {"messages": [words(500, "a")]})
    assert caught.value.failure is FailureClass.CONTEXT_WINDOW_EXCEEDED


# -- through the proxy ------------------------------------------------------------------------


@pytest.fixture
def cloud() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("cloud") as fake:
        yield fake


@pytest.fixture
def local() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("local", model="qwen2.5:7b") as fake:
        yield fake


@pytest.fixture
def proxy(serve: Callable[..., ServedApp], cloud: FakeOpenAI, local: FakeOpenAI) -> ServedApp:
    return serve(
        {
            "providers": {
                "cloud": openai_provider(cloud.url, capabilities=["vision"]),
                "local": openai_provider(
                    local.url,
                    local=True,
                    context_window=3000,
                    capabilities=["tools"],
                    system_prompt="You are a concise assistant.",
                ),
            },
            "routes": {"default": ["cloud", "local"], "private": {"local_only": True, "chain": ["local"]}},
        }
    )


@pytest.fixture
def sdk(proxy: ServedApp) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def test_mini_mode_and_trimming_for_the_small_local_model(
    sdk: openai.OpenAI, cloud: FakeOpenAI, local: FakeOpenAI
) -> None:
    cloud.set_fault("status", status=503)
    history: list[Any] = [{"role": "system", "content": "A very long and detailed system prompt. " * 20}]
    for turn in range(6):
        history += [
            {"role": "user", "content": f"question {turn} " + "lorem ipsum dolor sit amet, " * 150},
            {"role": "assistant", "content": "answer " * 50},
        ]
    history.append({"role": "user", "content": "And now?"})
    raw = sdk.chat.completions.with_raw_response.create(model="default", messages=history, max_tokens=200)
    assert raw.headers["x-proxy-provider"] == "local"
    trimmed = int(raw.headers["x-proxy-trimmed"])
    sent = local.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "You are a concise assistant."}
    assert sent[-1] == {"role": "user", "content": "And now?"}
    assert trimmed > 0 and len(sent) == len(history) - trimmed
    assert (
        "x-proxy-trimmed"
        not in sdk.chat.completions.with_raw_response.create(
            model="local", messages=[{"role": "user", "content": "short"}]
        ).headers
    )


def test_capabilities_route_images_and_tools(sdk: openai.OpenAI, cloud: FakeOpenAI, local: FakeOpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model="default", messages=[IMAGE])
    assert raw.headers["x-proxy-provider"] == "cloud"
    raw = sdk.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "time?"}], tools=TOOLS
    )
    assert raw.headers["x-proxy-provider"] == "local"
    assert raw.headers["x-proxy-fallbacks"] == "cloud=unsupported"
    assert cloud.request_count == 1


def test_private_work_never_leaves_the_machine(
    proxy: ServedApp, sdk: openai.OpenAI, cloud: FakeOpenAI, local: FakeOpenAI
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "secret"}], extra_headers={"x-proxy-local-only": "true"}
    )
    assert raw.headers["x-proxy-provider"] == "local" and raw.headers["x-proxy-fallbacks"] == "cloud=policy"
    local.stop()
    for model, headers in (("default", {"x-proxy-local-only": "true"}), ("private", {})):
        response = httpx.post(
            proxy.url + "/v1/chat/completions",
            headers=headers,
            json={"model": model, "messages": [{"role": "user", "content": "secret"}]},
        )
        assert response.status_code == 503
        assert "No local provider could answer" in response.json()["error"]["message"]
    assert cloud.request_count == 0
