"""Browser clients (CORS): a web page on another origin may call the proxy the
way it calls OpenAI's API (which answers `access-control-allow-origin: *`):
the preflight echoes the headers the SDKs send, the answer exposes the
`x-proxy-*` headers to the page's script. Every origin when keys are set; none
for a keyless proxy (any page the user opens could spend its providers'
quotas); `server.cors_origins` chooses. Real sockets, the proxy served by
uvicorn, a fake provider."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.config import ConfigError, load_config, parse_config
from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider

KEY = "team-key"
PAGE = "https://chat.example.com"
BODY = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
SDK_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-lang, openai-beta"


def proxy_with(serve: Callable[..., ServedApp], cloud: FakeOpenAI, **sections: Any) -> ServedApp:
    return serve({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}, **sections})


def preflight(http: httpx.Client, proxy: ServedApp, origin: str = PAGE) -> httpx.Response:
    return http.options(
        proxy.url + "/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": SDK_HEADERS,
        },
    )


def test_with_keys_any_page_may_call_and_read_who_answered(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = proxy_with(serve, cloud, auth={"keys": [KEY]})
    allowed = preflight(http, proxy)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "*"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert allowed.headers["access-control-allow-headers"].lower() == SDK_HEADERS
    assert int(allowed.headers["access-control-max-age"]) > 0

    answer = http.post(
        proxy.url + "/v1/chat/completions", json=BODY, headers={"origin": PAGE, "authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from cloud."
    assert answer.headers["access-control-allow-origin"] == "*"
    exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].lower().split(",")}
    assert {"x-request-id", "x-proxy-provider", "x-proxy-fallbacks", "retry-after"} <= exposed
    assert answer.headers["x-proxy-provider"] == "cloud"


def test_a_streamed_answer_to_a_page_carries_the_cors_headers(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = proxy_with(serve, cloud, auth={"keys": [KEY]})
    with http.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={**BODY, "stream": True},
        headers={"origin": PAGE, "authorization": f"Bearer {KEY}"},
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "*"
        assert "x-proxy-provider" in answer.headers["access-control-expose-headers"]
        text = answer.read().decode()
    assert text.rstrip().endswith("data: [DONE]")


def test_errors_reach_the_page_too(serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client) -> None:
    """A wrong key or an unknown model: the page's script can read the OpenAI-shaped error."""
    proxy = proxy_with(serve, cloud, auth={"keys": [KEY]})
    refused = http.post(
        proxy.url + "/v1/chat/completions", json=BODY, headers={"origin": PAGE, "authorization": "Bearer wrong"}
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "*"
    assert refused.json()["error"]["code"] == "invalid_api_key"
    models = http.get(proxy.url + "/v1/models", headers={"origin": PAGE, "authorization": f"Bearer {KEY}"})
    assert models.status_code == 200
    assert models.headers["access-control-allow-origin"] == "*"


def test_a_keyless_proxy_answers_no_page_of_another_origin(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = proxy_with(serve, cloud)
    refused = preflight(http, proxy)
    assert refused.status_code == 405  # no CORS: the route knows no OPTIONS
    assert "access-control-allow-origin" not in refused.headers
    answer = http.post(proxy.url + "/v1/chat/completions", json=BODY, headers={"origin": PAGE})
    assert answer.status_code == 200  # a client that is no browser is not concerned
    assert "access-control-allow-origin" not in answer.headers  # a browser would not let the page read it


def test_named_origins_only(serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client) -> None:
    proxy = proxy_with(serve, cloud, server={"cors_origins": [PAGE, "http://localhost:3000"]})
    allowed = preflight(http, proxy, "http://localhost:3000")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    answer = http.post(proxy.url + "/v1/chat/completions", json=BODY, headers={"origin": PAGE})
    assert answer.headers["access-control-allow-origin"] == PAGE
    assert "origin" in answer.headers["vary"].lower()

    other = "https://evil.example.net"
    assert "access-control-allow-origin" not in preflight(http, proxy, other).headers
    answer = http.post(proxy.url + "/v1/chat/completions", json=BODY, headers={"origin": other})
    assert "access-control-allow-origin" not in answer.headers


def test_an_empty_list_turns_cors_off_even_with_keys(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = proxy_with(serve, cloud, auth={"keys": [KEY]}, server={"cors_origins": []})
    assert "access-control-allow-origin" not in preflight(http, proxy).headers


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["https://chat.example.com/"], "no trailing slash"),
        (["chat.example.com"], "scheme://host[:port]"),
        ([3], "expected an origin"),
        ({"a": 1}, 'expected "*" or a list of origins'),
    ],
)
def test_a_bad_origin_is_a_config_error_naming_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "server": {"cors_origins": value},
                "providers": {"p": {"model": "openai/m", "api_base": "http://127.0.0.1:1/v1"}},
                "routes": {"default": ["p"]},
            },
            environ={},
        )
    problems = "\n".join(caught.value.problems)
    assert "server.cors_origins" in problems
    assert message in problems


def test_a_star_alone_is_every_origin() -> None:
    config = parse_config(
        {
            "server": {"cors_origins": "*"},
            "providers": {"p": {"model": "openai/m", "api_base": "http://127.0.0.1:1/v1"}},
            "routes": {"default": ["p"]},
        },
        environ={},
    )
    assert config.server.cors_origins == ("*",)


def test_the_allowed_origins_follow_a_reload(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    data: dict[str, Any] = {
        "server": {"admin_key": "admin-secret", "reload_check_seconds": 0},
        "providers": {"cloud": openai_provider(cloud.url)},
        "routes": {"default": ["cloud"]},
        "health": {"probe_interval_seconds": 0},
    }
    path.write_text(yaml.safe_dump(data))
    proxy = serve(load_config(path, environ={}))
    assert "access-control-allow-origin" not in preflight(http, proxy).headers  # keyless: none

    data["server"]["cors_origins"] = [PAGE]
    path.write_text(yaml.safe_dump(data))
    reloaded = http.post(proxy.url + "/admin/reload", headers={"authorization": "Bearer admin-secret"})
    assert reloaded.status_code == 200
    assert preflight(http, proxy).headers["access-control-allow-origin"] == PAGE
