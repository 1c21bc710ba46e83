"""A stream's chunks go to the client one write per upstream read: the events
that arrived together leave together (one HTTP chunk of the response), and
events that arrived apart are not held back for each other."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import ServedApp

Frame = list[bytes]  # the SSE events of one upstream write


def event(data: dict[str, object] | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else json.dumps(data).encode()) + b"\n\n"


def chunk(content: str | None, finish: str | None = None, role: bool = False) -> bytes:
    delta: dict[str, object] = {"role": "assistant", "content": ""} if role else {"content": content}
    return event(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 7,
            "model": "m",
            "choices": [{"index": 0, "delta": delta if content is not None or role else {}, "finish_reason": finish}],
        }
    )


class RawUpstream:
    """An OpenAI-compatible upstream on a raw socket: answers one stream with the
    given writes (each its own `sendall`, HTTP chunks inside), `gap` seconds apart."""

    def __init__(self, writes: list[Frame], gap: float = 0.15) -> None:
        self.writes = writes
        self.gap = gap
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock:
            conn, _ = self.sock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for index, events in enumerate(self.writes):
                    if index:
                        time.sleep(self.gap)
                    conn.sendall(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
                conn.sendall(b"0\r\n\r\n")
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(1)  # until the proxy is done with the connection


def response_chunks(port: int) -> list[bytes]:
    """POST a stream to the proxy; the HTTP chunks of its answer, as sent (one per body message)."""
    body = json.dumps({"model": "r", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-test\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, f"the proxy closed the connection early: {raw!r}"
            raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    frames = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return frames
        frames.append(rest[:size])
        rest = rest[size + 2 :]


@pytest.fixture
def proxy_for(serve: Callable[..., ServedApp]) -> Iterator[Callable[[RawUpstream], ServedApp]]:
    def _proxy(upstream: RawUpstream) -> ServedApp:
        provider = {"model": "openai/m", "api_key": "sk-upstream", "api_base": f"http://127.0.0.1:{upstream.port}/v1"}
        return serve({"providers": {"p": provider}, "routes": {"r": ["p"]}, "auth": {"keys": ["sk-test"]}})

    yield _proxy


def test_events_of_one_read_leave_in_one_write_and_apart_events_are_not_held(
    proxy_for: Callable[[RawUpstream], ServedApp],
) -> None:
    first = [chunk(None, role=True), chunk("a"), chunk("b")]
    second = [chunk("c"), chunk(None, "stop"), b"data: [DONE]\n\n"]
    proxy = proxy_for(RawUpstream([first, second]))
    frames = response_chunks(proxy.port)
    assert frames == [b"".join(first), b"".join(second)]


def test_events_before_an_error_in_the_same_read_are_sent_before_the_error_event(
    proxy_for: Callable[[RawUpstream], ServedApp],
) -> None:
    failing = event({"error": {"message": "overloaded", "type": "server_error"}})
    opening = [chunk(None, role=True), chunk("a"), chunk("b")]
    proxy = proxy_for(RawUpstream([[*opening, failing]]))
    frames = response_chunks(proxy.port)
    assert frames[0] == b"".join(opening)
    error = json.loads(frames[1].removesuffix(b"data: [DONE]\n\n").removeprefix(b"data: "))["error"]
    assert error["code"] == "stream_interrupted" and "overloaded" in error["message"]
    assert frames[1].endswith(b"data: [DONE]\n\n") and len(frames) == 2
