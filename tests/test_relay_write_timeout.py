"""A client that stops reading a stream is dropped after the write timeout, over
real sockets: its upstream is closed, the proxy's buffers stay bounded, and
the proxy goes on answering everyone else."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from starlette.types import Receive, Scope, Send

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider

WRITE_TIMEOUT = 0.5
PIECE = "x" * 32768  # each chunk carries 32 KiB of text
UPSTREAM_CAP = 512 * 1024 * 1024  # what the fake would send to a reader that never stops


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(delta: dict[str, Any]) -> bytes:
    return sse(
        {
            "id": "chatcmpl-big",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "big-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
    )


class EndlessUpstream:
    """An OpenAI-compatible upstream streaming an answer far larger than any
    buffer, as fast as its reader takes it; notes how much it sent and when
    its reader went away."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed_at: float | None = None
        self.closed = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True

        watcher = asyncio.create_task(watch())
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            await send({"type": "http.response.body", "body": chunk({"role": "assistant"}), "more_body": True})
            piece = chunk({"content": PIECE})
            while not gone and self.sent < UPSTREAM_CAP:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                self.sent += len(piece)
        except OSError:
            pass
        finally:
            watcher.cancel()
            self.closed_at = time.monotonic()
            self.closed.set()


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stalled_client(port: int, body: bytes) -> socket.socket:
    """A client that sends a streaming request, then never reads (a tiny receive window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything still readable, and whether the proxy closed the connection."""
    sock.settimeout(timeout)
    received = bytearray()
    try:
        while part := sock.recv(1 << 20):
            received += part
    except ConnectionResetError:
        return bytes(received), True
    except TimeoutError:
        return bytes(received), False
    return bytes(received), True


@pytest.mark.slow
def test_a_client_that_stops_reading_is_dropped_and_the_proxy_answers_others(
    serve: Callable[..., ServedApp],
    serve_asgi: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = EndlessUpstream()
    upstream_url = serve_asgi(upstream).url
    proxy = serve(
        {
            "providers": {"big": openai_provider(upstream_url), "cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
            "limits": {"client_write_timeout_seconds": WRITE_TIMEOUT, "max_upstream_bytes": 1024 * 1024 * 1024},
        }
    )
    rss_before = rss_mb()
    request = json.dumps({"model": "big", "stream": True, "messages": [{"role": "user", "content": "Go on."}]})

    stalled_at = time.monotonic()
    sock = stalled_client(proxy.port, request.encode())
    try:
        # The proxy answers others meanwhile, plain and streaming.
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=10) as sdk:
            messages: Any = [{"role": "user", "content": "Say hello."}]
            plain = sdk.chat.completions.create(model="default", messages=messages)
            assert plain.choices[0].message.content == "Hello from cloud."
            streamed = sdk.chat.completions.create(model="default", messages=messages, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Hello from cloud."

        assert upstream.closed.wait(timeout=15), f"the upstream was still streaming ({upstream.sent} bytes)"
        dropped_after = (upstream.closed_at or 0) - stalled_at
        assert dropped_after < 10, f"the stalled client was dropped only after {dropped_after:.1f}s"
        # What the proxy took from upstream is what fits in socket buffers, not the answer.
        assert upstream.sent < 64 * 1024 * 1024, upstream.sent
        assert rss_mb() - rss_before < 100

        received, closed = read_to_end(sock, timeout=10)
    finally:
        sock.close()
    assert closed, "the proxy kept the stalled client's connection open"
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b"[DONE]" not in received[-100:] and len(received) < upstream.sent

    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        # The client's slowness is not the provider's failure: not even one counted against it.
        big = http.get("/readyz").json()["health"]["big"]
        assert (big["state"], big["breaker"], big["reason"]) == ("healthy", "closed", ""), big
    lines = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "fallback_proxy.request" and r.levelno == logging.INFO
    ]
    assert [line["outcome"] for line in lines if line["route"] == "big"] == ["client_disconnected"], lines
