"""The attempt loop, in process: retries, budgets, edges, client errors, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.adapters import HttpClients, make_adapter
from proxy.app import create_app
from proxy.config import Config, parse_config
from proxy.dispatch import Dispatcher, backoff
from proxy.errors import AllProvidersFailed, FailureClass, UpstreamClientError
from proxy.health import HealthBoard
from proxy.metrics import Metrics
from proxy.observe import OperatorEvents, RequestRecord
from proxy.quota import QuotaGate
from proxy.service import open_session
from proxy.shaping import Needs
from proxy.state import MemoryStore

BODY: dict[str, Any] = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}


def completion(text: str) -> bytes:
    return orjson.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def config(url: str = "http://127.0.0.1:9", **route: Any) -> Config:
    providers = {
        name: {
            "model": f"openai/{name}-model",
            "api_base": f"{url}/{name}/v1",
            "api_key": "k",
            "retries": 2 if name == "a" else 0,
        }
        for name in ("a", "b")
    }
    return parse_config(
        {
            "providers": providers,
            "routes": {"r": {"chain": ["a", "b"], **route}},
            "health": {"probe_interval_seconds": 0},
        },
        environ={},
    )


async def serve_locally(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve an aiohttp app on a free port of 127.0.0.1, in the test's loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)  # a hung handler is cancelled
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


class Upstream:
    """Two OpenAI-compatible providers, `a` and `b` (the first path segment), on
    one local server, answering from a script of statuses."""

    def __init__(self, script: dict[str, list[int]], headers: dict[str, str] | None = None) -> None:
        self.script = script
        self.calls: list[str] = []
        self.headers = headers or {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.calls.append(name)
        statuses = self.script[name]
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        if status == 0:  # no answer at all
            await asyncio.sleep(30)
        if status == 200:
            return web.Response(body=completion(f"from {name}"), content_type="application/json")
        body = orjson.dumps({"error": {"message": f"{name} says {status}"}})
        return web.Response(status=status, body=body, content_type="application/json", headers=self.headers)

    async def __aenter__(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/{name}/v1/chat/completions", self.handle)
        self._runner, self.url = await serve_locally(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@contextlib.asynccontextmanager
async def dispatching(
    script: dict[str, list[int]], sleeps: list[float], headers: dict[str, str] | None = None, **route: Any
) -> AsyncIterator[tuple[Dispatcher, Upstream, Config]]:
    async with Upstream(script, headers) as upstream, open_session() as session, httpx.AsyncClient() as client:
        cfg = config(upstream.url, **route)
        clients = HttpClients(session=session, client=client)
        adapters = {name: make_adapter(p, clients) for name, p in cfg.providers.items()}

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        store = MemoryStore()
        events = OperatorEvents(Metrics(CollectorRegistry()))
        health = HealthBoard(cfg.health, cfg.providers, store, events)
        quota = QuotaGate(store, cfg.quota_timezone, events)
        yield Dispatcher(cfg, adapters, health, quota, sleep=sleep, rng=lambda: 1.0), upstream, cfg


@pytest.mark.asyncio
async def test_retries_with_backoff_then_answer_from_same_provider() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [503, 503, 200], "b": [200]}, sleeps) as (dispatcher, upstream, cfg):
        record = RequestRecord("id", "r", False)
        result = await dispatcher.complete(cfg.routes["r"], BODY, Needs(), record)
    assert orjson.loads(result.body)["choices"][0]["message"]["content"] == "from a"
    assert upstream.calls == ["a", "a", "a"]
    assert sleeps == [0.25, 0.5]
    assert [a.outcome for a in record.attempts] == ["ok"]


@pytest.mark.asyncio
async def test_no_retry_when_retry_after_passes_the_budget() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [429], "b": [200]}, sleeps, {"retry-after": "60"}, budget=10) as (
        dispatcher,
        upstream,
        cfg,
    ):
        record = RequestRecord("id", "r", False)
        await dispatcher.complete(cfg.routes["r"], BODY, Needs(), record)
    assert upstream.calls == ["a", "b"]
    assert sleeps == []
    assert record.headers()["x-proxy-fallbacks"] == "a=rate_limited"


@pytest.mark.asyncio
async def test_client_error_is_not_retried_nor_followed() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [400], "b": [200]}, sleeps) as (dispatcher, upstream, cfg):
        with pytest.raises(UpstreamClientError) as caught:
            await dispatcher.complete(cfg.routes["r"], BODY, Needs(), RequestRecord("id", "r", False))
    assert upstream.calls == ["a"]
    assert caught.value.status_code == 400


@pytest.mark.asyncio
async def test_all_failed_lists_every_provider() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [500], "b": [401]}, sleeps) as (dispatcher, upstream, cfg):
        with pytest.raises(AllProvidersFailed) as caught:
            await dispatcher.complete(cfg.routes["r"], BODY, Needs(), RequestRecord("id", "r", False))
    assert upstream.calls == ["a", "a", "a", "b"]
    assert [(a.provider, a.outcome) for a in caught.value.attempts] == [("a", "server_error"), ("b", "auth_error")]


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    assert backoff(0, None, lambda: 0.5) == 0.125
    assert backoff(10, None, lambda: 1.0) == 4.0
    assert backoff(0, 2.0, lambda: 1.0) == 2.0


class EndlessStream:
    """An upstream whose SSE answer never ends; records when its client goes away."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "id": "s",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}],
        }
        try:
            while True:
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            self.closed.set()
            raise


@pytest.mark.asyncio
async def test_client_disconnect_closes_the_upstream_connection() -> None:
    endless = EndlessStream()
    upstream = web.Application()
    upstream.router.add_post("/a/v1/chat/completions", endless.handle)
    runner, url = await serve_locally(upstream)
    app = create_app(config(url))
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

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    try:
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), timeout=5)
            # The connection was closed, not kept in the pool mid-body: the upstream sees it go.
            await asyncio.wait_for(endless.closed.wait(), timeout=5)
    finally:
        await runner.cleanup()
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"x-proxy-provider"] == b"a"


@pytest.mark.asyncio
async def test_a_retry_whose_backoff_would_pass_the_budget_is_not_waited_for() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [503], "b": [200]}, sleeps, budget=0.2) as (dispatcher, upstream, cfg):
        record = RequestRecord("id", "r", False)
        result = await dispatcher.complete(cfg.routes["r"], BODY, Needs(), record)
    # a's first backoff (0.25 s) ends after the route's budget: no wait, no retry; b answers
    assert orjson.loads(result.body)["choices"][0]["message"]["content"] == "from b"
    assert upstream.calls == ["a", "b"] and sleeps == []
    assert record.headers()["x-proxy-fallbacks"] == "a=server_error"


@pytest.mark.asyncio
async def test_the_last_resort_that_fails_too_ends_in_all_providers_failed_naming_it() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [503], "b": [500]}, sleeps) as (dispatcher, upstream, cfg):
        dispatcher.health.failure("a", FailureClass.AUTH_ERROR)  # a's breaker opens at once
        record = RequestRecord("id", "r", False)
        with pytest.raises(AllProvidersFailed) as caught:
            await dispatcher.complete(cfg.routes["r"], BODY, Needs(), record)
    assert upstream.calls == ["b", "a", "a", "a"]  # b, then a once anyway (its retries included)
    assert record.last_resort == "a"
    attempts = [(a.provider, a.outcome) for a in caught.value.attempts]
    assert attempts == [("a", "unhealthy"), ("b", "server_error"), ("a", "server_error")]
    assert "last resort" in caught.value.attempts[-1].detail


@pytest.mark.asyncio
async def test_a_client_error_from_the_last_resort_goes_back_to_the_client() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [400], "b": [500]}, sleeps) as (dispatcher, upstream, cfg):
        dispatcher.health.failure("a", FailureClass.AUTH_ERROR)
        with pytest.raises(UpstreamClientError) as caught:
            await dispatcher.complete(cfg.routes["r"], BODY, Needs(), RequestRecord("id", "r", False))
    assert upstream.calls == ["b", "a"] and caught.value.status_code == 400


@pytest.mark.asyncio
async def test_no_last_resort_for_a_provider_switched_off_by_the_operator() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [200], "b": [500]}, sleeps) as (dispatcher, upstream, cfg):
        dispatcher.health.disable("a", "maintenance")
        record = RequestRecord("id", "r", False)
        with pytest.raises(AllProvidersFailed):
            await dispatcher.complete(cfg.routes["r"], BODY, Needs(), record)
    assert upstream.calls == ["b"] and record.last_resort is None


@pytest.mark.asyncio
async def test_no_last_resort_once_the_route_budget_is_spent() -> None:
    sleeps: list[float] = []
    async with dispatching({"a": [200], "b": [0]}, sleeps, budget=0.3) as (dispatcher, upstream, cfg):
        dispatcher.health.failure("a", FailureClass.AUTH_ERROR)  # skipped: its breaker is open
        record = RequestRecord("id", "r", False)
        with pytest.raises(AllProvidersFailed) as caught:
            await asyncio.wait_for(dispatcher.complete(cfg.routes["r"], BODY, Needs(), record), 10)
    assert upstream.calls == ["b"] and record.last_resort is None  # b used up the budget: a is not tried
    assert [(a.provider, a.outcome) for a in caught.value.attempts] == [("a", "unhealthy"), ("b", "timeout")]
