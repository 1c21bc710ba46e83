"""TranslatedAdapter: litellm's translation over our own HTTP client.

Against the fake Anthropic and Ollama servers over real sockets; Gemini (and
tool-use answers, which the fakes do not produce) from canned answers served
by a small local aiohttp server. Parity tests compare with
`litellm.acompletion` itself (the adapter's fallback path, over httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.adapters import AttemptLimits, Chunk, HttpClients
from proxy.adapters.translated import TranslatedAdapter
from proxy.adapters.translated.acompletion import Acompletion
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.fakes import FakeAnthropic, FakeOllama
from proxy.litellm_import import load_litellm
from proxy.service import open_session

pytestmark = [
    pytest.mark.litellm,
    # pydantic, building the schema of a litellm TypedDict on first use.
    pytest.mark.filterwarnings("ignore:Item 'summary' on TypedDict class 'ChatCompletionReasoningItem':UserWarning"),
]

CLAUDE = "claude-sonnet-4-5-20250929"
LIMITS = AttemptLimits(connect=2.0, read=5.0)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def provider(model: str, api_base: str | None, **fields: Any) -> ProviderConfig:
    prefix, _, upstream = model.partition("/")
    return ProviderConfig(
        name=fields.pop("name", prefix),
        model=model,
        litellm_provider=prefix,
        upstream_model=upstream,
        openai_compatible=False,
        api_base=api_base,
        **fields,
    )


def body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "route", "messages": [dict(m) for m in MESSAGES], **({"stream": True} if stream else {}), **extra}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def collect(stream: AsyncIterator[Chunk]) -> list[dict[str, Any]]:
    return [orjson.loads(chunk.payload) async for chunk in stream]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def finish_of(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def litellm() -> Any:
    """litellm's slow import, once, outside any test's timing."""
    return load_litellm()


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic("claude", api_key="k", reply="Hello from the fake Claude, nice to meet you.") as fake:
        yield fake


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama("local", reply="Hello from the local model.") as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh_fakes(request: pytest.FixtureRequest) -> None:
    for name in ("claude", "ollama"):
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)
            fake.clear_fault()
            fake.reset()


@contextlib.asynccontextmanager
async def pooled() -> AsyncIterator[HttpClients]:
    """The app's clients: the aiohttp session the dialects use, the httpx client `acompletion` uses."""
    async with open_session() as session, httpx.AsyncClient() as http:
        yield HttpClients(session=session, client=http)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[HttpClients]:
    async with pooled() as clients:
        yield clients


def claude_adapter(fake: FakeAnthropic, clients: HttpClients, **fields: Any) -> TranslatedAdapter:
    fields.setdefault("api_key", "k")
    return TranslatedAdapter(provider(f"anthropic/{CLAUDE}", fake.url, **fields), clients)


def ollama_adapter(fake: FakeOllama, clients: HttpClients, **fields: Any) -> TranslatedAdapter:
    return TranslatedAdapter(provider(f"ollama_chat/{fake.model}", fake.url, **fields), clients)


# -- Anthropic ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_anthropic_complete(claude: FakeAnthropic, client: HttpClients) -> None:
    adapter = claude_adapter(claude, client)
    sent = body(temperature=0.2)
    result = await adapter.complete(sent, LIMITS)

    answer = orjson.loads(result.body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == claude.reply
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["model"] == result.model == CLAUDE
    assert result.usage is not None and result.usage.completion_tokens == len(claude.reply.split())
    assert answer["usage"]["prompt_tokens"] == result.usage.prompt_tokens > 0
    assert sent == body(temperature=0.2), "the caller's body must not be edited"

    (record,) = claude.requests
    assert record.path == "/v1/messages"
    assert record.headers["x-api-key"] == "k"
    assert record.headers["anthropic-version"]
    assert record.headers["content-type"] == "application/json"
    assert record.body["model"] == CLAUDE
    assert record.body["temperature"] == 0.2
    assert "stream" not in record.body


@pytest.mark.asyncio
async def test_anthropic_system_message_and_default_max_tokens(
    claude: FakeAnthropic, client: HttpClients, litellm: Any
) -> None:
    await claude_adapter(claude, client).complete(body(), LIMITS)
    sent = claude.requests[-1].body
    assert sent["system"] == [{"type": "text", "text": "You are terse."}]
    assert [m["role"] for m in sent["messages"]] == ["user"]
    assert sent["max_tokens"] == litellm.AnthropicConfig.get_max_tokens_for_model(CLAUDE) > 0

    await claude_adapter(claude, client).complete(body(max_tokens=77), LIMITS)
    assert claude.requests[-1].body["max_tokens"] == 77


@pytest.mark.asyncio
async def test_anthropic_stream(claude: FakeAnthropic, client: HttpClients) -> None:
    adapter = claude_adapter(claude, client)
    chunks = await collect(adapter.stream(body(True, stream_options={"include_usage": True}), LIMITS))

    assert text_of(chunks) == claude.reply
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {CLAUDE}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    assert finish_of(chunks) == ["stop"]
    *_, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(claude.reply.split())
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    assert claude.requests[-1].body["stream"] is True


@pytest.mark.asyncio
async def test_anthropic_stream_usage_only_when_asked(claude: FakeAnthropic, client: HttpClients) -> None:
    chunks = [chunk async for chunk in claude_adapter(claude, client).stream(body(True), LIMITS)]
    assert all(b'"usage"' not in chunk.payload for chunk in chunks)
    assert chunks[-1].finish_reason == "stop"
    # ... but the last chunk still tells the proxy what the answer cost.
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(claude.reply.split())
    assert [chunk.has_content for chunk in chunks[:-1]] == [True] * (len(chunks) - 1)


@pytest.mark.asyncio
async def test_anthropic_tools_request(claude: FakeAnthropic, client: HttpClients) -> None:
    adapter = claude_adapter(claude, client)
    request = body(tools=TOOLS, tool_choice="required")
    await adapter.complete(request, LIMITS)
    await collect(adapter.stream({**request, "stream": True}, LIMITS))
    assert request == body(tools=TOOLS, tool_choice="required"), "the caller's body must not be edited"
    sent = claude.requests[-1].body
    (tool,) = sent["tools"]
    assert tool["name"] == "get_weather"
    assert tool["input_schema"]["properties"] == {"city": {"type": "string"}}
    assert sent["tool_choice"] == {"type": "any"}


@pytest.mark.asyncio
async def test_closing_the_stream_early(claude: FakeAnthropic, client: HttpClients) -> None:
    claude.set_fault("slow", first_token_delay=0, token_delay=5)
    stream = claude_adapter(claude, client).stream(body(True), LIMITS)
    first = await anext(stream)
    assert first.has_content
    await asyncio.wait_for(stream.aclose(), 1)  # the fake still has 5 s pauses to go


class EndlessBody(httpx.AsyncByteStream):
    """An SSE body that never ends, and remembers being closed."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield sse(self.events)
        await asyncio.sleep(3600)

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.asyncio
async def test_closing_the_stream_closes_the_upstream_response() -> None:
    upstream = EndlessBody(
        [
            {
                "type": "message_start",
                "message": {
                    "id": "m",
                    "type": "message",
                    "role": "assistant",
                    "model": CLAUDE,
                    "content": [],
                    "usage": {"input_tokens": 3, "output_tokens": 1},
                },
            },
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        ]
    )
    async with mock_client(lambda request: httpx.Response(200, stream=upstream, headers=SSE)) as local:
        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        stream = adapter.stream(body(True), LIMITS)
        assert orjson.loads((await anext(stream)).payload)["choices"][0]["delta"]["content"] == "Hi"
        assert not upstream.closed
        await stream.aclose()
        for _ in range(500):  # the server sees the connection go (it was closed, not pooled)
            if upstream.closed:
                break
            await asyncio.sleep(0.01)
        assert upstream.closed


# -- Ollama -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_ollama_complete(ollama: FakeOllama, client: HttpClients) -> None:
    result = await ollama_adapter(ollama, client).complete(body(max_tokens=40), LIMITS)
    answer = orjson.loads(result.body)
    assert answer["choices"][0]["message"]["content"] == ollama.reply
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["model"] == result.model == ollama.model
    assert result.usage is not None and result.usage.completion_tokens == len(ollama.reply.split())

    (record,) = ollama.requests
    assert record.path == "/api/chat"
    assert record.headers["content-type"] == "application/json"
    assert record.body["stream"] is False
    assert record.body["options"]["num_predict"] == 40
    assert [(m["role"], m["content"]) for m in record.body["messages"]] == [(m["role"], m["content"]) for m in MESSAGES]
    assert "keep_alive" not in record.body


@pytest.mark.asyncio
async def test_ollama_stream(ollama: FakeOllama, client: HttpClients) -> None:
    chunks = await collect(
        ollama_adapter(ollama, client).stream(body(True, stream_options={"include_usage": True}), LIMITS)
    )
    assert text_of(chunks) == ollama.reply
    assert len({c["id"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {ollama.model}
    assert finish_of(chunks) == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ollama.reply.split())
    assert ollama.requests[-1].body["stream"] is True


@pytest.mark.asyncio
async def test_ollama_warmup_and_keep_alive(ollama: FakeOllama, client: HttpClients) -> None:
    adapter = ollama_adapter(ollama, client, warmup=True)
    await adapter.warmup()
    (load,) = ollama.requests
    assert load.path == "/api/generate"
    assert load.body == {"model": ollama.model, "prompt": "", "keep_alive": -1}

    await adapter.complete(body(), LIMITS)
    assert ollama.requests[-1].body["keep_alive"] == -1  # stays resident
    await adapter.complete(body(keep_alive="10m"), LIMITS)
    assert ollama.requests[-1].body["keep_alive"] == "10m"  # the client's say wins


@pytest.mark.asyncio
async def test_warmup_is_a_noop_elsewhere(client: HttpClients) -> None:
    adapter = TranslatedAdapter(
        provider(f"anthropic/{CLAUDE}", f"http://127.0.0.1:{closed_port()}", api_key="k"), client
    )
    await adapter.warmup()  # nothing to load: no request (the port would refuse it)


@pytest.mark.asyncio
async def test_ollama_warmup_failure(ollama: FakeOllama, client: HttpClients) -> None:
    ollama.set_fault("status", status=500)
    with pytest.raises(ProviderError) as caught:
        await ollama_adapter(ollama, client).warmup()
    assert caught.value.failure is FailureClass.SERVER_ERROR


# -- probes -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_probes(claude: FakeAnthropic, ollama: FakeOllama, client: HttpClients) -> None:
    await ollama_adapter(ollama, client).probe(LIMITS)
    assert ollama.requests[-1].path == "/api/tags"
    await claude_adapter(claude, client).probe(LIMITS)
    assert claude.requests[-1].path == "/v1/models"
    assert claude.requests[-1].headers["x-api-key"] == "k"


@pytest.mark.asyncio
async def test_probe_ollama_model_not_pulled(ollama: FakeOllama, client: HttpClients) -> None:
    adapter = TranslatedAdapter(provider("ollama_chat/llama3.2", ollama.url), client)
    with pytest.raises(ProviderError) as caught:
        await adapter.probe(LIMITS)
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "not pulled" in caught.value.message


@pytest.mark.asyncio
async def test_probe_anthropic_bad_key(claude: FakeAnthropic, client: HttpClients) -> None:
    with pytest.raises(ProviderError) as caught:
        await claude_adapter(claude, client, api_key="wrong").probe(LIMITS)
    assert caught.value.failure is FailureClass.AUTH_ERROR


@pytest.mark.asyncio
async def test_probe_refused(client: HttpClients) -> None:
    adapter = TranslatedAdapter(provider("ollama_chat/qwen2.5:7b", f"http://127.0.0.1:{closed_port()}"), client)
    with pytest.raises(ProviderError) as caught:
        await adapter.probe(LIMITS)
    assert caught.value.failure is FailureClass.CONNECTION_ERROR


# -- errors -------------------------------------------------------------------------------------


async def call(adapter: TranslatedAdapter, stream: bool, limits: AttemptLimits = LIMITS) -> None:
    if stream:
        await collect(adapter.stream(body(True), limits))
    else:
        await adapter.complete(body(), limits)


STATUS_FAULTS = [
    pytest.param({"status": 529}, FailureClass.SERVER_ERROR, id="529-overloaded"),
    pytest.param({"status": 503}, FailureClass.SERVER_ERROR, id="503"),
    pytest.param({"status": 429, "retry_after": 7}, FailureClass.RATE_LIMITED, id="429"),
    pytest.param({"status": 401}, FailureClass.AUTH_ERROR, id="401"),
    pytest.param(
        {"status": 400, "error_code": "context_length_exceeded"},
        FailureClass.CONTEXT_WINDOW_EXCEEDED,
        id="400-too-long",
    ),
    pytest.param({"status": 400}, FailureClass.CLIENT_ERROR, id="400"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(("fault", "expected"), STATUS_FAULTS)
async def test_anthropic_status_errors(
    claude: FakeAnthropic, client: HttpClients, stream: bool, fault: dict[str, Any], expected: FailureClass
) -> None:
    claude.set_fault("status", **fault)
    with pytest.raises(ProviderError) as caught:
        await call(claude_adapter(claude, client), stream)
    assert caught.value.failure is expected
    assert caught.value.status_code == fault["status"]
    assert caught.value.retry_after == fault.get("retry_after")


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_ollama_status_errors(ollama: FakeOllama, client: HttpClients, stream: bool) -> None:
    ollama.set_fault("status", status=503)
    with pytest.raises(ProviderError) as caught:
        await call(ollama_adapter(ollama, client), stream)
    assert caught.value.failure is FailureClass.SERVER_ERROR


@pytest.mark.asyncio
async def test_wrong_key_is_auth_error(claude: FakeAnthropic, client: HttpClients) -> None:
    with pytest.raises(ProviderError) as caught:
        await call(claude_adapter(claude, client, api_key="wrong"), stream=True)
    assert caught.value.failure is FailureClass.AUTH_ERROR


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["claude", "ollama"])
async def test_in_band_stream_error(which: str, claude: FakeAnthropic, ollama: FakeOllama, client: HttpClients) -> None:
    fake = claude if which == "claude" else ollama
    adapter = claude_adapter(claude, client) if which == "claude" else ollama_adapter(ollama, client)
    fake.set_fault("stream_error", after_chunks=2)
    seen: list[Chunk] = []
    with pytest.raises(ProviderError) as caught:
        async for chunk in adapter.stream(body(True), LIMITS):
            seen.append(chunk)
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert len(seen) == 2 and all(chunk.has_content for chunk in seen)


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["claude", "ollama"])
async def test_death_midstream_is_connection_error(
    which: str, claude: FakeAnthropic, ollama: FakeOllama, client: HttpClients
) -> None:
    fake = claude if which == "claude" else ollama
    adapter = claude_adapter(claude, client) if which == "claude" else ollama_adapter(ollama, client)
    fake.set_fault("die_midstream", after_chunks=2)
    with pytest.raises(ProviderError) as caught:
        await collect(adapter.stream(body(True), LIMITS))
    assert caught.value.failure is FailureClass.CONNECTION_ERROR
    fake.set_fault("die_midstream")
    with pytest.raises(ProviderError) as caught:
        await adapter.complete(body(), LIMITS)
    assert caught.value.failure is FailureClass.CONNECTION_ERROR


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_refused_connection(client: HttpClients, stream: bool) -> None:
    adapter = TranslatedAdapter(
        provider(f"anthropic/{CLAUDE}", f"http://127.0.0.1:{closed_port()}", api_key="k"), client
    )
    with pytest.raises(ProviderError) as caught:
        await call(adapter, stream)
    assert caught.value.failure is FailureClass.CONNECTION_ERROR


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_hang_with_short_read_timeout(claude: FakeAnthropic, client: HttpClients, stream: bool) -> None:
    claude.set_fault("hang")
    with pytest.raises(ProviderError) as caught:
        await call(claude_adapter(claude, client), stream, AttemptLimits(connect=1.0, read=0.3))
    assert caught.value.failure is FailureClass.TIMEOUT


class CutBody(httpx.AsyncByteStream):
    """A stream whose connection drops after its first events."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield sse(self.events)
        await asyncio.sleep(0.05)
        raise ConnectionResetError("the upstream went away")


STARTED: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": CLAUDE,
            "content": [],
            "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    },
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
]


@pytest.mark.asyncio
async def test_a_stream_cut_short_is_a_connection_error() -> None:
    async with mock_client(lambda request: httpx.Response(200, stream=CutBody(STARTED), headers=SSE)) as local:
        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        stream = adapter.stream(body(True), LIMITS)
        assert (await anext(stream)).has_content
        with pytest.raises(ProviderError) as caught:
            await collect(stream)
    assert caught.value.failure is FailureClass.CONNECTION_ERROR


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_an_answer_over_the_cap_is_a_server_error(stream: bool) -> None:
    def big(request: httpx.Request) -> httpx.Response:
        if stream:
            return httpx.Response(200, content=sse(STARTED * 20), headers=SSE)
        return httpx.Response(200, json={"id": "msg_1", "type": "message", "padding": "x" * 5000})

    async with mock_client(big) as local:
        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:
            await call(adapter, stream, AttemptLimits(connect=2.0, read=5.0, max_bytes=1000))
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "larger than limits.max_upstream_bytes (1000)" in caught.value.message


@pytest.mark.asyncio
async def test_stream_without_end_is_incomplete() -> None:
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "m",
                "type": "message",
                "role": "assistant",
                "model": CLAUDE,
                "content": [],
                "usage": {"input_tokens": 3, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    ]
    async with mock_client(lambda request: httpx.Response(200, content=sse(events), headers=SSE)) as local:
        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:
            await collect(adapter.stream(body(True), LIMITS))
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "without a finish" in caught.value.message


@pytest.mark.asyncio
async def test_untranslatable_request_is_classified() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    async with mock_client(handler) as local:
        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:
            await adapter.complete({"messages": [{"role": "bogus", "content": "hi"}]}, LIMITS)
        with pytest.raises(ProviderError) as caught_in_stream:
            await collect(adapter.stream({"messages": [{"role": "bogus", "content": "hi"}], "stream": True}, LIMITS))
    # Another provider may manage, and this one's health is not at stake.
    assert caught.value.failure is caught_in_stream.value.failure is FailureClass.UNSUPPORTED
    assert "Invalid Message" in caught.value.message
    assert type(caught.value.__cause__).__name__ == "AnthropicError"
    assert sent == []


@pytest.mark.asyncio
async def test_request_translation_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    async with mock_client(lambda request: httpx.Response(500)) as local:
        keyless = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url), local.clients)
        with pytest.raises(ProviderError) as caught:
            await keyless.complete(body(), LIMITS)
        assert caught.value.failure is FailureClass.AUTH_ERROR  # our configuration, not the request

        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:  # litellm trips over it with a TypeError
            await adapter.complete({"messages": [{"role": "user", "content": 5}]}, LIMITS)
        assert caught.value.failure is FailureClass.UNSUPPORTED
        assert isinstance(caught.value.__cause__, TypeError)


@pytest.mark.asyncio
async def test_unreadable_answers_are_server_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/chat":  # a stream line without "message" or "done"
            return httpx.Response(200, content=b'{"model": "m", "surprise": true}\n')
        return httpx.Response(200, json={"id": "msg_1", "type": "message", "model": CLAUDE})  # no content

    async with mock_client(handler) as local:
        claude = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:
            await claude.complete(body(), LIMITS)
        assert caught.value.failure is FailureClass.SERVER_ERROR

        ollama = TranslatedAdapter(provider("ollama_chat/m", local.url), local.clients)
        with pytest.raises(ProviderError) as caught:
            await collect(ollama.stream(body(True), LIMITS))
        assert caught.value.failure is FailureClass.SERVER_ERROR  # litellm says 400; not the client's doing
        with pytest.raises(ProviderError) as caught:
            await ollama.complete(body(), LIMITS)
        assert caught.value.failure is FailureClass.SERVER_ERROR


# -- canned answers: tool use, Gemini, parity with litellm.acompletion ---------------------------

SSE = {"content-type": "text/event-stream"}


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


@dataclass
class Local:
    url: str  # the server's root: stands for any provider's base URL
    clients: HttpClients


@contextlib.asynccontextmanager
async def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncIterator[Local]:
    """Serve `handler`'s canned answers over real HTTP on 127.0.0.1 (aiohttp, in the
    test's loop). An answer with a body that is not read yet is streamed, and closed
    when the adapter's connection goes away."""

    async def respond(request: web.Request) -> web.StreamResponse:
        asked = httpx.Request(
            request.method, str(request.url), headers=list(request.headers.items()), content=await request.read()
        )
        answer = handler(asked)
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        try:
            return web.Response(status=answer.status_code, body=answer.content, headers=headers)
        except httpx.ResponseNotRead:
            pass
        response = web.StreamResponse(status=answer.status_code, headers=headers)
        await response.prepare(request)
        try:
            async for part in answer.aiter_raw():
                await response.write(part)
        finally:
            await answer.aclose()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", respond)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # A handler is cancelled when its client goes away: a streamed answer is then closed.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        async with pooled() as clients:
            yield Local(f"http://127.0.0.1:{sock.getsockname()[1]}", clients)
    finally:
        await runner.cleanup()


def claude_tool_answer(request: httpx.Request) -> httpx.Response:
    usage = {"input_tokens": 20, "output_tokens": 9}
    if not orjson.loads(request.content).get("stream"):
        return httpx.Response(
            200,
            json={
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": CLAUDE,
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
                "stop_reason": "tool_use",
                "stop_sequence": None,
                "usage": usage,
            },
        )
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": CLAUDE,
                "content": [],
                "usage": {"input_tokens": 20, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        },
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    return httpx.Response(200, content=sse(events), headers=SSE)


GEMINI_MODEL = "gemini-2.0-flash"
GEMINI_USAGE = {"promptTokenCount": 9, "candidatesTokenCount": 5, "totalTokenCount": 14}


def gemini_candidate(text: str, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return candidate


def gemini_answer(request: httpx.Request) -> httpx.Response:
    base = {"modelVersion": "gemini-2.0-flash-001", "responseId": "resp-1"}
    if request.url.path.endswith(":streamGenerateContent"):
        events = [
            {**base, "candidates": [gemini_candidate("Hello")]},
            {**base, "candidates": [gemini_candidate(", Gemini")]},
            {**base, "candidates": [gemini_candidate(" here.", "STOP")], "usageMetadata": GEMINI_USAGE},
        ]
        content = b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
        return httpx.Response(200, content=content, headers=SSE)
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"models": [{"name": f"models/{GEMINI_MODEL}"}]})
    answer = {**base, "candidates": [gemini_candidate("Hello, Gemini here.", "STOP")], "usageMetadata": GEMINI_USAGE}
    return httpx.Response(200, json=answer)


@pytest.mark.asyncio
async def test_anthropic_tool_use_answers() -> None:
    async with mock_client(claude_tool_answer) as local:
        adapter = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        whole = orjson.loads((await adapter.complete(body(tools=TOOLS), LIMITS)).body)
        message = whole["choices"][0]["message"]
        assert whole["choices"][0]["finish_reason"] == "tool_calls"
        (tool_call,) = message["tool_calls"]
        assert tool_call["id"] == "toolu_1" and tool_call["type"] == "function"
        assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

        chunks = await collect(adapter.stream(body(True, tools=TOOLS), LIMITS))
        calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls") or []]
        assert calls[0]["id"] == "toolu_1" and calls[0]["function"]["name"] == "get_weather"
        assert "".join(call["function"]["arguments"] for call in calls) == '{"city": "Paris"}'
        assert {call["index"] for call in calls} == {0}
        assert text_of(chunks) == "Checking."
        assert finish_of(chunks) == ["tool_calls"]


@pytest.mark.asyncio
async def test_gemini_both_ways() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return gemini_answer(request)

    async with mock_client(handler) as local:
        adapter = TranslatedAdapter(
            provider(f"gemini/{GEMINI_MODEL}", local.url + "/v1beta", api_key="gk"), local.clients
        )
        result = await adapter.complete(body(max_tokens=50, temperature=0.1), LIMITS)
        request = seen[-1]
        assert request.url.path == f"/v1beta/models/{GEMINI_MODEL}:generateContent"
        assert request.headers["x-goog-api-key"] == "gk"
        assert request.headers["content-type"] == "application/json"
        sent = orjson.loads(request.content)
        assert sent["system_instruction"] == {"parts": [{"text": "You are terse."}]}
        assert sent["contents"] == [{"role": "user", "parts": [{"text": "Say hello."}]}]
        assert sent["generationConfig"] == {"temperature": 0.1, "max_output_tokens": 50}

        answer = orjson.loads(result.body)
        assert answer["choices"][0]["message"]["content"] == "Hello, Gemini here."
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["model"] == result.model == "gemini-2.0-flash-001"
        assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (9, 5)

        chunks = await collect(adapter.stream(body(True, stream_options={"include_usage": True}), LIMITS))
        assert seen[-1].url.path.endswith(":streamGenerateContent") and seen[-1].url.params["alt"] == "sse"
        assert text_of(chunks) == "Hello, Gemini here."
        assert finish_of(chunks) == ["stop"]
        assert chunks[-1]["usage"]["total_tokens"] == 14

        await adapter.probe(LIMITS)
        assert seen[-1].url.path == "/v1beta/models"

        google = TranslatedAdapter(provider(f"gemini/{GEMINI_MODEL}", None, api_key="gk"), local.clients)
        assert google._prepare(google._dialect, body(), stream=False).url == (  # type: ignore[arg-type]
            f"https://generativelanguage.googleapis.com/v1beta/models/{GEMINI_MODEL}:generateContent"
        )


@pytest.mark.asyncio
async def test_gemini_in_band_error() -> None:
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    content = b"data: " + orjson.dumps({"candidates": [gemini_candidate("Hi")]}) + b"\r\n\r\n"
    content += b"data: " + orjson.dumps(error) + b"\r\n\r\n"
    async with mock_client(lambda request: httpx.Response(200, content=content, headers=SSE)) as local:
        adapter = TranslatedAdapter(
            provider(f"gemini/{GEMINI_MODEL}", local.url + "/v1beta", api_key="gk"), local.clients
        )
        with pytest.raises(ProviderError) as caught:
            await collect(adapter.stream(body(True), LIMITS))
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "overloaded" in caught.value.message


def summary(whole: dict[str, Any] | None, chunks: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What must match litellm.acompletion: content, tool calls, finish reason, usage."""
    if whole is not None:
        choice = whole["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        tools = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
        usage = whole["usage"]
        return {
            "content": choice["message"]["content"],
            "tools": tools,
            "finish": choice["finish_reason"],
            "usage": (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]),
        }
    assert chunks is not None
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    merged: dict[int, list[str]] = {}
    for delta in deltas:
        for call in delta.get("tool_calls") or []:
            entry = merged.setdefault(call["index"], ["", "", ""])
            entry[0] = call.get("id") or entry[0]
            entry[1] = call["function"].get("name") or entry[1]
            entry[2] += call["function"].get("arguments") or ""
    usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    return {
        "content": "".join(d.get("content") or "" for d in deltas) or None,
        "tools": [tuple(v) for _, v in sorted(merged.items())],
        "finish": finish_of(chunks)[-1],
        "usage": (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]),
    }


PARITY = [
    pytest.param(f"anthropic/{CLAUDE}", claude_tool_answer, {"tools": TOOLS}, id="anthropic-tools"),
    pytest.param(f"gemini/{GEMINI_MODEL}", gemini_answer, {}, id="gemini"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("model", "handler", "extra"), PARITY)
async def test_parity_with_acompletion(
    model: str, handler: Callable[[httpx.Request], httpx.Response], extra: dict[str, Any], litellm: Any
) -> None:
    async with mock_client(handler) as local:
        config = provider(model, local.url if model.startswith("anthropic") else local.url + "/v1beta", api_key="k")
        ours = TranslatedAdapter(config, local.clients)
        theirs = Acompletion(config, local.clients.client, litellm)
        plain = body(**extra)
        streamed = body(True, stream_options={"include_usage": True}, **extra)
        split = ours._split(plain), ours._split(streamed)
        mine = summary(orjson.loads((await ours.complete(plain, LIMITS)).body), None)
        reference = summary(orjson.loads((await theirs.complete(split[0], plain, LIMITS)).body), None)
        assert mine == reference
        mine = summary(None, await collect(ours.stream(streamed, LIMITS)))
        reference = summary(None, await collect(theirs.stream(split[1], streamed, LIMITS)))
        assert mine == reference


@pytest.mark.asyncio
async def test_parity_with_acompletion_ollama(ollama: FakeOllama, litellm: Any) -> None:
    async with pooled() as clients:
        config = provider(f"ollama_chat/{ollama.model}", ollama.url)
        ours, theirs = TranslatedAdapter(config, clients), Acompletion(config, clients.client, litellm)
        plain, streamed = body(), body(True, stream_options={"include_usage": True})
        mine = summary(orjson.loads((await ours.complete(plain, LIMITS)).body), None)
        reference = summary(orjson.loads((await theirs.complete(ours._split(plain), plain, LIMITS)).body), None)
        assert mine == reference
        mine = summary(None, await collect(ours.stream(streamed, LIMITS)))
        reference = summary(None, await collect(theirs.stream(ours._split(streamed), streamed, LIMITS)))
        assert mine == reference
        assert ollama.requests[0].body == ollama.requests[1].body  # the same upstream request


@pytest.mark.asyncio
async def test_other_providers_go_through_acompletion() -> None:
    async with mock_client(lambda request: httpx.Response(500)) as local:
        adapter = TranslatedAdapter(provider("cohere_chat/command-r", local.url, api_key="k"), local.clients)
        assert "via=acompletion" in repr(adapter)
        await adapter.probe(LIMITS)  # no free check known: a no-op


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (None, FailureClass.CONNECTION_ERROR),  # litellm wraps it: 'Cannot connect to host', no __cause__
        (500, FailureClass.SERVER_ERROR),
        (401, FailureClass.AUTH_ERROR),
    ],
    ids=["refused", "500", "401"],
)
async def test_the_acompletion_path_classifies_what_went_wrong(status: int | None, failure: FailureClass) -> None:
    """Providers without a dialect of ours (here Cohere) go through litellm's `acompletion` and
    `aembedding`: a refused connection and error statuses become the same failure classes."""
    error = orjson.dumps({"message": "nope"})
    async with mock_client(lambda request: httpx.Response(status or 500, content=error)) as local:
        base = local.url if status is not None else f"http://127.0.0.1:{closed_port()}"
        chat = TranslatedAdapter(provider("cohere_chat/command-r", base, api_key="k"), local.clients)
        embedder = TranslatedAdapter(provider("cohere/embed-english-v3.0", base, api_key="k"), local.clients)
        for call in (
            lambda: chat.complete(body(), LIMITS),
            lambda: collect(chat.stream(body(True), LIMITS)),
            lambda: embedder.embed({"model": "e", "input": ["hi"]}, LIMITS),
        ):
            with pytest.raises(ProviderError) as caught:
                await call()
            assert caught.value.failure is failure, caught.value


@pytest.mark.asyncio
async def test_embeddings_from_an_anthropic_provider_are_unsupported_and_never_sent() -> None:
    async with mock_client(lambda request: httpx.Response(500)) as local:
        claude = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:
            await claude.embed({"model": "e", "input": "hi"}, LIMITS)
    assert caught.value.failure is FailureClass.UNSUPPORTED and not caught.value.sent
    assert "no embeddings" in caught.value.message


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "failure"),
    [
        (b"<html>oops</html>", FailureClass.SERVER_ERROR),
        (b"[1, 2]", FailureClass.SERVER_ERROR),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            FailureClass.SERVER_ERROR,
        ),
    ],
    ids=["not-json", "not-an-object", "error"],
)
async def test_a_whole_anthropic_answer_that_is_no_message_is_a_server_error(
    answer: bytes, failure: FailureClass
) -> None:
    async with mock_client(lambda request: httpx.Response(200, content=answer)) as local:
        claude = TranslatedAdapter(provider(f"anthropic/{CLAUDE}", local.url, api_key="k"), local.clients)
        with pytest.raises(ProviderError) as caught:
            await claude.complete(body(), LIMITS)
    assert caught.value.failure is failure
