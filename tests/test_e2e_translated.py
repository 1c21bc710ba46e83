"""The litellm path end to end: the openai SDK -> the proxy -> fake Anthropic
and Ollama servers speaking their own wire formats, both ways, streaming too."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from proxy.fakes import FakeAnthropic, FakeOllama

from .conftest import ServedApp

pytestmark = pytest.mark.litellm

MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic("claude", api_key="sk-ant-test", model="claude-sonnet-4-5-20250929") as fake:
        yield fake


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama("ollama") as fake:
        yield fake


@pytest.fixture
def client(serve: Callable[..., ServedApp], claude: FakeAnthropic, ollama: FakeOllama) -> Iterator[openai.OpenAI]:
    proxy = serve(
        {
            "providers": {
                "claude": {
                    "model": "anthropic/claude-sonnet-4-5-20250929",
                    "api_key": "sk-ant-test",
                    "api_base": claude.url,
                    "timeout": {"first_token": 2, "total": 5},
                },
                "local": {"model": "ollama_chat/qwen2.5:7b", "api_base": ollama.url, "local": True, "warmup": True},
            },
            "routes": {"default": ["claude", "local"]},
        }
    )
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


def test_anthropic_both_ways(client: openai.OpenAI, claude: FakeAnthropic) -> None:
    raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, max_tokens=50)
    completion = raw.parse()
    assert raw.headers["x-proxy-provider"] == "claude"
    assert completion.choices[0].message.content == "Hello from claude."
    assert completion.model == "claude-sonnet-4-5-20250929"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test" and "anthropic-version" in sent.headers
    assert sent.body["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}])
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}] or (
        sent.body["messages"] == [{"role": "user", "content": "Say hello."}]
    )


def test_anthropic_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from claude."
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 529},
        {"kind": "stream_error", "after_chunks": 0},
        {"kind": "status", "status": 429, "retry_after": 10},
    ],
)
def test_anthropic_failure_falls_back_to_ollama_native(
    client: openai.OpenAI, claude: FakeAnthropic, ollama: FakeOllama, fault: dict[str, Any]
) -> None:
    claude.set_fault(**fault)
    with client.chat.completions.with_streaming_response.create(
        model="default", messages=MESSAGES, stream=True
    ) as response:
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        assert response.headers["x-proxy-provider"] == "local"
    assert text == "Hello from ollama."
    chat = [r for r in ollama.requests if r.path == "/api/chat"][-1]
    assert chat.body["model"] == "qwen2.5:7b"
    last = chat.body["messages"][-1]
    assert (last["role"], last["content"]) == ("user", "Say hello.")


def test_ollama_native_non_stream(client: openai.OpenAI, claude: FakeAnthropic) -> None:
    claude.stop()
    completion = client.chat.completions.create(model="default", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello from ollama."
    assert completion.model == "qwen2.5:7b"


def test_warmup_loads_the_local_model_with_keep_alive_forever(client: openai.OpenAI, ollama: FakeOllama) -> None:
    deadline = time.monotonic() + 5
    while not (warmups := [r for r in ollama.requests if r.path == "/api/generate"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert warmups and warmups[0].body["keep_alive"] == -1 and warmups[0].body["model"] == "qwen2.5:7b"


def test_demo_check_walks_the_readme_steps() -> None:
    """`fallback-proxy demo --check` does what the README's first command shows."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", "--port", "0", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallbacks: cloud=server_error" in result.stdout
    assert "demo self-test: ok" in result.stdout
