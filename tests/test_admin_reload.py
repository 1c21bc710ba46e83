"""Admin endpoints (status, provider switch, reload) and hot reload of the config file."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from proxy.config import load_config
from proxy.fakes import FakeOpenAI
from proxy.state import RedisStore

from .conftest import ServedApp, openai_provider
from .redis_server import free_port

ADMIN = {"authorization": "Bearer admin-secret"}
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def config_data(cloud: FakeOpenAI, backup: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"admin_key": "admin-secret", "reload_check_seconds": 0.1},
        "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
        "routes": {"default": ["cloud", "backup"]},
        "health": {"probe_interval_seconds": 0},
        **extra,
    }


def answer(proxy: ServedApp) -> httpx.Response:
    response = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "default", "messages": MESSAGES})
    assert response.status_code == 200
    return response


def test_admin_is_off_without_an_admin_key(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    data = config_data(cloud, backup)
    del data["server"]["admin_key"]
    proxy = serve(data)
    response = httpx.get(proxy.url + "/admin/status", headers=ADMIN)
    assert response.status_code == 404 and "admin_key" in response.json()["error"]["message"]


def test_switch_a_provider_off_and_on(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    proxy = serve(config_data(cloud, backup))
    assert httpx.get(proxy.url + "/admin/status", headers={"authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(proxy.url + "/admin/providers/cloud/disable").status_code == 401
    off = httpx.post(proxy.url + "/admin/providers/cloud/disable", headers=ADMIN, json={"reason": "drill 42"})
    assert off.status_code == 200 and off.json()["disabled"] is True
    response = answer(proxy)
    assert response.headers["x-proxy-provider"] == "backup"
    assert response.headers["x-proxy-fallbacks"] == "cloud=unhealthy"
    assert cloud.request_count == 0
    status = httpx.get(proxy.url + "/admin/status", headers=ADMIN).json()
    assert status["providers"]["cloud"]["disabled"] is True and "drill 42" in status["providers"]["cloud"]["reason"]
    assert "admin-secret" not in str(status)
    assert status["store"] == "memory" and status["store_queue"] == {"pending": 0, "replayed": 0, "dropped": 0}
    assert httpx.post(proxy.url + "/admin/providers/cloud/enable", headers=ADMIN).status_code == 200
    assert answer(proxy).headers["x-proxy-provider"] == "cloud"
    assert httpx.post(proxy.url + "/admin/providers/nobody/disable", headers=ADMIN).status_code == 404


def test_config_file_changes_are_reloaded_and_bad_ones_rejected(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(cloud, backup)))
    proxy = serve(load_config(path, environ={}))
    assert answer(proxy).headers["x-proxy-provider"] == "cloud"

    path.write_text(yaml.safe_dump(config_data(cloud, backup, routes={"default": ["backup", "cloud"]})))
    deadline = time.monotonic() + 5
    while answer(proxy).headers["x-proxy-provider"] != "backup" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer(proxy).headers["x-proxy-provider"] == "backup"

    path.write_text("routes: {default: [nobody]}\n")
    _wait_for(lambda: _rejected(proxy) == 1)  # the watch saw the bad file and kept the old config
    assert answer(proxy).headers["x-proxy-provider"] == "backup"  # the old config keeps serving
    rejected = httpx.post(proxy.url + "/admin/reload", headers=ADMIN)
    assert rejected.status_code == 422
    assert any("nobody" in problem for problem in rejected.json()["problems"])
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'fallback_proxy_config_reloads_total{outcome="ok"} 1.0' in metrics
    assert 'fallback_proxy_config_reloads_total{outcome="rejected"}' in metrics


def test_a_stream_in_flight_finishes_on_the_old_config(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    data = config_data(cloud, backup)
    data["server"]["reload_check_seconds"] = 0
    path.write_text(yaml.safe_dump(data))
    proxy = serve(load_config(path, environ={}))
    cloud.set_fault("slow", token_delay=0.15)
    texts: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
            parts = []
            for chunk in sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    first_token.set()
            texts.append("".join(parts))

    reader = threading.Thread(target=stream)
    reader.start()
    # Under way on the old config (a busy CI box took over 10 s to start the thread's SDK client).
    assert first_token.wait(timeout=60)
    path.write_text(yaml.safe_dump({**data, "routes": {"default": ["backup"]}}))
    reloaded = httpx.post(proxy.url + "/admin/reload", headers=ADMIN)
    assert reloaded.json()["reloaded"] is True
    reader.join(timeout=30)
    assert texts == ["Hello from cloud."]
    assert answer(proxy).headers["x-proxy-provider"] == "backup"


def test_status_and_metrics_show_the_writes_waiting_for_the_store(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", breaker_seconds=0)  # nobody listens
    data = config_data(cloud, backup)
    data["providers"]["cloud"] = openai_provider(cloud.url, quota={"requests_per_day": 10})
    proxy = serve(data, store=store)
    # The admission fails closed; it may have counted, so its refund waits for Redis.
    assert answer(proxy).headers["x-proxy-fallbacks"] == "cloud=quota_exhausted"
    status = httpx.get(proxy.url + "/admin/status", headers=ADMIN).json()
    assert status["store"] == "redis" and status["store_queue"] == {"pending": 1, "replayed": 0, "dropped": 0}
    metrics = httpx.get(proxy.url + "/metrics").text
    assert "\nfallback_proxy_store_pending 1.0\n" in metrics
    assert "\nfallback_proxy_store_dropped_total 0.0\n" in metrics


def _rejected(proxy: ServedApp) -> float:
    for line in httpx.get(proxy.url + "/metrics").text.splitlines():
        if line.startswith('fallback_proxy_config_reloads_total{outcome="rejected"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.02)


def test_a_file_caught_half_written_is_no_bad_edit(
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file truncated and not yet filled in (what a non-atomic write shows a
    reader for a moment) is not judged: no rejection, no log line, no alert; the
    content that follows is."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(cloud, backup)))  # checked every 0.1 s
    proxy = serve(load_config(path, environ={}))
    path.write_text("")  # caught between the truncate and the write
    time.sleep(1.0)  # ten checks
    assert _rejected(proxy) == 0
    assert not [r for r in caplog.records if "config_reload_failed" in r.getMessage()]
    assert answer(proxy).headers["x-proxy-provider"] == "cloud"  # the config in force is untouched
    path.write_text(yaml.safe_dump(config_data(cloud, backup, routes={"default": ["backup"]})))
    _wait_for(lambda: answer(proxy).headers["x-proxy-provider"] == "backup")
    assert _rejected(proxy) == 0


def test_an_invalid_file_left_in_place_is_rejected_once_per_change(
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "config.yaml"
    good = yaml.safe_dump(config_data(cloud, backup))  # checked every 0.1 s
    path.write_text(good)
    proxy = serve(load_config(path, environ={}))

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if '"event":"config_reload_failed"' in r.getMessage()]

    path.write_text("routes: {default: [nobody]}\n")
    _wait_for(lambda: _rejected(proxy) == 1)
    # The interval is the point: ten more checks of the same bad content reject nothing new.
    time.sleep(1.0)
    assert _rejected(proxy) == 1 and len(failures()) == 1
    assert answer(proxy).headers["x-proxy-provider"] == "cloud"  # the old config keeps serving

    path.write_text("routes: {default: [somebody]}\n")  # another bad edit: rejected once more
    _wait_for(lambda: _rejected(proxy) == 2)
    time.sleep(1.0)  # as above: ten more checks, nothing new
    assert _rejected(proxy) == 2 and len(failures()) == 2 and "somebody" in failures()[-1]

    explicit = httpx.post(proxy.url + "/admin/reload", headers=ADMIN)  # asked for: always tried, always answered
    assert explicit.status_code == 422 and any("somebody" in p for p in explicit.json()["problems"])
    time.sleep(0.5)  # the interval is the point: five more checks by the watch, nothing new
    assert _rejected(proxy) == 3  # the explicit one; the watch still leaves this content alone

    path.write_text(yaml.safe_dump(config_data(cloud, backup, routes={"default": ["backup"]})))
    _wait_for(lambda: answer(proxy).headers["x-proxy-provider"] == "backup")
    path.write_text("routes: {default: [nobody]}\n")  # the first bad content again, after a good one
    _wait_for(lambda: _rejected(proxy) == 4)
    time.sleep(0.5)  # the interval is the point: five more checks, nothing new
    assert _rejected(proxy) == 4
