"""With `auth.keys` set, every `/v1/*` endpoint answers 401 without a valid key
(`GET /v1/models` included), and serves the same request with one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider

ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/default", None),
    ("POST", "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/responses", {"model": "default", "input": "Hi"}),
    ("POST", "/v1/embeddings", {"model": "default", "input": "Hi"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[p for _, p, _ in ENDPOINTS])
def test_every_v1_endpoint_needs_the_key(
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    http: httpx.Client,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    proxy = serve(
        {
            "auth": {"keys": ["team-key"]},
            "providers": {"cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
        }
    )
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic team-key"}):
        answer = http.request(method, proxy.url + path, json=body, headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
    assert cloud.request_count == 0
    allowed = http.request(method, proxy.url + path, json=body, headers={"authorization": "Bearer team-key"})
    assert allowed.status_code == 200
