"""The fake providers over real sockets: wire formats, faults, control endpoint, restart, blackhole."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from proxy.fakes import Blackhole, FakeAnthropic, FakeOllama, FakeOpenAI, FakeServer, Fault

MESSAGES = [{"role": "user", "content": "say hello to me"}]


# -- one description per wire format, so fault tests can be parametrized -----------------------


@dataclass(frozen=True)
class Wire:
    """How to call one provider's generation endpoint and read its answers."""

    name: str
    make: Callable[..., FakeServer]
    path: str
    headers: dict[str, str]
    base_body: dict[str, Any]
    text_of: Callable[[Any], str]
    error_of: Callable[[Any], str]
    event_of: Callable[[str], tuple[str, str] | None]

    def body(self, stream: bool, **extra: Any) -> dict[str, Any]:
        return {**self.base_body, "stream": stream, **extra}


def _openai_event(line: str) -> tuple[str, str] | None:
    if not line.startswith("data: "):
        return None
    if line == "data: [DONE]":
        return ("done", "")
    data = json.loads(line[6:])
    if "error" in data:
        return ("error", data["error"]["message"])
    content = data["choices"][0]["delta"].get("content") if data["choices"] else None
    return ("text", content) if content else None


def _anthropic_event(line: str) -> tuple[str, str] | None:
    if not line.startswith("data: "):
        return None
    data = json.loads(line[6:])
    if data["type"] == "content_block_delta":
        return ("text", data["delta"]["text"])
    if data["type"] == "message_stop":
        return ("done", "")
    if data["type"] == "error":
        return ("error", data["error"]["type"])
    return None


def _ollama_event(line: str) -> tuple[str, str] | None:
    if not line:
        return None
    data = json.loads(line)
    if "error" in data:
        return ("error", data["error"])
    if data["done"]:
        return ("done", "")
    return ("text", data["message"]["content"])


WIRES = {
    "openai": Wire(
        name="openai",
        make=FakeOpenAI,
        path="/v1/chat/completions",
        headers={"authorization": "Bearer k"},
        base_body={"model": "gpt-4o", "messages": MESSAGES},
        text_of=lambda j: j["choices"][0]["message"]["content"],
        error_of=lambda j: j["error"]["message"],
        event_of=_openai_event,
    ),
    "anthropic": Wire(
        name="anthropic",
        make=FakeAnthropic,
        path="/v1/messages",
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        base_body={"model": "claude-x", "max_tokens": 100, "messages": MESSAGES},
        text_of=lambda j: j["content"][0]["text"],
        error_of=lambda j: j["error"]["message"],
        event_of=_anthropic_event,
    ),
    "ollama": Wire(
        name="ollama",
        make=FakeOllama,
        path="/api/chat",
        headers={"authorization": "Bearer k"},
        base_body={"model": "qwen2.5:7b", "messages": MESSAGES},
        text_of=lambda j: j["message"]["content"],
        error_of=lambda j: j["error"],
        event_of=_ollama_event,
    ),
}


@dataclass
class Streamed:
    status: int
    events: list[tuple[str, str]] = field(default_factory=list)
    error: Exception | None = None
    headers_after: float = 0.0
    first_text_after: float | None = None

    @property
    def text(self) -> str:
        return "".join(value for kind, value in self.events if kind == "text")

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def read_stream(client: httpx.Client, wire: Wire, fake: FakeServer, **extra: Any) -> Streamed:
    started = time.monotonic()
    with client.stream("POST", fake.url + wire.path, json=wire.body(True, **extra), headers=wire.headers) as response:
        result = Streamed(response.status_code, headers_after=time.monotonic() - started)
        try:
            for line in response.iter_lines():
                event = wire.event_of(line)
                if event is not None:
                    if event[0] == "text" and result.first_text_after is None:
                        result.first_text_after = time.monotonic() - started
                    result.events.append(event)
        except httpx.HTTPError as exc:
            result.error = exc
    return result


def post(client: httpx.Client, wire: Wire, fake: FakeServer, *, stream: bool = False, **kw: Any) -> httpx.Response:
    return client.post(fake.url + wire.path, json=wire.body(stream), headers=wire.headers, **kw)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeServer]]:
    """One running fake per provider, shared by the module (tests reset them through `fake`/`named`)."""
    started = {name: wire.make().start() for name, wire in WIRES.items()}
    yield started
    for fake in started.values():
        fake.stop()


def _fresh(fake: FakeServer) -> FakeServer:
    fake.clear_fault()
    fake.reset()
    return fake


@pytest.fixture(params=sorted(WIRES))
def wire(request: pytest.FixtureRequest) -> Wire:
    return WIRES[request.param]


@pytest.fixture
def fake(wire: Wire, fakes: dict[str, FakeServer]) -> Iterator[FakeServer]:
    """The shared fake of the parametrized `wire`, with no fault and no records."""
    yield _fresh(fakes[wire.name])
    fakes[wire.name].clear_fault()


@pytest.fixture
def named(fakes: dict[str, FakeServer]) -> Iterator[Callable[[str], FakeServer]]:
    """`named("openai")`: a shared fake by provider name, with no fault and no records."""
    yield lambda name: _fresh(fakes[name])
    for shared in fakes.values():
        shared.clear_fault()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as http:
        yield http


# -- normal answers --------------------------------------------------------------------------------


def test_plain_answer(wire: Wire, fake: FakeServer, client: httpx.Client) -> None:
    response = post(client, wire, fake)
    assert response.status_code == 200
    assert wire.text_of(response.json()) == f"Hello from {wire.name}."
    assert response.headers["x-fake-provider"] == wire.name
    streamed = read_stream(client, wire, fake)
    assert streamed.status == 200 and streamed.error is None
    assert streamed.text == f"Hello from {wire.name}."
    assert streamed.kinds == ["text", "text", "text", "done"]  # one piece per word
    assert fake.request_count == 2
    record = fake.requests[0]
    assert (record.method, record.path, record.body["messages"]) == ("POST", wire.path, MESSAGES)
    assert all(key == key.lower() for key in record.headers)
    fake.reset()
    assert fake.requests == []


def test_reply_and_chunks_options(client: httpx.Client) -> None:
    wire = WIRES["openai"]
    with FakeOpenAI("x", reply="abcdefg", chunks=3, model="fixed-model") as fake:
        streamed = read_stream(client, wire, fake)
        assert [v for k, v in streamed.events if k == "text"] == ["ab", "cd", "efg"]
        assert post(client, wire, fake).json()["model"] == "fixed-model"


def test_openai_sdk_parses_answers(named: Callable[[str], FakeServer]) -> None:
    fake = named("openai")
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0) as sdk:
        completion = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi you"}])
        assert completion.choices[0].message.content == "Hello from openai."
        assert completion.choices[0].finish_reason == "stop"
        assert completion.model == "gpt-4o"
        assert completion.id.startswith("chatcmpl-")
        assert completion.usage is not None and completion.usage.prompt_tokens == 2
        assert completion.usage.completion_tokens == 3
        chunks = list(
            sdk.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from openai."
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == 4
        assert len({c.id for c in chunks}) == 1
        assert [m.id for m in sdk.models.list()] == ["gpt-4o-mini"]
        fake.set_fault("stream_error")
        with pytest.raises(openai.APIError, match="server had an error"):
            list(sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))


def test_openai_validation(named: Callable[[str], FakeServer], client: httpx.Client) -> None:
    fake = named("openai")
    response = client.post(fake.url + "/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    response = client.post(fake.url + "/v1/chat/completions", content=b"{nope")
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert client.get(fake.url + "/v1/nope").json()["error"]["message"] == "Invalid URL (GET /v1/nope)"


def test_anthropic_stream_event_sequence(named: Callable[[str], FakeServer], client: httpx.Client) -> None:
    fake = named("anthropic")
    body = {**WIRES["anthropic"].body(True), "system": "be nice"}
    with client.stream("POST", fake.url + "/v1/messages", json=body, headers=WIRES["anthropic"].headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [block.split("\n") for block in raw.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    datas = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [d["type"] for d in datas] == names
    message = datas[0]["message"]
    assert message["id"].startswith("msg_") and message["content"] == [] and message["model"] == "claude-x"
    assert message["usage"]["input_tokens"] == 6
    assert datas[1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for d in datas[3:6]) == "Hello from anthropic."
    assert datas[7]["delta"]["stop_reason"] == "end_turn" and datas[7]["usage"] == {"output_tokens": 3}


def test_anthropic_non_stream_and_version_header(named: Callable[[str], FakeServer], client: httpx.Client) -> None:
    fake = named("anthropic")
    wire = WIRES["anthropic"]
    message = post(client, wire, fake).json()
    assert message["type"] == "message" and message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 4, "output_tokens": 3}
    response = client.post(fake.url + "/v1/messages", json=wire.body(False), headers={"x-api-key": "k"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    models = client.get(fake.url + "/v1/models", headers=wire.headers).json()
    assert models["data"][0]["type"] == "model"


def test_ollama_native_endpoints(named: Callable[[str], FakeServer], client: httpx.Client) -> None:
    fake = named("ollama")
    tags = client.get(fake.url + "/api/tags").json()
    assert [m["name"] for m in tags["models"]] == ["qwen2.5:7b"]
    assert client.get(fake.url + "/").text == "Ollama is running"
    show = client.post(fake.url + "/api/show", json={"model": "qwen2.5:7b"}).json()
    assert show["model_info"]["qwen2.context_length"] == 32768
    warm = client.post(fake.url + "/api/generate", json={"model": "qwen2.5:7b", "keep_alive": -1}).json()
    assert warm["done"] is True and warm["done_reason"] == "load" and warm["response"] == ""
    assert fake.requests[-1].body["keep_alive"] == -1
    lines = client.post(fake.url + "/api/generate", json={"model": "qwen2.5:7b", "prompt": "hi"}).text
    parsed = [json.loads(line) for line in lines.splitlines()]
    assert "".join(p["response"] for p in parsed) == "Hello from ollama."
    assert parsed[-1]["done"] is True and parsed[-1]["eval_count"] == 3
    final = client.post(fake.url + "/api/chat", json={**WIRES["ollama"].body(False)}).json()
    assert final["done_reason"] == "stop" and final["prompt_eval_count"] == 4
    missing = client.post(fake.url + "/api/chat", json={"model": "llama3", "messages": MESSAGES})
    assert missing.status_code == 404
    assert missing.json() == {"error": 'model "llama3" not found, try pulling it first'}


def test_ollama_openai_compatible_endpoint(named: Callable[[str], FakeServer]) -> None:
    fake = named("ollama")
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="ollama", max_retries=0) as sdk:
        completion = sdk.chat.completions.create(model="qwen2.5:7b", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "Hello from ollama."
        stream = sdk.chat.completions.create(
            model="qwen2.5:7b", messages=[{"role": "user", "content": "h"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from ollama."
        assert [m.id for m in sdk.models.list()] == ["qwen2.5:7b"]
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("name", sorted(WIRES))
def test_api_key_required(name: str, client: httpx.Client) -> None:
    wire = WIRES[name]
    with wire.make(api_key="k") as fake:
        assert post(client, wire, fake).status_code == 200
        bad = {**wire.headers, "authorization": "Bearer wrong", "x-api-key": "wrong"}
        response = client.post(fake.url + wire.path, json=wire.body(False), headers=bad)
        assert response.status_code == 401
        assert wire.error_of(response.json())
        assert fake.request_count == 2


@pytest.mark.asyncio
async def test_usable_from_async_code(named: Callable[[str], FakeServer]) -> None:
    fake = named("ollama")
    async with httpx.AsyncClient() as client:
        response = await client.post(fake.url + "/api/chat", json=WIRES["ollama"].body(False))
    assert response.json()["message"]["content"] == "Hello from ollama."


# -- faults ----------------------------------------------------------------------------------------


def test_status_fault(wire: Wire, fake: FakeServer, client: httpx.Client) -> None:
    fake.set_fault("status", status=429, retry_after=3, times=1)
    response = post(client, wire, fake)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert wire.error_of(response.json())
    streamed = read_stream(client, wire, fake)  # times=1: back to normal
    assert streamed.status == 200 and streamed.text == f"Hello from {wire.name}."
    fake.set_fault("status", status=503)
    assert post(client, wire, fake).status_code == 503
    assert read_stream(client, wire, fake).status == 503


def test_provider_specific_error_bodies(named: Callable[[str], FakeServer], client: httpx.Client) -> None:
    oa, an = WIRES["openai"], WIRES["anthropic"]
    openai_fake, anthropic_fake = named("openai"), named("anthropic")
    openai_fake.set_fault("status", status=400, error_code="context_length_exceeded")
    error = post(client, oa, openai_fake).json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("This model's maximum context length is 8192 tokens.")
    anthropic_fake.set_fault("status", status=400, error_code="context_length_exceeded")
    assert post(client, an, anthropic_fake).json()["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 210000 tokens > 200000 maximum",
    }
    expected = {529: "overloaded_error", 503: "overloaded_error", 429: "rate_limit_error", 500: "api_error"}
    for status, error_type in expected.items():
        anthropic_fake.set_fault("status", status=status)
        body = post(client, an, anthropic_fake).json()
        assert body["type"] == "error" and body["error"]["type"] == error_type
    openai_fake.set_fault("status", status=500)
    assert post(client, oa, openai_fake).json()["error"]["type"] == "server_error"


def test_stream_error(wire: Wire, fake: FakeServer, client: httpx.Client) -> None:
    fake.set_fault("stream_error", after_chunks=2)
    streamed = read_stream(client, wire, fake)
    assert streamed.status == 200 and streamed.error is None
    assert streamed.kinds == ["text", "text", "error"]
    assert streamed.text == "Hello from"
    assert post(client, wire, fake).status_code == 500


def test_die_midstream(wire: Wire, fake: FakeServer, client: httpx.Client) -> None:
    fake.set_fault("die_midstream", after_chunks=1)
    streamed = read_stream(client, wire, fake)
    assert streamed.status == 200
    assert isinstance(streamed.error, httpx.RemoteProtocolError)  # incomplete chunked body
    assert streamed.kinds == ["text"] and streamed.text == "Hello"
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        post(client, wire, fake)


def test_hang(wire: Wire, fake: FakeServer, client: httpx.Client) -> None:
    fake.set_fault("hang", times=1)
    with pytest.raises(httpx.ReadTimeout):
        post(client, wire, fake, timeout=0.2)
    assert post(client, wire, fake).status_code == 200


def test_slow(wire: Wire, fake: FakeServer, client: httpx.Client) -> None:
    fake.set_fault("slow", first_token_delay=0.1, token_delay=0.02)
    started = time.monotonic()
    assert post(client, wire, fake).status_code == 200
    assert time.monotonic() - started >= 0.1
    streamed = read_stream(client, wire, fake)
    assert streamed.text == f"Hello from {wire.name}." and streamed.kinds[-1] == "done"
    assert streamed.headers_after < 0.08  # headers (and preamble events) come at once
    assert streamed.first_text_after is not None and streamed.first_text_after >= 0.1


def test_fault_times_then_reverts(fake: FakeServer, wire: Wire, client: httpx.Client) -> None:
    fake.fault = Fault("status", status=500, times=2)
    assert [post(client, wire, fake).status_code for _ in range(3)] == [500, 500, 200]
    assert fake.fault == Fault()


def test_fault_control_endpoint(fake: FakeServer, wire: Wire, client: httpx.Client) -> None:
    response = client.post(fake.url + "/_fault", json={"kind": "status", "status": 503, "times": 5})
    assert response.status_code == 200 and response.json()["remaining"] == 5
    assert fake.fault == Fault("status", status=503, times=5)
    assert post(client, wire, fake).status_code == 503
    assert client.get(fake.url + "/_fault").json()["remaining"] == 4
    assert client.delete(fake.url + "/_fault").json()["kind"] == "none"
    assert post(client, wire, fake).status_code == 200
    for bad in ({"kind": "explode"}, {"kind": "status", "status": "503"}, {"colour": 1}, [1]):
        assert client.post(fake.url + "/_fault", json=bad).status_code == 400
    assert all(record.path != "/_fault" for record in fake.requests)


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("refuse")
    with pytest.raises(ValueError):
        Fault("status", status=42)


# -- lifecycle ---------------------------------------------------------------------------------


def test_restart_on_same_port(client: httpx.Client) -> None:
    fake = FakeOllama("daemon").start()
    try:
        port = fake.port
        assert client.get(fake.url + "/api/tags").status_code == 200
        fake.stop()
        with pytest.raises(httpx.ConnectError):  # stop() is the "refuse" fault
            client.get(fake.url + "/api/tags")
        fake.start()
        assert fake.port == port
        assert client.get(fake.url + "/api/tags").status_code == 200
    finally:
        fake.stop()


def test_stop_is_quick_with_hung_and_slow_requests() -> None:
    fake = FakeOpenAI().start()
    wire = WIRES["openai"]
    outcomes: list[BaseException | int] = []

    def call(stream: bool) -> None:
        try:
            with httpx.Client(timeout=10) as http:
                outcomes.append(post(http, wire, fake, stream=stream).status_code)
        except httpx.HTTPError as exc:
            outcomes.append(exc)

    fake.set_fault("hang")
    threads = [threading.Thread(target=call, args=(False,))]
    threads[0].start()
    while fake.request_count < 1:
        time.sleep(0.01)
    fake.set_fault("slow", first_token_delay=30)
    threads.append(threading.Thread(target=call, args=(False,)))
    threads[1].start()
    while fake.request_count < 2:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    for thread in threads:
        thread.join(timeout=5)
    assert len(outcomes) == 2 and all(isinstance(o, httpx.RemoteProtocolError) for o in outcomes)


def test_blackhole_connect_times_out() -> None:
    with Blackhole() as hole:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            httpx.get(hole.url, timeout=httpx.Timeout(0.5))
        assert 0.4 < time.monotonic() - started < 2.0
        port = hole.port
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}", timeout=1)
    with Blackhole(port=port) as hole:
        assert hole.port == port
