"""Load shedding and the event-loop lag monitor: a worker at `server.max_in_flight`
refuses new requests at once with 503 `server_overloaded` and Retry-After, the
requests in flight finish unaffected, and /readyz says overloaded (with
hysteresis) so that Kubernetes stops sending more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.config import ServerConfig
from proxy.fakes import FakeOpenAI
from proxy.overload import InFlight, LoopLag, ceiling_within, open_files_limit

from .conftest import ServedApp, openai_provider
from .test_saturation import MESSAGES, metric, sdk, streamed_text, wait_for

# --- InFlight: the arithmetic -------------------------------------------------------------


def in_flight(limit: int) -> tuple[InFlight, CollectorRegistry]:
    registry = CollectorRegistry()
    gauge, shed = Gauge("in_flight", "-", registry=registry), Counter("shed", "-", registry=registry)
    return InFlight(limit, gauge, shed), registry


def test_requests_above_the_ceiling_are_refused_and_counted() -> None:
    load, registry = in_flight(3)
    assert [load.enter() for _ in range(5)] == [True, True, True, False, False]
    assert load.count == registry.get_sample_value("in_flight") == 3
    assert registry.get_sample_value("shed_total") == 2
    load.leave()
    assert load.enter() is True


def test_readiness_is_lost_at_the_high_water_mark_and_comes_back_only_below_the_low_one() -> None:
    load, _ = in_flight(10)  # not ready from 9 in flight, ready again at 7
    seen = []
    for _ in range(9):
        load.enter()
        seen.append(load.overloaded)
    assert seen == [False] * 8 + [True]
    load.leave()  # 8: still overloaded (no flapping at the edge)
    assert load.overloaded
    load.leave()  # 7
    assert not load.overloaded
    load.enter()  # 8 again: still ready
    assert not load.overloaded


def test_no_ceiling_never_sheds_nor_loses_readiness() -> None:
    load, registry = in_flight(0)
    assert all(load.enter() for _ in range(10_000))
    assert not load.overloaded and registry.get_sample_value("shed_total") == 0


def test_lowering_the_ceiling_to_none_clears_overload() -> None:
    load, _ = in_flight(1)
    load.enter()
    assert load.overloaded
    load.configure(0)
    assert not load.overloaded


# --- LoopLag --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_lag_monitor_sees_a_stalled_loop_and_forgets_it_after_its_window() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(Histogram("lag", "-", buckets=(0.1, 0.5, 1.0), registry=registry), interval=0.02, window=0.3)
    lag.start()
    try:
        await asyncio.sleep(0.1)
        assert lag.recent() < 0.5
        time.sleep(0.6)  # noqa: ASYNC251 - the stall under test: a blocking call, a CPU-bound burst
        assert lag.recent() >= 0.5, "a sample already overdue counts before the timer has run"
        await asyncio.sleep(0.05)
        assert lag.recent() >= 0.5
        samples, short = registry.get_sample_value("lag_count"), registry.get_sample_value("lag_bucket", {"le": "0.5"})
        assert samples is not None and short is not None and samples - short == 1, "one sample saw the stall"
        await asyncio.sleep(0.8)  # two windows later, the stall is forgotten
        assert lag.recent() < 0.5
    finally:
        lag.stop()


# --- shedding, end to end ---------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def test_a_full_worker_refuses_new_requests_at_once_and_the_streams_in_flight_finish(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy = serve(
        {
            "providers": {"cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
            "server": {"max_in_flight": 2},
        }
    )
    cloud.set_fault("slow", first_token_delay=1.0, token_delay=0.3, times=2)
    streams = [pool.submit(streamed_text, proxy, "default") for _ in range(2)]
    wait_for(lambda: cloud.request_count >= 2, "both streams to reach the cloud")

    with sdk(proxy) as client, pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="default", messages=MESSAGES, stream=True)
    assert not any(s.done() for s in streams), "the refusal waited for a stream in flight"
    error = refused.value
    assert (error.status_code, error.response.headers["retry-after"]) == (503, "1")
    body = error.response.json()["error"]
    assert (body["type"], body["code"]) == ("server_error", "server_overloaded")
    assert "2 requests in flight" in body["message"]
    assert cloud.request_count == 2, "a refused request must cost no provider anything"

    ready = httpx.get(proxy.url + "/readyz", timeout=10)
    assert ready.status_code == 503, ready.text
    assert ready.json()["ready"] is False and ready.json()["reason"].startswith("overloaded: 2 requests in flight")
    assert ready.json()["load"]["in_flight"] == 2
    assert metric(proxy, "fallback_proxy_in_flight") == 2

    for stream in streams:
        assert stream.result(timeout=30)[0] == "Hello from cloud."
    wait_for(lambda: httpx.get(proxy.url + "/readyz", timeout=10).status_code == 200, "ready again")
    assert metric(proxy, "fallback_proxy_shed_total") == 1
    assert metric(proxy, "fallback_proxy_in_flight") == 0
    assert streamed_text(proxy, "default")[0] == "Hello from cloud."


def test_non_proxied_routes_are_never_shed(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, pool: ThreadPoolExecutor
) -> None:
    proxy = serve(
        {
            "providers": {"cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
            "server": {"max_in_flight": 1},
        }
    )
    cloud.set_fault("slow", first_token_delay=1.0, times=1)
    stream = pool.submit(streamed_text, proxy, "default")
    wait_for(lambda: cloud.request_count >= 1, "the stream to reach the cloud")
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/v1/models").status_code == 200
        assert http.get("/metrics").status_code == 200
        unknown = http.post("/v1/unknown", json={})
        assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "server_overloaded"
    assert stream.result(timeout=30)[0] == "Hello from cloud."


def test_readyz_reports_the_load_when_ready(serve: Callable[..., ServedApp], cloud: FakeOpenAI) -> None:
    proxy = serve({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    ready = httpx.get(proxy.url + "/readyz", timeout=10)
    load: dict[str, Any] = ready.json()["load"]
    assert ready.status_code == 200 and "reason" not in ready.json()
    expected = ceiling_within(ServerConfig().max_in_flight, open_files_limit())
    assert load["in_flight"] == 0 and load["max_in_flight"] == expected > 0
    assert load["overloaded"] is False
    assert 0 <= load["event_loop_lag_seconds"] < 5


def test_the_ceiling_fits_the_open_files_limit() -> None:
    assert ceiling_within(4000, 20_000) == 4000
    assert ceiling_within(4000, 1024) == 384  # (1,024 - 256 spare) / 2 per request
    assert ceiling_within(0, 1024) == 384  # no ceiling of its own: the descriptors still bound it
    assert ceiling_within(1500, -1) == 1500  # no limit known


def test_a_ceiling_the_open_files_limit_cannot_carry_is_lowered_and_said(
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past its open-files limit a worker could not open a provider's connection, and
    that would count as the provider's failure: it refuses the request instead."""
    monkeypatch.setattr("proxy.service.open_files_limit", lambda: 1024)
    proxy = serve({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    load = httpx.get(proxy.url + "/readyz", timeout=10).json()["load"]
    assert load["max_in_flight"] == 384
    lowered = [r.getMessage() for r in caplog.records if "max_in_flight_lowered" in r.getMessage()]
    assert lowered and '"open_files_limit":1024' in lowered[0] and '"configured":4000' in lowered[0], lowered
