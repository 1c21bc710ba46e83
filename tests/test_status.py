"""The status page (`GET /status`) and `GET /admin/providers`: the page built
in-process from plain values (graph, health, quota, last errors, failovers,
escaping), then served: the admin key as HTTP Basic password, off without one,
and what a real fallback shows. The real-browser test is test_status_browser.py."""

from __future__ import annotations

import base64
import html
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from proxy.config import parse_config
from proxy.errors import Attempt
from proxy.fakes import FakeOpenAI
from proxy.health import Breaker, Health, ProviderHealth
from proxy.observe import Failover, LastError, RecentFailovers, RequestRecord
from proxy.openapi import openapi_spec
from proxy.status import ProviderView, QuotaToday, StatusView, Usage, refresh_seconds, render

from .conftest import ServedApp, build_config, openai_provider
from .test_openapi import assert_valid

ADMIN_KEY = "admin-secret"
XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
NOW = 1_800_000_000.0


def page_config() -> Any:
    return parse_config(
        {
            "providers": {
                "openai-4o": {"model": "openai/gpt-4o", "api_key": "sk-upstream", "quota": {"requests_per_day": 100}},
                "claude": {"model": "anthropic/claude-x", "api_key": "sk-ant-test"},
                "local-qwen": {"model": "ollama_chat/qwen2.5:7b", "api_base": "http://localhost:11434", "local": True},
            },
            "routes": {
                "default": ["openai-4o", "claude", "local-qwen"],
                "coding": {
                    "first": "openai-4o",
                    "on": {
                        "openai-4o": {"rate_limited": "claude", "default": "local-qwen"},
                        "claude": {"default": "local-qwen"},
                    },
                },
            },
        },
        environ={},
        source="/etc/fallback-proxy/config.yaml",
    )


def view(**overrides: Any) -> StatusView:
    config = page_config()
    offline = ProviderHealth(
        state=Health.OFFLINE, breaker=Breaker.OPEN, failures=3, reason="server_error: 3 consecutive failures"
    )
    providers = {
        "openai-4o": ProviderView(
            "openai-4o",
            False,
            offline,
            QuotaToday("2026-12-01", Usage(40, 100), Usage(1200, None)),
            LastError(NOW - 5, "server_error", f"HTTP 500: {XSS}"),
        ),
        "claude": ProviderView("claude", False, ProviderHealth(), None, None),
        "local-qwen": ProviderView("local-qwen", True, ProviderHealth(ttft=0.25), None, None),
    }
    failover = Failover(
        NOW - 3,
        "req-1",
        "default",
        (Attempt("openai-4o", "server_error", 10.0, f"HTTP 500: {XSS}"), Attempt("claude", "unhealthy", 0.0)),
        "local-qwen",
        200,
        "ok",
    )
    fields: dict[str, Any] = {
        "config": config,
        "providers": providers,
        "failovers": [failover],
        "store": "memory",
        "config_sha256": "ab" * 32,
        "now": NOW,
    }
    return StatusView(**{**fields, **overrides})


def text_of(page: str) -> str:
    """The page's visible text, roughly: tags out, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_every_route_shows_its_nodes_in_walk_order_with_their_edges() -> None:
    page = render(view())
    coding = page[page.index('data-route="coding"') :]
    nodes = re.findall(r'<tr data-node="([^"]+)">', coding)
    assert nodes == ["openai-4o", "local-qwen", "claude"]  # depth first, the default edge first
    assert "default → local-qwen; rate_limited → claude" in html.unescape(coding)
    default = page[page.index('data-route="default"') : page.index('data-route="coding"')]
    assert re.findall(r'<tr data-node="([^"]+)">', default) == ["openai-4o", "claude", "local-qwen"]
    assert "end of the walk" in default


def test_each_node_shows_health_breaker_quota_and_last_error() -> None:
    page = render(view())
    row = re.search(r'<tr data-provider="openai-4o">.*?</tr>', page)
    assert row is not None
    cells = text_of(row.group(0))
    assert "OFFLINE" in cells and "open" in cells and "server_error: 3 consecutive failures" in cells
    assert "requests: 40 used, 60 left of 100" in cells and "tokens: 1,200 used" in cells
    assert "5s ago" in cells and "server_error" in cells
    assert 'class="state state-offline"' in row.group(0)
    local = re.search(r'<tr data-provider="local-qwen">.*?</tr>', page)
    assert (
        local is not None and "HEALTHY" in local.group(0) and "local" in local.group(0) and "0.25 s" in local.group(0)
    )


def test_the_last_failovers_name_route_from_to_and_why() -> None:
    page = render(view())
    section = " ".join(text_of(page[page.index('id="failovers"') :]).split())
    assert "Last failovers (1)" in section
    assert "openai-4o → local-qwen" in section
    assert "openai-4o server_error : HTTP 500:" in section
    assert "claude unhealthy" in section
    assert "No failovers" in render(view(failovers=[]))


def test_provider_errors_and_names_are_escaped() -> None:
    page = render(view())
    assert "<script>" not in page and "<img" not in page
    assert html.escape(XSS, quote=True) in page
    assert XSS in text_of(page)  # shown, as text


def test_no_script_and_a_refresh_that_can_be_turned_off() -> None:
    page = render(view())
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "http-equiv" not in render(view(refresh_seconds=0))
    assert refresh_seconds(None) == 5 and refresh_seconds("0") == 0 and refresh_seconds("30") == 30
    assert refresh_seconds("-1") == 5 and refresh_seconds("soon") == 5 and refresh_seconds("99999") == 3600


def test_no_key_of_the_config_on_the_page() -> None:
    page = render(view())
    assert "sk-upstream" not in page and "sk-ant-test" not in page
    assert "/etc/fallback-proxy/config.yaml" in page and "abababababab" in page


# -- the ring of failovers ---------------------------------------------------------------


def finished(
    request_id: str, *attempts: tuple[str, str, str], provider: str | None, status: int = 200
) -> RequestRecord:
    record = RequestRecord(request_id, "default", stream=False)
    for name, outcome, detail in attempts:
        record.attempt(name, outcome, 1.0, detail, "SomeError: technical" if outcome != "ok" else "")
    record.provider, record.status = provider, status
    return record


def test_the_ring_is_bounded_newest_first_and_keeps_each_providers_last_error() -> None:
    recent = RecentFailovers(size=3)
    for n in range(5):
        recent.add(finished(f"r{n}", ("a", "timeout", f"slow {n}"), ("b", "ok", ""), provider="b"), NOW + n)
    assert [f.request_id for f in recent.latest()] == ["r4", "r3", "r2"]
    assert recent.last_errors["a"] == LastError(NOW + 4, "timeout", "slow 4")
    recent.add(finished("skip", ("a", "quota_exhausted", "spent"), ("b", "ok", ""), provider="b"), NOW + 9)
    assert recent.latest(1)[0].request_id == "skip"
    assert recent.last_errors["a"].detail == "slow 4"  # a skip is not the provider's error
    recent.add(finished("400", ("a", "client_error", "bad temperature"), provider=None, status=400), NOW + 10)
    assert recent.latest(1)[0].request_id == "skip"  # the client's own error is not a failover
    recent.add(finished("503", ("a", "timeout", "x"), ("b", "server_error", "y"), provider=None, status=503), NOW + 11)
    latest = recent.latest(1)[0]
    assert (latest.answered_by, latest.status, [a.provider for a in latest.failed]) == (None, 503, ["a", "b"])


# -- served ----------------------------------------------------------------------------------


def basic(password: str, user: str = "ops") -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def xss_upstream(serve_asgi: Callable[..., ServedApp]) -> Iterator[ServedApp]:
    """A provider that fails every call with an error text that looks like markup."""

    async def fail(request: Request) -> Response:
        return PlainTextResponse(XSS, status_code=500)

    async def models(request: Request) -> Response:
        return PlainTextResponse("{}", media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", fail, methods=["POST"]), Route("/v1/models", models)])
    yield serve_asgi(app)


def proxy_config(evil: ServedApp, backup: FakeOpenAI, **server: Any) -> dict[str, Any]:
    return {
        "server": {"admin_key": ADMIN_KEY, **server},
        "providers": {
            "evil": openai_provider(evil.url, quota={"requests_per_day": 10}),
            "backup": openai_provider(backup.url),
        },
        "routes": {"default": ["evil", "backup"]},
        "health": {"failure_threshold": 2},
    }


def ask(proxy: ServedApp) -> httpx.Response:
    messages = [{"role": "user", "content": "hi"}]
    return httpx.post(proxy.url + "/v1/chat/completions", json={"model": "default", "messages": messages}, timeout=30)


def test_the_page_is_off_without_an_admin_key(serve: Callable[..., ServedApp], cloud: FakeOpenAI) -> None:
    proxy = serve({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    response = httpx.get(proxy.url + "/status", headers=basic(ADMIN_KEY))
    assert response.status_code == 404 and "admin_key" in response.json()["error"]["message"]
    assert httpx.get(proxy.url + "/admin/providers").status_code == 404


def test_a_browser_is_asked_for_the_admin_key(
    serve: Callable[..., ServedApp], xss_upstream: ServedApp, backup: FakeOpenAI
) -> None:
    proxy = serve(build_config(proxy_config(xss_upstream, backup)))
    for headers in ({}, basic("wrong"), basic(ADMIN_KEY + "x"), {"authorization": "Basic !!!"}):
        refused = httpx.get(proxy.url + "/status", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"] == 'Basic realm="fallback-proxy status", charset="UTF-8"'
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(proxy.url + "/status", headers={"authorization": "Bearer nope"}).status_code == 401
    for headers in (basic(ADMIN_KEY), basic(ADMIN_KEY, user=""), {"authorization": f"Bearer {ADMIN_KEY}"}):
        page = httpx.get(proxy.url + "/status", headers=headers)
        assert page.status_code == 200, headers
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src" not in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"


def test_a_real_fallback_shows_on_the_page_and_in_admin_providers(
    serve: Callable[..., ServedApp], xss_upstream: ServedApp, backup: FakeOpenAI
) -> None:
    proxy = serve(build_config(proxy_config(xss_upstream, backup)))
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(2):
            answer = sdk.chat.completions.with_raw_response.create(
                model="default", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.headers["x-proxy-provider"] == "backup"
    page = httpx.get(proxy.url + "/status?refresh=0", headers=basic(ADMIN_KEY)).text
    assert "<script>" not in page and "<img" not in page
    row = re.search(r'<tr data-provider="evil">.*?</tr>', page)
    assert row is not None, page
    assert "OFFLINE" in row.group(0) and "breaker-open" in row.group(0)
    assert XSS in text_of(row.group(0)) and "requests: 2 used, 8 left of 10" in text_of(row.group(0))
    failovers = text_of(page[page.index('id="failovers"') :])
    assert failovers.count("evil → backup") == 2
    assert "No failovers" not in failovers

    listing = httpx.get(proxy.url + "/admin/providers", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert listing.status_code == 200
    assert_valid(openapi_spec(), "AdminProviders", listing.json())
    evil = listing.json()["providers"]["evil"]
    assert (evil["state"], evil["breaker"], evil["disabled"]) == ("offline", "open", False)
    assert evil["last_error"]["outcome"] == "server_error" and XSS in evil["last_error"]["detail"]
    assert evil["quota"]["requests"] == {"used": 2, "limit": 10, "left": 8}
    assert evil["quota"]["tokens"] == {"used": 0, "limit": None, "left": None}
    fine = listing.json()["providers"]["backup"]
    assert (fine["state"], fine["breaker"], fine["last_error"], fine["quota"]) == ("healthy", "closed", None, None)
    assert httpx.get(proxy.url + "/admin/providers", headers={"authorization": "Bearer nope"}).status_code == 401
    # the old endpoint stays
    assert httpx.get(proxy.url + "/admin/status", headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_the_page_answers_quickly_with_a_full_ring(
    serve: Callable[..., ServedApp], xss_upstream: ServedApp, backup: FakeOpenAI
) -> None:
    proxy = serve(build_config(proxy_config(xss_upstream, backup)))
    recent: RecentFailovers = proxy.scan.app.state.service.observer.recent  # type: ignore[attr-defined]
    for n in range(200):
        recent.add(finished(f"r{n}", ("evil", "timeout", XSS), ("backup", "ok", ""), provider="backup"), NOW)
    started = time.perf_counter()
    page = httpx.get(proxy.url + "/status", headers=basic(ADMIN_KEY))
    assert page.status_code == 200 and time.perf_counter() - started < 5
    assert "Last failovers (50)" in page.text and "<script>" not in page.text
