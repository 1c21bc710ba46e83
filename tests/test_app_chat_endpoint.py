"""`POST /v1/chat/completions` is served as a raw ASGI endpoint ahead of
Starlette: over real sockets, everything a client sees of it stays as it was
under Starlette's routing (errors, headers, 405s, the internal-error guarantee)."""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from proxy.adapters import AttemptLimits, Chunk
from proxy.adapters.openai_compat import OpenAICompatAdapter
from proxy.app import create_app
from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, build_config, openai_provider

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
KEY = "team-key"


@pytest.fixture
def proxy(serve: Callable[..., ServedApp], cloud: FakeOpenAI) -> ServedApp:
    return serve(
        {
            "auth": {"keys": [KEY]},
            "providers": {"cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
            "server": {"max_body_bytes": 4096},
            "limits": {"max_header_bytes": 2048},
        }
    )


@pytest.fixture
def http(proxy: ServedApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {KEY}"}, timeout=10) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_both_paths_answer_with_the_proxy_headers(http: httpx.Client, path: str) -> None:
    response = http.post(path, json={"model": "default", "messages": MESSAGES}, headers={"x-request-id": "abc-1"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from cloud."
    assert response.headers["x-proxy-route"] == "default" and response.headers["x-proxy-provider"] == "cloud"
    assert response.headers["x-request-id"] == "abc-1"


def test_a_stream_keeps_its_headers_and_ends_with_done(http: httpx.Client) -> None:
    with http.stream(
        "POST", "/v1/chat/completions", json={"model": "default", "messages": MESSAGES, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-proxy-provider"] == "cloud"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    text = "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1] if json.loads(e)["choices"]
    )
    assert text == "Hello from cloud."


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_other_methods_get_the_same_405_as_any_route(http: httpx.Client, method: str) -> None:
    response = http.request(method, "/v1/chat/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    if method != "HEAD":
        error = error_of(response)
        assert error["type"] == "invalid_request_error"
        assert error["message"] == f"{method} /v1/chat/completions: Method Not Allowed"


def test_a_body_sent_in_chunks_is_read_whole_and_held_to_the_limit(http: httpx.Client) -> None:
    """No Content-Length (chunked framing): the parts are joined, and the limit
    is kept as they come, not by the declared length."""
    body = json.dumps({"model": "default", "messages": MESSAGES}).encode()
    parts = [body[i : i + 7] for i in range(0, len(body), 7)]
    answer = http.post("/v1/chat/completions", content=iter(parts), headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from cloud."
    too_big = http.post(
        "/v1/chat/completions", content=iter([b"{", b" " * 3000, b" " * 3000, b"}"]), headers={"x-request-id": "big"}
    )
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "request_too_large"
    assert too_big.headers["x-request-id"] == "big"


def test_a_client_gone_before_its_whole_body_costs_nothing(
    proxy: ServedApp, http: httpx.Client, cloud: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
            + KEY.encode()
            + b'\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"model": "default"'
        )
    answer = http.post("/v1/chat/completions", json={"model": "default", "messages": MESSAGES})
    assert answer.status_code == 200
    assert cloud.request_count == 1  # the request cut short never reached a provider
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_wrong_key_is_an_openai_401(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        json={"model": "default", "messages": MESSAGES},
        headers={"authorization": "Bearer wrong", "x-request-id": "rid-401"},
    )
    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"
    assert response.headers["x-request-id"] == "rid-401"


def test_size_limits_and_bad_bodies_are_openai_4xx(http: httpx.Client) -> None:
    too_big = http.post(
        "/v1/chat/completions", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"}
    )
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "request_too_large"
    headers = http.post(
        "/v1/chat/completions", json={"model": "default", "messages": MESSAGES}, headers={"x-padding": "p" * 3000}
    )
    assert headers.status_code == 431
    error_of(headers)
    bad = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and error_of(bad)["type"] == "invalid_request_error"
    unknown = http.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"
    assert http.get("/healthz").status_code == 200  # the same connection, still usable


def test_a_bug_while_streaming_before_the_first_byte_is_one_logged_500(
    serve: Callable[..., ServedApp], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: OpenAICompatAdapter, body: dict[str, Any], limits: AttemptLimits) -> AsyncIterator[Chunk]:
        raise RuntimeError("a bug in the adapter")
        yield  # an async generator, as the real one

    monkeypatch.setattr(OpenAICompatAdapter, "stream", broken)
    proxy = serve({"providers": {"p": openai_provider("http://upstream.invalid")}, "routes": {"default": ["p"]}})
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        response = client.post("/v1/chat/completions", json={"model": "default", "messages": MESSAGES, "stream": True})
        assert response.status_code == 500 and error_of(response)["code"] == "internal_error"
        assert "a bug in the adapter" not in response.text
        assert client.get("/healthz").status_code == 200
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["unexpected error on POST /v1/chat/completions"]


def test_a_bug_behind_another_endpoint_is_one_logged_500_too(
    serve: Callable[..., ServedApp], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/v1/embeddings` is served by Starlette, behind the app's last line against bugs."""

    async def broken(self: OpenAICompatAdapter, body: dict[str, Any], limits: AttemptLimits) -> Any:
        raise RuntimeError("a bug in the adapter")

    monkeypatch.setattr(OpenAICompatAdapter, "embed", broken)
    proxy = serve({"providers": {"p": openai_provider("http://upstream.invalid")}, "routes": {"default": ["p"]}})
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        response = client.post("/v1/embeddings", json={"model": "default", "input": "hi"})
        assert response.status_code == 500 and error_of(response)["code"] == "internal_error"
        assert "a bug in the adapter" not in response.text
        assert client.get("/healthz").status_code == 200  # the same connection, still usable
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["unexpected error on POST /v1/embeddings"]


def test_the_fast_path_honours_a_root_path(serve_asgi: Callable[..., ServedApp], cloud: FakeOpenAI) -> None:
    app = create_app(
        build_config({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    )

    async def mounted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": "/api", "path": "/api" + scope["path"]}
        await app(scope, receive, send)

    proxy = serve_asgi(mounted)
    response = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "default", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-proxy-provider"] == "cloud"


def test_chat_sends_go_straight_to_the_server_and_other_routes_through_starlette(
    serve_asgi: Callable[..., ServedApp], cloud: FakeOpenAI
) -> None:
    app = create_app(
        build_config({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    )
    senders: dict[str, set[str]] = {}

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def noting(message: Any) -> None:
            senders.setdefault(scope["path"], set()).add(sys._getframe(1).f_code.co_qualname)
            await send(message)

        await app(scope, receive, noting)

    proxy = serve_asgi(recording)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        body = {"model": "default", "messages": MESSAGES, "stream": True}
        assert client.post("/v1/chat/completions", json=body).text.endswith("data: [DONE]\n\n")
        assert client.post("/chat/completions", json={**body, "stream": False}).status_code == 200
        assert client.get("/healthz").status_code == 200
    assert senders["/v1/chat/completions"] == {"SSEResponse.__call__"}
    assert senders["/chat/completions"] == {"JSONBody.__call__"}
    assert senders["/healthz"] != {"JSONBody.__call__"}  # Starlette's middleware wraps the rest
