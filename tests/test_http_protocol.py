"""Requests uvicorn cannot parse get an OpenAI error body, not uvicorn's plain text."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import uvicorn

from proxy.app import create_app
from proxy.http_protocol import H11OpenAIErrors, HttpToolsOpenAIErrors
from tests.conftest import build_config

BAD_REQUESTS = [
    pytest.param(b"GARBAGE\r\n\r\n", id="no-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", id="header-without-colon"),
    pytest.param(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", id="bad-content-length"),
]


@pytest.fixture(params=[HttpToolsOpenAIErrors, H11OpenAIErrors], ids=["httptools", "h11"])
def served(request: pytest.FixtureRequest) -> Iterator[int]:
    provider = {"model": "openai/gpt-test", "api_base": "http://127.0.0.1:9/v1"}
    app = create_app(build_config({"providers": {"cloud": provider}, "routes": {"default": ["cloud"]}}))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=request.param, log_level="warning", log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(raw)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("raw", BAD_REQUESTS)
def test_unparseable_request_gets_an_openai_error(served: int, raw: bytes) -> None:
    answer = _exchange(served, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http"
    # the server is still there for the next client
    ok = _exchange(served, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ")
