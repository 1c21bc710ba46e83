"""Health, recovery and daily quotas end to end: the openai SDK against one
or two proxy replicas sharing a real Redis, with fake providers."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from proxy.fakes import FakeOllama, FakeOpenAI

from .conftest import ServedApp, openai_provider
from .redis_server import RedisServer

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


def ask(proxy: ServedApp, model: str = "default") -> tuple[str, dict[str, str]]:
    """One request through the SDK: (provider that answered, headers)."""
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        raw.parse()
        return raw.headers["x-proxy-provider"], dict(raw.headers)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def shared_redis() -> str:
    """The machine's Redis, with a key prefix of this test's own."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/0"


def test_recovery_returns_to_the_local_model(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed exercise: stop the local model, answers come from the cloud;
    start it again, the next calls go local (within one probe interval)."""
    caplog.set_level(logging.INFO, logger="fallback_proxy.events")
    with FakeOllama("local") as local:
        proxy = serve(
            {
                "providers": {
                    "local": {"model": "openai/qwen2.5:7b", "api_base": local.url + "/v1", "local": True},
                    "cloud": openai_provider(cloud.url),
                },
                "routes": {"default": ["local", "cloud"]},
                "health": {"probe_interval_seconds": 0.2, "failure_threshold": 1, "cooldown_seconds": 600},
            }
        )
        assert ask(proxy)[0] == "local"
        local.stop()
        provider, headers = ask(proxy)
        # Whichever sees the stopped daemon first, a request or a probe, opens the breaker.
        assert provider == "cloud" and headers["x-proxy-fallbacks"] in {"local=connection_error", "local=unhealthy"}
        provider, headers = ask(proxy)
        assert headers["x-proxy-fallbacks"] == "local=unhealthy"  # breaker open: not even tried
        local.start()
        assert wait_until(lambda: ask(proxy)[0] == "local", timeout=3)
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'fallback_proxy_recoveries_total{provider="local"} 1.0' in metrics
    events = [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "fallback_proxy.events"]
    assert "breaker_open" in events and "recovered" in events


def test_replicas_share_health_through_redis(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, shared_redis: str
) -> None:
    config = {
        "redis": {"url": shared_redis, "prefix": f"t{uuid.uuid4().hex[:8]}"},
        "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
        "routes": {"default": ["cloud", "backup"]},
        "health": {"failure_threshold": 1, "cooldown_seconds": 600},
    }
    one, two = serve(config), serve(config)
    cloud.set_fault("status", status=503)
    assert ask(one)[1]["x-proxy-fallbacks"] == "cloud=server_error"
    calls = cloud.request_count

    def two_sees_breaker() -> bool:
        health = httpx.get(two.url + "/readyz").json()["health"]["cloud"]
        return bool(health["breaker"] == "open")

    assert wait_until(two_sees_breaker, timeout=3)
    provider, headers = ask(two)
    assert provider == "backup" and headers["x-proxy-fallbacks"] == "cloud=unhealthy"
    assert cloud.request_count == calls  # the second replica never called the failing cloud


def test_daily_quota_is_exact_across_replicas_under_load(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, shared_redis: str
) -> None:
    config = {
        # A generous timeout: this test is about atomicity, not about a slow Redis.
        "redis": {"url": shared_redis, "prefix": f"t{uuid.uuid4().hex[:8]}", "timeout_ms": 2000},
        "providers": {
            "cloud": openai_provider(cloud.url, quota={"requests_per_day": 7}),
            "backup": openai_provider(backup.url),
        },
        "routes": {"default": ["cloud", "backup"]},
    }
    replicas = [serve(config), serve(config)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda i: ask(replicas[i % 2]), range(24)))
    by_cloud = [h for p, h in answers if p == "cloud"]
    by_backup = [h for p, h in answers if p == "backup"]
    assert len(by_cloud) == 7 and cloud.request_count == 7
    assert len(by_backup) == 17
    assert all(h["x-proxy-fallbacks"] == "cloud=quota_exhausted" for h in by_backup)


def test_token_quota_counts_real_usage_of_streams(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    """In-process state (no Redis): the stream's real usage is counted even
    though the client did not ask for it, and the client never sees it."""
    proxy = serve(
        {
            "providers": {
                "cloud": openai_provider(cloud.url, quota={"tokens_per_day": 1400}),
                "backup": openai_provider(backup.url),
            },
            "routes": {"default": ["cloud", "backup"]},
        }
    )
    answered = []
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(3):
            with sdk.chat.completions.with_streaming_response.create(
                model="default", messages=MESSAGES, stream=True, max_tokens=600
            ) as response:
                chunks = list(response.parse())
                answered.append(response.headers["x-proxy-provider"])
            assert all(c.usage is None for c in chunks)
    assert cloud.requests[0].body["stream_options"] == {"include_usage": True}
    # Each call is admitted on an estimate (~600 + prompt) and settled to its real
    # usage (a dozen tokens): a third call fits only because usage was settled.
    assert answered == ["cloud", "cloud", "cloud"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_quota_gate_fails_closed_when_redis_dies(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    redis = RedisServer().start()
    try:
        proxy = serve(
            {
                "redis": {"url": redis.url, "breaker_seconds": 0.5},
                "providers": {
                    "cloud": openai_provider(cloud.url, quota={"requests_per_day": 1000}),
                    "backup": openai_provider(backup.url),
                },
                "routes": {"default": ["cloud", "backup"]},
            }
        )
        assert ask(proxy)[0] == "cloud"
        redis.kill()
        calls = cloud.request_count
        started = time.perf_counter()
        provider, headers = ask(proxy)
        elapsed = time.perf_counter() - started
        assert provider == "backup" and headers["x-proxy-fallbacks"] == "cloud=quota_exhausted"
        assert cloud.request_count == calls  # fail closed: the quota'd provider was not called
        assert elapsed < 1.0
        ready = httpx.get(proxy.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["store"]["status"].startswith("unavailable")
        assert 'fallback_proxy_quota_fail_closed_total{provider="cloud"}' in httpx.get(proxy.url + "/metrics").text
        redis.start(same_port=True)
        assert wait_until(lambda: ask(proxy)[0] == "cloud", timeout=5)
    finally:
        redis.stop()


def test_slow_provider_is_demoted_to_the_end_of_the_walk(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    proxy = serve(
        {
            "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
            "routes": {"default": ["cloud", "backup"]},
            "health": {"slow_ttft_seconds": 0.1},
        }
    )
    cloud.set_fault("slow", first_token_delay=0.3)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from cloud."
    health = httpx.get(proxy.url + "/readyz").json()["health"]["cloud"]
    assert health["state"] == "slow"
    assert ask(proxy)[0] == "backup"  # the slow cloud is now tried after the backup
    backup.set_fault("status", status=503)
    provider, headers = ask(proxy)
    assert provider == "cloud" and headers["x-proxy-fallbacks"] == "backup=server_error"
