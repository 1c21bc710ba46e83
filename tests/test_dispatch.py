"""The attempt loop, in process: retries, budgets, edges, client errors, disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy.adapters import make_adapter
from proxy.app import create_app
from proxy.config import Config, parse_config
from proxy.dispatch import Dispatcher, backoff
from proxy.errors import AllProvidersFailed, UpstreamClientError
from proxy.health import HealthBoard
from proxy.observe import Metrics, OperatorEvents, RequestRecord
from proxy.quota import QuotaGate
from proxy.shaping import Needs
from proxy.state import MemoryStore

BODY: dict[str, Any] = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}


def completion(text: str) -> bytes:
    return orjson.dumps({
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })


def config(**route: Any) -> Config:
    providers = {
        name: {"model": f"openai/{name}-model", "api_base": f"http://{name}.test/v1", "api_key": "k",
               "retries": 2 if name == "a" else 0}
        for name in ("a", "b")
    }
    return parse_config(
        {"providers": providers, "routes": {"r": {"chain": ["a", "b"], **route}},
         "health": {"probe_interval_seconds": 0}},
        environ={},
    )


class Upstream:
    """A MockTransport handler answering by host, from a script of statuses."""

    def __init__(self, script: dict[str, list[int]], headers: dict[str, str] | None = None) -> None:
        self.script = script
        self.calls: list[str] = []
        self.headers = headers or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host.split(".")[0]
        self.calls.append(host)
        statuses = self.script[host]
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        if status == 200:
            return httpx.Response(200, content=completion(f"from {host}"))
        return httpx.Response(status, json={"error": {"message": f"{host} says {status}"}}, headers=self.headers)


def dispatcher(cfg: Config, upstream: Upstream, sleeps: list[float]) -> Dispatcher:
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    adapters = {name: make_adapter(p, client) for name, p in cfg.providers.items()}

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    store = MemoryStore()
    events = OperatorEvents(Metrics(CollectorRegistry()))
    health = HealthBoard(cfg.health, cfg.providers, store, events)
    quota = QuotaGate(store, cfg.quota_timezone, events)
    return Dispatcher(cfg, adapters, health, quota, sleep=sleep, rng=lambda: 1.0)


@pytest.mark.asyncio
async def test_retries_with_backoff_then_answer_from_same_provider() -> None:
    upstream, sleeps = Upstream({"a": [503, 503, 200], "b": [200]}), []
    cfg = config()
    record = RequestRecord("id", "r", False)
    result = await dispatcher(cfg, upstream, sleeps).complete(cfg.routes["r"], BODY, Needs(), record)
    assert orjson.loads(result.body)["choices"][0]["message"]["content"] == "from a"
    assert upstream.calls == ["a", "a", "a"]
    assert sleeps == [0.25, 0.5]
    assert [a.outcome for a in record.attempts] == ["ok"]


@pytest.mark.asyncio
async def test_no_retry_when_retry_after_passes_the_budget() -> None:
    upstream, sleeps = Upstream({"a": [429], "b": [200]}, headers={"retry-after": "60"}), []
    cfg = config(budget=10)
    record = RequestRecord("id", "r", False)
    await dispatcher(cfg, upstream, sleeps).complete(cfg.routes["r"], BODY, Needs(), record)
    assert upstream.calls == ["a", "b"]
    assert sleeps == []
    assert record.headers()["x-proxy-fallbacks"] == "a=rate_limited"


@pytest.mark.asyncio
async def test_client_error_is_not_retried_nor_followed() -> None:
    upstream, sleeps = Upstream({"a": [400], "b": [200]}), []
    cfg = config()
    with pytest.raises(UpstreamClientError) as caught:
        await dispatcher(cfg, upstream, sleeps).complete(cfg.routes["r"], BODY, Needs(), RequestRecord("id", "r", False))
    assert upstream.calls == ["a"]
    assert caught.value.status_code == 400


@pytest.mark.asyncio
async def test_all_failed_lists_every_provider() -> None:
    upstream, sleeps = Upstream({"a": [500], "b": [401]}), []
    cfg = config()
    with pytest.raises(AllProvidersFailed) as caught:
        await dispatcher(cfg, upstream, sleeps).complete(cfg.routes["r"], BODY, Needs(), RequestRecord("id", "r", False))
    assert upstream.calls == ["a", "a", "a", "b"]
    assert [(a.provider, a.outcome) for a in caught.value.attempts] == [("a", "server_error"), ("b", "auth_error")]


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    assert backoff(0, None, lambda: 0.5) == 0.125
    assert backoff(10, None, lambda: 1.0) == 4.0
    assert backoff(0, 2.0, lambda: 1.0) == 2.0


class Tracked(httpx.AsyncByteStream):
    """An endless SSE body that records being closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
        while True:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        self.closed.set()


@pytest.mark.asyncio
async def test_client_disconnect_closes_the_upstream_stream() -> None:
    body = Tracked()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    app = create_app(config(), transport=httpx.MockTransport(handler))
    request_body = orjson.dumps({**BODY, "stream": True})
    sent: list[dict[str, Any]] = []
    disconnect = asyncio.Event()
    messages = [{"type": "http.request", "body": request_body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if sum(1 for m in sent if m["type"] == "http.response.body") >= 3:
            disconnect.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert body.closed.is_set()
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"x-proxy-provider"] == b"a"
