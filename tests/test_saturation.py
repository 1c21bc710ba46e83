"""The proxy's own limits are never a provider's failure, over real sockets: a
provider's connection slots all busy (`max_connections`), the event loop lagging
past a deadline. Either way the client is answered (by the next provider, or a
clean 503 `server_overloaded` with Retry-After) and the provider stays healthy,
its breaker closed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.app import create_app
from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, build_config, openai_provider

MESSAGES: Any = [{"role": "user", "content": "Say hello."}]


def sdk(proxy: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def streamed_text(proxy: ServedApp, model: str) -> tuple[str, dict[str, str]]:
    with sdk(proxy) as client:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return text, dict(raw.headers)


def provider_health(proxy: ServedApp, name: str) -> dict[str, Any]:
    ready = httpx.get(proxy.url + "/readyz", timeout=10).json()
    health: dict[str, Any] = ready["health"][name]
    return health


def metric(proxy: ServedApp, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with `line_start` (0 if none)."""
    for line in httpx.get(proxy.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def one_slot(url: str, pool_wait: float) -> dict[str, Any]:
    return openai_provider(url, max_connections=1, timeout={"pool": pool_wait, "first_token": 20})


def test_a_request_that_finds_every_slot_busy_falls_through_without_marking_the_provider(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy = serve(
        {
            "providers": {"cloud": one_slot(cloud.url, 0.3), "backup": openai_provider(backup.url)},
            "routes": {"default": ["cloud", "backup"]},
            "health": {"failure_threshold": 1},
        }
    )
    # Long enough for the three requests below (0.3 s each on a quiet box) on a busy CI box too.
    cloud.set_fault("slow", first_token_delay=6.0, times=1)
    first: Future[tuple[str, dict[str, str]]] = pool.submit(streamed_text, proxy, "default")
    wait_for(lambda: cloud.request_count >= 1, "the first stream to reach the cloud")

    # The cloud's one connection is busy: each request waits 0.3 s, then the backup answers.
    for _ in range(3):
        text, headers = streamed_text(proxy, "default")
        assert (text, headers["x-proxy-provider"]) == ("Hello from backup.", "backup")
        assert headers["x-proxy-fallbacks"] == "cloud=proxy_saturated"
    assert cloud.request_count == 1, "a request waiting for a slot must never reach the provider"

    text, headers = first.result(timeout=30)
    assert (text, headers["x-proxy-provider"]) == ("Hello from cloud.", "cloud")
    health = provider_health(proxy, "cloud")
    assert (health["state"], health["breaker"]) == ("healthy", "closed"), health
    assert metric(proxy, 'fallback_proxy_attempts_total{outcome="proxy_saturated",provider="cloud"}') == 3
    assert metric(proxy, "fallback_proxy_breaker_opened_total") == 0
    # The slot came back with the first stream's end: the cloud answers again.
    assert streamed_text(proxy, "default")[1]["x-proxy-provider"] == "cloud"


def test_the_second_request_waits_for_the_slot_when_the_wait_allows_it(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy = serve({"providers": {"cloud": one_slot(cloud.url, 15)}, "routes": {"default": ["cloud"]}})
    cloud.set_fault("slow", first_token_delay=1.0, times=1)
    first = pool.submit(streamed_text, proxy, "default")
    wait_for(lambda: cloud.request_count >= 1, "the first stream to reach the cloud")
    second = pool.submit(streamed_text, proxy, "default")
    time.sleep(0.3)
    assert cloud.request_count == 1, "the second request must wait for the cloud's one connection"
    for done in (first, second):
        text, headers = done.result(timeout=30)
        assert (text, headers["x-proxy-provider"], headers.get("x-proxy-fallbacks")) == (
            "Hello from cloud.",
            "cloud",
            None,
        )
    assert cloud.request_count == 2


def test_with_no_other_provider_the_client_gets_server_overloaded_and_the_breaker_stays_closed(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy = serve(
        {
            "providers": {"cloud": one_slot(cloud.url, 0.2)},
            "routes": {"default": ["cloud"]},
            "health": {"failure_threshold": 1},
        }
    )
    cloud.set_fault("slow", first_token_delay=2.0, times=1)
    first = pool.submit(streamed_text, proxy, "default")
    wait_for(lambda: cloud.request_count >= 1, "the first stream to reach the cloud")
    for stream in (False, True, False):
        with sdk(proxy) as client, pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="default", messages=MESSAGES, stream=stream)
        error = refused.value
        assert error.status_code == 503
        assert error.response.headers["retry-after"] == "1"
        body = error.response.json()["error"]
        assert body["code"] == "server_overloaded" and "proxy_saturated" in body["message"], body
    assert first.result(timeout=30)[0] == "Hello from cloud."
    health = provider_health(proxy, "cloud")
    assert (health["state"], health["breaker"]) == ("healthy", "closed"), health


class LoopHandle:
    """Wraps an ASGI app to note the event loop that serves it, so that a test
    can stall that loop (a CPU-bound burst, a GC pause, a blocking call)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    def stall(self, seconds: float) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(time.sleep, seconds)


def lagging_proxy(
    serve_asgi: Callable[[ASGIApp], ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> tuple[ServedApp, LoopHandle]:
    config = build_config(
        {
            "providers": {
                "cloud": openai_provider(cloud.url, timeout={"first_token": 5.0}),
                "backup": openai_provider(backup.url),
            },
            "routes": {"default": ["cloud", "backup"]},
            "health": {"failure_threshold": 1, "loop_lag_seconds": 0.5},
        }
    )
    handle = LoopHandle(create_app(config))
    return serve_asgi(handle), handle


def test_a_first_token_deadline_that_fires_while_the_loop_lags_is_not_the_providers_failure(
    serve_asgi: Callable[[ASGIApp], ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy, handle = lagging_proxy(serve_asgi, cloud, backup)
    cloud.set_fault("slow", first_token_delay=8.0, times=1)  # no data is waiting when the stall ends
    answer = pool.submit(streamed_text, proxy, "default")
    wait_for(lambda: cloud.request_count >= 1, "the stream to reach the cloud")
    handle.stall(6.0)  # the proxy's loop is stuck past its 5 s deadline: it cannot tell whose lateness that was

    text, headers = answer.result(timeout=30)
    assert (text, headers["x-proxy-provider"]) == ("Hello from backup.", "backup")  # the client still falls back
    assert headers["x-proxy-fallbacks"] == "cloud=proxy_saturated"  # the proxy's lateness, named as such
    health = provider_health(proxy, "cloud")
    assert (health["state"], health["breaker"]) == ("healthy", "closed"), health
    excused = 'fallback_proxy_health_excused_total{failure="timeout",provider="cloud",reason="event_loop_lag"}'
    assert metric(proxy, excused) == 1
    assert metric(proxy, "fallback_proxy_event_loop_lag_seconds_count") > 0
    assert metric(proxy, 'fallback_proxy_event_loop_lag_seconds_bucket{le="1.0"}') < metric(
        proxy, "fallback_proxy_event_loop_lag_seconds_count"
    ), "the stall was not measured"


def test_when_the_only_provider_timed_out_while_the_loop_lagged_the_client_gets_server_overloaded(
    serve_asgi: Callable[[ASGIApp], ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy, handle = lagging_proxy(serve_asgi, cloud, backup)
    cloud.set_fault("slow", first_token_delay=8.0, times=1)  # no data is waiting when the stall ends

    def ask() -> None:
        with sdk(proxy) as client:
            client.chat.completions.create(model="cloud", messages=MESSAGES, stream=True)

    answer = pool.submit(ask)
    wait_for(lambda: cloud.request_count >= 1, "the stream to reach the cloud")
    handle.stall(6.0)  # the proxy's loop is stuck past its 5 s deadline

    with pytest.raises(openai.APIStatusError) as refused:
        answer.result(timeout=30)
    error = refused.value
    assert error.status_code == 503 and error.response.headers["retry-after"] == "1"
    body = error.response.json()["error"]
    assert body["code"] == "server_overloaded" and "event loop ran" in body["message"], body
    health = provider_health(proxy, "cloud")
    assert (health["state"], health["breaker"]) == ("healthy", "closed"), health


def test_the_same_deadline_without_lag_counts_against_the_provider(
    serve_asgi: Callable[[ASGIApp], ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    proxy, _ = lagging_proxy(serve_asgi, cloud, backup)
    cloud.set_fault("slow", first_token_delay=7.0, times=1)  # the provider really is late
    text, headers = streamed_text(proxy, "default")
    assert (text, headers["x-proxy-fallbacks"]) == ("Hello from backup.", "cloud=timeout")
    health = provider_health(proxy, "cloud")
    assert (health["state"], health["breaker"]) == ("offline", "open"), health


def test_a_lagging_loop_does_not_excuse_a_provider_that_refuses_connections(
    serve_asgi: Callable[[ASGIApp], ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    proxy, handle = lagging_proxy(serve_asgi, cloud, backup)
    cloud.stop()
    handle.stall(0.8)
    threading.Event().wait(0.1)  # the stall is queued on the proxy's loop
    text, headers = streamed_text(proxy, "default")
    assert (text, headers["x-proxy-fallbacks"]) == ("Hello from backup.", "cloud=connection_error")
    assert provider_health(proxy, "cloud")["breaker"] == "open"
