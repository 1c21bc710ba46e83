"""Operator alerts reach a real webhook receiver when the proxy fails over."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider


@pytest.fixture
def receiver(serve_asgi: Callable[[Any], ServedApp]) -> tuple[ServedApp, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(await request.json())
        return JSONResponse({"ok": True})

    return serve_asgi(Starlette(routes=[Route("/hook/{token}", hook, methods=["POST"])])), received


def test_failover_and_breaker_alerts_are_delivered_once_per_window(
    serve: Callable[..., ServedApp],
    receiver: tuple[ServedApp, list[dict[str, Any]]],
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
) -> None:
    hook, received = receiver
    proxy = serve(
        {
            "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
            "routes": {"default": ["cloud", "backup"]},
            "health": {"failure_threshold": 2},
            "alerts": {"dedupe_seconds": 60, "webhooks": [{"url": hook.url + "/hook/SECRET-TOKEN"}]},
        }
    )
    cloud.set_fault("status", status=503)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(4):
            sdk.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 5
    while {"failover", "breaker_open"} - {r["event"] for r in received} and time.monotonic() < deadline:
        time.sleep(0.02)
    kinds = [r["event"] for r in received]
    assert kinds.count("failover") == 1 and kinds.count("breaker_open") == 1
    failover = next(r for r in received if r["event"] == "failover")
    assert (failover["from_provider"], failover["to_provider"], failover["reason"]) == (
        "cloud",
        "backup",
        "server_error",
    )


def test_a_provider_disabled_for_want_of_its_key_raises_no_failover_alert(
    serve: Callable[..., ServedApp],
    receiver: tuple[ServedApp, list[dict[str, Any]]],
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
) -> None:
    """A route whose first provider has no key is working as configured: every
    request passes over it, and no operator is paged for it."""
    hook, received = receiver
    keyless = {**openai_provider(cloud.url), "api_key": "", "needs": ["api_key"]}
    proxy = serve(
        {
            "providers": {
                "keyless": keyless,
                "cloud": openai_provider(cloud.url),
                "backup": openai_provider(backup.url),
            },
            "routes": {"default": ["keyless", "backup"], "failing": ["cloud", "backup"]},
            "alerts": {"dedupe_seconds": 0, "webhooks": [{"url": hook.url + "/hook/SECRET-TOKEN"}]},
        }
    )
    cloud.set_fault("status", status=503)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(3):
            sdk.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        sdk.chat.completions.create(model="failing", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:  # the real failover's alert is the sign they are out
        time.sleep(0.02)
    failovers = [r for r in received if r["event"] == "failover"]
    assert [(r["from_provider"], r["route"]) for r in failovers] == [("cloud", "failing")]
