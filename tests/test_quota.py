"""Quota accounting through the proxy: every upstream call that may have been sent
costs one admission (retries included); only a call that provably never left
gives its request back; a quota that runs out in the middle of a visit ends it."""

from __future__ import annotations

import asyncio
import itertools
import time
import zoneinfo
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.adapters import Usage
from proxy.errors import FailureClass
from proxy.fakes import FakeOpenAI
from proxy.quota import QuotaGate, maybe_received, never_sent, quota_day
from proxy.state import Admission, MemoryStore, StoreUnavailable

from .conftest import ServedApp, openai_provider
from .redis_server import free_port

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def requests_used(store: MemoryStore, provider: str) -> int:
    requests, _ = asyncio.run(store.usage(provider, quota_day(time.time(), zoneinfo.ZoneInfo("UTC"))))
    return requests


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def proxy_with(
    serve: Callable[..., ServedApp], store: MemoryStore, cloud_url: str, backup: FakeOpenAI, **cloud: Any
) -> ServedApp:
    return serve(
        {
            "providers": {
                "cloud": openai_provider(cloud_url, timeout={"connect": 1, "first_token": 2, "total": 3}, **cloud),
                "backup": openai_provider(backup.url),
            },
            "routes": {"default": ["cloud", "backup"]},
        },
        store=store,
    )


@pytest.fixture
def sdk() -> Iterator[Callable[[ServedApp], openai.OpenAI]]:
    clients: list[openai.OpenAI] = []

    def make(proxy: ServedApp) -> openai.OpenAI:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_each_retry_costs_one_admission(
    serve: Callable[..., ServedApp],
    store: MemoryStore,
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    sdk: Callable[[ServedApp], openai.OpenAI],
    stream: bool,
) -> None:
    proxy = proxy_with(serve, store, cloud.url, backup, retries=2, quota={"requests_per_day": 100})
    cloud.set_fault("status", status=503)
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="default", messages=MESSAGES, stream=stream)
    assert raw.headers["x-proxy-provider"] == "backup"
    assert cloud.request_count == 3
    assert requests_used(store, "cloud") == 3  # one per call the provider received


def test_a_stream_that_dies_before_its_first_token_is_counted(
    serve: Callable[..., ServedApp],
    store: MemoryStore,
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    sdk: Callable[[ServedApp], openai.OpenAI],
) -> None:
    proxy = proxy_with(serve, store, cloud.url, backup, quota={"requests_per_day": 100})
    cloud.set_fault("die_midstream", after_chunks=0)
    with sdk(proxy).chat.completions.with_streaming_response.create(
        model="default", messages=MESSAGES, stream=True
    ) as response:
        assert response.headers["x-proxy-provider"] == "backup"
        assert "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert cloud.request_count == 1
    assert requests_used(store, "cloud") == 1


def test_a_refused_connection_gives_the_request_back(
    serve: Callable[..., ServedApp],
    store: MemoryStore,
    backup: FakeOpenAI,
    sdk: Callable[[ServedApp], openai.OpenAI],
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: the call never left
    proxy = proxy_with(serve, store, nowhere, backup, retries=1, quota={"requests_per_day": 100})
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-provider"] == "backup"
    assert "cloud=connection_error" in raw.headers["x-proxy-fallbacks"]
    assert requests_used(store, "cloud") == 0


def test_a_quota_that_runs_out_mid_visit_stops_the_retries(
    serve: Callable[..., ServedApp],
    store: MemoryStore,
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    sdk: Callable[[ServedApp], openai.OpenAI],
) -> None:
    proxy = proxy_with(serve, store, cloud.url, backup, retries=3, quota={"requests_per_day": 2})
    cloud.set_fault("status", status=500)
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-provider"] == "backup"
    assert raw.headers["x-proxy-fallbacks"] == "cloud=server_error"  # the failure that called for a retry
    assert cloud.request_count == 2 and requests_used(store, "cloud") == 2
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-fallbacks"] == "cloud=quota_exhausted" and cloud.request_count == 2


def test_a_hedge_that_lost_the_race_stays_counted_and_is_reported_uncertain(
    serve: Callable[..., ServedApp],
    store: MemoryStore,
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    sdk: Callable[[ServedApp], openai.OpenAI],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = serve(
        {
            "providers": {
                "cloud": openai_provider(cloud.url, quota={"requests_per_day": 1}, timeout={"first_token": 2.5}),
                "backup": openai_provider(backup.url),
            },
            "routes": {"default": {"chain": ["cloud", "backup"], "hedge_after_ms": 150}},
        },
        store=store,
    )
    cloud.set_fault("slow", first_token_delay=2)
    client = sdk(proxy)
    raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-provider"] == "backup" and cloud.request_count == 1
    assert requests_used(store, "cloud") == 1  # cancelled, but the provider had received it
    assert any('"event":"quota_uncertain"' in r.getMessage() and "cancelled" in r.getMessage() for r in caplog.records)
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'fallback_proxy_quota_uncertain_total{provider="cloud"} 1.0' in metrics
    cloud.clear_fault()
    raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-fallbacks"] == "cloud=quota_exhausted"


# The gate's settle, against a store.


class Events:
    def __init__(self) -> None:
        self.settle_failures: list[StoreUnavailable] = []

    def admitted(self, provider: object, admission: Admission) -> None: ...
    def exhausted(self, provider: object, reason: str) -> None: ...
    def fail_closed(self, provider: object, error: StoreUnavailable) -> None: ...

    def settle_failed(self, provider: str, error: StoreUnavailable) -> None:
        self.settle_failures.append(error)


@pytest.mark.asyncio
async def test_a_settle_applies_once_and_only_for_an_admission_that_counted() -> None:
    store = MemoryStore()
    gate = QuotaGate(store, "UTC", Events())  # type: ignore[arg-type]
    provider = _provider(tokens_per_day=10_000)
    reservation = await gate.admit(provider, {"messages": MESSAGES, "max_tokens": 100})
    assert reservation is not None and reservation.call_id
    day = reservation.day
    estimate = reservation.tokens_estimate
    assert await store.usage("cloud", day) == (1, estimate)
    for _ in range(2):  # a replay of the same settle changes nothing
        await gate.settle(reservation, Usage(prompt_tokens=3, completion_tokens=4), None)
    assert await store.usage("cloud", day) == (1, 7)
    # A refund for an admission that never counted (its reply was lost before it ran) does nothing.
    await store.settle("cloud", day, requests_delta=-1, tokens_delta=-estimate, ttl_seconds=60, call_id="nope")
    assert await store.usage("cloud", day) == (1, 7)


@pytest.mark.asyncio
async def test_an_uncertain_call_stays_counted_and_is_counted_as_uncertain(caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import CollectorRegistry

    from proxy.metrics import Metrics
    from proxy.observe import OperatorEvents

    store, registry = MemoryStore(), CollectorRegistry()
    gate = QuotaGate(store, "UTC", OperatorEvents(Metrics(registry)))
    reservation = await gate.admit(_provider(requests_per_day=5), {"messages": MESSAGES})
    assert reservation is not None
    with caplog.at_level("INFO", logger="fallback_proxy.events"):
        await gate.settle(reservation, None, FailureClass.CONNECTION_ERROR, uncertain="ServerDisconnectedError")
    assert await store.usage("cloud", reservation.day) == (1, 0)
    assert registry.get_sample_value("fallback_proxy_quota_uncertain_total", {"provider": "cloud"}) == 1
    assert any(
        '"event":"quota_uncertain"' in r.getMessage() and "ServerDisconnected" in r.getMessage() for r in caplog.records
    )


def test_the_quota_refunds_what_classification_says_was_never_sent() -> None:
    import aiohttp

    from proxy.adapters import classify
    from proxy.errors import ProviderError

    def classified(cause: BaseException, *via: BaseException) -> ProviderError:
        chain = [*via, cause]
        for outer, inner in itertools.pairwise(chain):
            outer.__cause__ = inner
        return classify.from_exception(chain[0])

    refused = aiohttp.ClientConnectorError(_ConnectionKey(), OSError(111, "refused"))  # type: ignore[arg-type]
    assert never_sent(classified(refused, httpx.ConnectTimeout("mapped by httpx-aiohttp")))
    assert not never_sent(classified(aiohttp.ServerDisconnectedError(), httpx.ConnectTimeout("mapped")))
    assert not never_sent(classified(httpx.ReadTimeout("read")))
    assert not never_sent(ProviderError(FailureClass.SERVER_ERROR, "503"))  # unclassified: may have been sent
    # Whether these reached the upstream nobody knows: counted, and reported as uncertain.
    assert maybe_received(classified(aiohttp.ServerDisconnectedError()))
    assert maybe_received(classified(aiohttp.ClientOSError(104, "Connection reset by peer")))
    assert not maybe_received(classified(refused))
    assert not maybe_received(classified(aiohttp.ClientPayloadError("Response payload is not completed")))
    assert not maybe_received(classify.from_status(503, b"busy"))


class _ConnectionKey:
    host, port, ssl = "127.0.0.1", 1, False


def _provider(**quota: int) -> Any:
    from proxy.config import ProviderConfig, Quota

    return ProviderConfig(
        name="cloud",
        model="openai/gpt-test",
        litellm_provider="openai",
        upstream_model="gpt-test",
        openai_compatible=True,
        api_base=None,
        quota=Quota(**quota),
    )


@pytest.mark.asyncio
async def test_a_settle_that_meets_a_dead_redis_is_reported_and_waits_for_replay() -> None:
    from prometheus_client import CollectorRegistry

    from proxy.metrics import Metrics
    from proxy.observe import OperatorEvents
    from proxy.state import RedisStore

    from .redis_server import RedisServer

    redis = RedisServer().start()
    store, registry = RedisStore.from_url(redis.url, breaker_seconds=0), CollectorRegistry()
    try:
        gate = QuotaGate(store, "UTC", OperatorEvents(Metrics(registry)))
        reservation = await gate.admit(_provider(requests_per_day=5), {"messages": MESSAGES})
        assert reservation is not None and await store.usage("cloud", reservation.day) == (1, 0)
        redis.kill()
        await gate.settle(reservation, None, None)  # answered; no usage known: only the mark to clear
        assert registry.get_sample_value("fallback_proxy_store_errors_total", {"operation": "settle"}) == 1
        assert store.pending == 1 and registry.get_sample_value("fallback_proxy_store_pending") == 1
        await gate.settle(None, None, None)  # a provider without a quota: nothing to settle, no call
        assert registry.get_sample_value("fallback_proxy_store_errors_total", {"operation": "settle"}) == 1
    finally:
        await store.aclose(flush_seconds=0)
        redis.stop()
