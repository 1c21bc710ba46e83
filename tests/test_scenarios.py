"""The four outage scenarios from the product brief, end to end with the
official SDK, streaming: the user must not notice an outage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from proxy.fakes import Blackhole, FakeOllama, FakeOpenAI

from .conftest import ServedApp

pytestmark = pytest.mark.litellm

MESSAGES: list[Any] = [{"role": "user", "content": "Hello!"}]
CLOUD_TIMEOUT = {"connect": 0.5, "first_token": 1.0, "total": 10, "idle": 1.0}


@pytest.fixture
def local() -> Iterator[FakeOllama]:
    with FakeOllama("local") as fake:
        yield fake


def config(cloud_url: str, local: FakeOllama, first: str = "cloud") -> dict[str, Any]:
    providers = {
        "cloud": {
            "model": "openai/gpt-4o-2024-08-06",
            "api_base": cloud_url + "/v1",
            "api_key": "sk-test",
            "timeout": CLOUD_TIMEOUT,
        },
        "local": {"model": "ollama_chat/qwen2.5:7b", "api_base": local.url, "local": True},
    }
    chain = ["cloud", "local"] if first == "cloud" else ["local", "cloud"]
    return {"providers": providers, "routes": {"default": chain}}


def stream(proxy: ServedApp) -> tuple[str, str, float]:
    """(text, provider, seconds) of one streamed answer."""
    started = time.perf_counter()
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with sdk.chat.completions.with_streaming_response.create(
            model="default", messages=MESSAGES, stream=True
        ) as response:
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
            return text, response.headers["x-proxy-provider"], time.perf_counter() - started


def test_cloud_reachable(serve: Callable[..., ServedApp], local: FakeOllama) -> None:
    with FakeOpenAI("cloud") as cloud:
        text, provider, _ = stream(serve(config(cloud.url, local)))
    assert (text, provider) == ("Hello from cloud.", "cloud")


def test_cloud_blocked_connections_hang(serve: Callable[..., ServedApp], local: FakeOllama) -> None:
    with Blackhole() as firewall:
        text, provider, seconds = stream(serve(config(f"http://127.0.0.1:{firewall.port}", local)))
    assert (text, provider) == ("Hello from local.", "local")
    assert seconds < CLOUD_TIMEOUT["connect"] + 1.5


@pytest.mark.parametrize("fault", [{"kind": "hang"}, {"kind": "die_midstream", "after_chunks": 0}])
def test_cloud_blocked_connections_dropped_or_stuck(
    serve: Callable[..., ServedApp], local: FakeOllama, fault: dict[str, Any]
) -> None:
    with FakeOpenAI("cloud") as cloud:
        cloud.set_fault(**fault)
        text, provider, seconds = stream(serve(config(cloud.url, local)))
    assert (text, provider) == ("Hello from local.", "local")
    assert seconds < CLOUD_TIMEOUT["first_token"] + 1.5


def test_cloud_reachable_but_slow(serve: Callable[..., ServedApp], local: FakeOllama) -> None:
    with FakeOpenAI("cloud") as cloud:
        cloud.set_fault("slow", first_token_delay=5)
        text, provider, seconds = stream(serve(config(cloud.url, local)))
    assert (text, provider) == ("Hello from local.", "local")
    assert seconds < CLOUD_TIMEOUT["first_token"] + 1.5


def test_local_daemon_stopped(serve: Callable[..., ServedApp], local: FakeOllama) -> None:
    with FakeOpenAI("cloud") as cloud:
        proxy = serve(config(cloud.url, local, first="local"))
        assert stream(proxy)[1] == "local"
        local.stop()
        text, provider, seconds = stream(proxy)
    assert (text, provider) == ("Hello from cloud.", "cloud")
    assert seconds < 1.5
