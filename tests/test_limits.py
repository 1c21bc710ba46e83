"""Client limits, hashed keys and size caps, through the proxy."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, build_config, openai_provider

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
KEY = "team-key-123"


def make(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, **extra: Any) -> ServedApp:
    return serve(
        {
            "auth": {"keys": ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]},
            "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
            "routes": {"default": ["cloud", "backup"]},
            **extra,
        }
    )


def post(proxy: ServedApp, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/chat/completions",
        json=body or {"model": "default", "messages": MESSAGES},
        headers={"authorization": f"Bearer {KEY}", **headers},
        timeout=10,
    )


def test_hashed_keys_are_accepted_and_the_hash_itself_is_not(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    proxy = make(serve, cloud, backup)
    assert post(proxy).status_code == 200
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    assert post(proxy, authorization=f"Bearer sha256:{digest}").status_code == 401


def test_requests_per_minute_per_key(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    proxy = make(serve, cloud, backup, limits={"requests_per_minute": 3})
    assert [post(proxy).status_code for _ in range(3)] == [200, 200, 200]
    limited = post(proxy)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert cloud.request_count == 3


def test_concurrent_streams_per_key(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    proxy = make(serve, cloud, backup, limits={"concurrent_streams": 1})
    cloud.set_fault("slow", token_delay=0.2)
    done = threading.Event()

    def long_stream() -> None:
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0) as sdk:
            list(sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True))
        done.set()

    reader = threading.Thread(target=long_stream)
    reader.start()
    deadline = time.monotonic() + 5
    while cloud.request_count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = post(proxy, {"model": "default", "messages": MESSAGES, "stream": True})
    assert second.status_code == 429 and "streams" in second.json()["error"]["message"]
    assert post(proxy).status_code == 200  # plain requests are not streams
    reader.join(timeout=10)
    assert done.is_set()
    # The lease is given back as the stream ends, which the client may see a moment earlier.
    deadline = time.monotonic() + 5
    while (again := post(proxy, {"model": "default", "messages": MESSAGES, "stream": True})).status_code == 429:
        assert time.monotonic() < deadline, "the ended stream's lease was never given back"
        time.sleep(0.02)
    assert again.status_code == 200


def test_too_many_messages_and_headers(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    proxy = make(serve, cloud, backup, limits={"max_messages": 5, "max_header_bytes": 2048})
    response = post(proxy, {"model": "default", "messages": MESSAGES * 6})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_messages"
    response = post(proxy, **{"x-padding": "x" * 4000})
    assert response.status_code == 431 and response.json()["error"]["type"] == "invalid_request_error"
    assert cloud.request_count == 0


def test_an_oversized_upstream_answer_is_a_provider_failure(
    serve: Callable[..., ServedApp], backup: FakeOpenAI
) -> None:
    with FakeOpenAI("cloud", reply="word " * 5000) as big:
        proxy = make(serve, big, backup, limits={"max_upstream_bytes": 4096})
        response = post(proxy)
        assert response.status_code == 200
        assert response.headers["x-proxy-fallbacks"] == "cloud=server_error"
        # Streamed, the cap may hit before or after the first token: either way the
        # backup answers (in place of the cloud, or continuing it) and the stream ends well.
        response = post(proxy, {"model": "default", "messages": MESSAGES, "stream": True})
        assert response.status_code == 200
        assert "backup" in response.text and response.text.endswith("data: [DONE]\n\n")


def test_streams_under_both_limits_count_toward_the_rate(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    proxy = make(serve, cloud, backup, limits={"requests_per_minute": 3, "concurrent_streams": 5})
    stream = {"model": "default", "messages": MESSAGES, "stream": True}
    assert [post(proxy, stream).status_code for _ in range(2)] + [post(proxy).status_code] == [200, 200, 200]
    limited = post(proxy, stream)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "requests per minute" in limited.json()["error"]["message"]
    assert cloud.request_count == 3


def test_a_stream_lease_outlives_any_stream_of_the_config() -> None:
    from proxy.limits import LEASE_MARGIN_SECONDS, stream_lease_seconds

    providers = {
        "a": {"model": "openai/x", "api_base": "http://127.0.0.1:9/v1", "timeout": {"total": 100}, "retries": 1},
        "b": {"model": "openai/y", "api_base": "http://127.0.0.1:9/v1", "timeout": {"total": 50}},
    }
    chain = build_config({"providers": providers, "routes": {"default": ["a", "b"]}})
    assert stream_lease_seconds(chain) == 2 * 100 + 50 + LEASE_MARGIN_SECONDS
    budgeted = build_config({"providers": providers, "routes": {"default": {"chain": ["a", "b"], "budget": 30}}})
    # the route's walk ends within 30 s, but a client may name provider "a" alone: 200 s
    assert stream_lease_seconds(budgeted) == 200 + LEASE_MARGIN_SECONDS


def test_client_limits_let_requests_through_when_redis_cannot_answer(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    """The limits protect providers from one key; they are no reason to refuse everyone while
    Redis is down: requests and streams pass, and the failed store calls are counted."""
    from proxy.state import RedisStore

    from .redis_server import free_port

    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", breaker_seconds=0)  # nobody listens
    proxy = serve(
        {
            "auth": {"keys": ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]},
            "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
            "routes": {"default": ["cloud", "backup"]},
            "limits": {"requests_per_minute": 1, "concurrent_streams": 1},
        },
        store=store,
    )
    stream = {"model": "default", "messages": MESSAGES, "stream": True}
    assert [post(proxy).status_code for _ in range(2)] == [200, 200]  # over 1 a minute: not counted
    assert [post(proxy, stream).status_code for _ in range(2)] == [200, 200]
    # Two counts, two lease acquisitions and two releases (the last as its stream ends), each by its name.
    wanted = [
        f'fallback_proxy_store_errors_total{{operation="{operation}"}} 2.0'
        for operation in ("count", "acquire_lease", "release_lease")
    ]
    deadline = time.monotonic() + 5
    while not all(line in (metrics := httpx.get(proxy.url + "/metrics").text) for line in wanted):
        assert time.monotonic() < deadline, f"the failed store calls were not all counted: {metrics}"
        time.sleep(0.02)
