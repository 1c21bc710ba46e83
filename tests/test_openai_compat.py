"""The OpenAI-compatible adapter over aiohttp, against real servers on 127.0.0.1:
size caps, bodies cut short, refused and hanging connects, silent upstreams,
early close of a stream, and what the pooled session sends."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.adapters import AttemptLimits, Chunk, classify
from proxy.adapters.openai_compat import OpenAICompatAdapter
from proxy.config import parse_config
from proxy.errors import FailureClass, ProviderError
from proxy.fakes import Blackhole, FakeOpenAI
from proxy.service import open_session
from proxy.stream import live

BODY: dict[str, Any] = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
LIMITS = AttemptLimits(connect=2, read=5)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def adapter(url: str, session: aiohttp.ClientSession) -> OpenAICompatAdapter:
    config = parse_config(
        {"providers": {"p": {"model": "openai/m", "api_base": url + "/v1", "api_key": "k"}}, "routes": {"r": ["p"]}},
        environ={},
    )
    return OpenAICompatAdapter(config.providers["p"], session)


def chunk_bytes(text: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def completion_bytes(text: str) -> bytes:
    return orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }
    )


@contextlib.asynccontextmanager
async def upstream(handler: Handler, method: str = "POST", path: str = "/v1/chat/completions") -> AsyncIterator[str]:
    """An aiohttp server on a free port of 127.0.0.1 (in the test's loop) answering with `handler`."""
    app = web.Application()
    app.router.add_route(method, path, handler)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def collect(stream: AsyncIterator[Chunk]) -> tuple[list[Chunk], ProviderError | None]:
    chunks: list[Chunk] = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
    except ProviderError as exc:
        return chunks, exc
    return chunks, None


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.asyncio
@pytest.mark.parametrize("sent", ["content-length", "chunked", "in-one-read-before-its-end"])
async def test_a_whole_answer_over_the_cap_is_a_server_error(sent: str) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        if sent == "content-length":
            return web.Response(body=b"x" * 5000, content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if sent == "chunked":
            for _ in range(50):
                await response.write(b"x" * 100)
        else:  # the first read brings more than the cap, and the body's end comes later
            await response.write(b"x" * 5000)
            await asyncio.sleep(0.2)
        return response

    async with upstream(big) as url, open_session() as session:
        with pytest.raises(ProviderError) as caught:
            await adapter(url, session).complete(BODY, AttemptLimits(connect=2, read=5, max_bytes=1000))
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "larger than limits.max_upstream_bytes (1000)" in caught.value.message


@pytest.mark.asyncio
async def test_an_answer_at_the_cap_passes() -> None:
    body = completion_bytes("fits")

    async def exact(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    async with upstream(exact) as url, open_session() as session:
        completion = await adapter(url, session).complete(BODY, AttemptLimits(connect=2, read=5, max_bytes=len(body)))
    assert completion.body == body


@pytest.mark.asyncio
async def test_a_stream_over_the_cap_ends_with_a_server_error() -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk_bytes("tok "))
        await asyncio.sleep(0.05)
        for _ in range(200):
            await response.write(chunk_bytes("tok "))
        return response

    async with upstream(endless) as url, open_session() as session:
        chunks, error = await collect(
            adapter(url, session).stream(BODY, AttemptLimits(connect=2, read=5, max_bytes=2000))
        )
    assert error is not None and error.failure is FailureClass.SERVER_ERROR
    assert "larger than limits.max_upstream_bytes (2000)" in error.message
    assert 1 <= len(chunks) <= 2000 // len(chunk_bytes("tok "))  # what came before the cap was relayed


@pytest.mark.asyncio
async def test_a_body_cut_short_is_a_connection_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"id":')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, open_session() as session:
        with pytest.raises(ProviderError) as caught:
            await adapter(f"http://127.0.0.1:{port}", session).complete(BODY, LIMITS)
    assert caught.value.failure is FailureClass.CONNECTION_ERROR


@pytest.mark.asyncio
async def test_a_stream_cut_short_yields_its_chunks_then_a_connection_error() -> None:
    with FakeOpenAI("cut") as fake:
        fake.set_fault("die_midstream", after_chunks=2)
        async with open_session() as session:
            chunks, error = await collect(adapter(fake.url, session).stream(BODY, LIMITS))
    assert len([c for c in chunks if c.has_content]) == 2
    assert error is not None and error.failure is FailureClass.CONNECTION_ERROR


@pytest.mark.asyncio
async def test_a_stream_without_a_finish_is_a_server_error() -> None:
    async def unfinished(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk_bytes("half "))
        return response

    async with upstream(unfinished) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert [c.text for c in chunks] == ["half "]
    assert error is not None and error.failure is FailureClass.SERVER_ERROR and "without a finish" in error.message


@pytest.mark.asyncio
async def test_a_last_event_without_its_blank_line_still_counts() -> None:
    async def terse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk_bytes("a") + chunk_bytes("b", "stop").rstrip(b"\n"))
        return response

    async with upstream(terse) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert error is None
    assert [(c.text, c.finish_reason) for c in chunks] == [("a", None), ("b", "stop")]


@pytest.mark.asyncio
async def test_a_whole_answer_to_a_stream_request_is_read_as_its_stream() -> None:
    async def ignores_stream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=completion_bytes("whole"), content_type="application/json")

    async with upstream(ignores_stream) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert error is None
    assert [(c.text, c.finish_reason) for c in chunks if c.has_content or c.finish_reason] == [("whole", "stop")]
    assert len(chunks) == 1 and not chunks[0].more


@pytest.mark.asyncio
async def test_a_json_answer_that_is_no_completion_is_a_server_error() -> None:
    async def ignores_stream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"status": "busy"}', content_type="application/json")

    async with upstream(ignores_stream) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert chunks == []
    assert error is not None and error.failure is FailureClass.SERVER_ERROR
    assert "asked for a stream, got application/json" in error.message


@pytest.mark.asyncio
async def test_closing_a_stream_early_closes_its_connection_and_a_whole_answer_keeps_it() -> None:
    ports: list[int] = []
    gone = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else 0)
        if not orjson.loads(await request.read())["stream"]:
            return web.Response(body=completion_bytes("whole"), content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(chunk_bytes("tok "))
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    async with upstream(handler) as url, open_session() as session:
        provider = adapter(url, session)
        stream = provider.stream(BODY, LIMITS)
        first = await anext(aiter(stream))
        assert first.text == "tok "
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(gone.wait(), timeout=5)  # the upstream sees its client go
        await provider.complete(BODY, LIMITS)
        await provider.complete(BODY, LIMITS)
    streamed, second, third = ports
    assert second != streamed  # the stream's connection was not pooled mid-body
    assert third == second  # a connection read to its end is reused


@pytest.mark.asyncio
@pytest.mark.parametrize("linger", [0.02, 10.0], ids=["end-behind-done", "no-end-after-done"])
async def test_a_finished_stream_ends_at_done_and_its_connection_is_reused_once_the_body_ends(linger: float) -> None:
    ports: list[int] = []

    async def done_then_linger(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else 0)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk_bytes("all", "stop") + b"data: [DONE]\n\n")
        await asyncio.sleep(linger)  # the body's end comes later, or not at all
        return response

    async with upstream(done_then_linger) as url, open_session() as session:
        provider = adapter(url, session)
        started = time.monotonic()
        chunks, error = await collect(provider.stream(BODY, LIMITS))
        assert time.monotonic() - started < 0.5  # the client's stream ends at [DONE], whatever follows
        assert error is None and [c.text for c in chunks] == ["all"]
        await asyncio.sleep(0.1 if linger < 1 else 1.2)  # past the body's end, or past the wait for it
        await collect(provider.stream(BODY, LIMITS))
    if linger < 1:
        assert ports[1] == ports[0]  # back in the pool once the body ended
    else:
        assert ports[1] != ports[0]  # never ended: closed, not pooled


@pytest.mark.asyncio
async def test_the_wait_for_a_finished_streams_end_ends_quietly_when_the_session_closes() -> None:
    """At shutdown the session closes while the body's end after `[DONE]` is still
    awaited in the background: that wait ends without an error (no "Task
    exception was never retrieved" traceback in the log)."""

    async def done_then_linger(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk_bytes("all", "stop") + b"data: [DONE]\n\n")
        await asyncio.sleep(10)
        return response

    async with upstream(done_then_linger) as url:
        async with open_session() as session:
            provider = adapter(url, session)
            chunks, error = await collect(provider.stream(BODY, LIMITS))
            assert error is None and [c.text for c in chunks] == ["all"]
            draining = set(provider._draining)
            assert draining  # the body's end is being waited for
        results = await asyncio.wait_for(asyncio.gather(*draining, return_exceptions=True), 5)
    assert results == [None]


@pytest.mark.asyncio
async def test_connection_refused_is_a_connection_error() -> None:
    async with open_session() as session:
        provider = adapter(f"http://127.0.0.1:{closed_port()}", session)
        with pytest.raises(ProviderError) as caught:
            await provider.complete(BODY, LIMITS)
        assert caught.value.failure is FailureClass.CONNECTION_ERROR
        _chunks, error = await collect(provider.stream(BODY, LIMITS))
        assert error is not None and error.failure is FailureClass.CONNECTION_ERROR
        with pytest.raises(ProviderError) as probed:
            await provider.probe(LIMITS)
        assert probed.value.failure is FailureClass.CONNECTION_ERROR


@pytest.mark.asyncio
async def test_a_connect_that_hangs_times_out_at_the_connect_limit() -> None:
    with Blackhole() as hole:
        async with open_session() as session:
            started = time.monotonic()
            with pytest.raises(ProviderError) as caught:
                await adapter(hole.url, session).complete(BODY, AttemptLimits(connect=0.3, read=30))
            elapsed = time.monotonic() - started
    assert caught.value.failure is FailureClass.TIMEOUT
    assert 0.25 <= elapsed < 3


@pytest.mark.asyncio
async def test_a_silent_upstream_times_out_at_the_read_limit() -> None:
    with FakeOpenAI("silent") as fake:
        fake.set_fault("hang")
        async with open_session() as session:
            provider = adapter(fake.url, session)
            started = time.monotonic()
            with pytest.raises(ProviderError) as caught:
                await provider.complete(BODY, AttemptLimits(connect=2, read=0.3))
            assert caught.value.failure is FailureClass.TIMEOUT
            _chunks, error = await collect(provider.stream(BODY, AttemptLimits(connect=2, read=0.3)))
            assert error is not None and error.failure is FailureClass.TIMEOUT
            assert time.monotonic() - started < 5


@pytest.mark.asyncio
async def test_silence_mid_stream_times_out_at_the_read_limit() -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk_bytes("one "))
        await asyncio.sleep(10)
        return response

    async with upstream(stalls) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, AttemptLimits(connect=2, read=0.3)))
    assert [c.text for c in chunks] == ["one "]
    assert error is not None and error.failure is FailureClass.TIMEOUT


@pytest.mark.asyncio
async def test_the_read_limit_counts_each_wait_not_the_whole_stream_nor_a_slow_reader() -> None:
    """Chunks 0.1 s apart under a 0.3 s read limit: the stream lasts far longer
    than the limit and never times out; nor does a reader that pauses longer
    than the limit while the data waits for it in the buffer."""

    async def steady(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for index in range(6):
            await response.write(chunk_bytes(f"{index} "))
            await asyncio.sleep(0.1)
        await response.write(chunk_bytes("", "stop") + b"data: [DONE]\n\n")
        return response

    async with upstream(steady) as url, open_session() as session:
        provider = adapter(url, session)
        chunks, error = await collect(provider.stream(BODY, AttemptLimits(connect=2, read=0.3)))
        assert error is None and "".join(c.text for c in chunks) == "0 1 2 3 4 5 "
        slow_reader: list[str] = []
        async for chunk in provider.stream(BODY, AttemptLimits(connect=2, read=0.3)):
            slow_reader.append(chunk.text)
            await asyncio.sleep(0.4)  # the upstream goes on meanwhile; its chunks wait, read
        assert "".join(slow_reader) == "0 1 2 3 4 5 "


@pytest.mark.asyncio
async def test_retry_after_is_read_from_aiohttp_headers() -> None:
    async def limited(request: web.Request) -> web.StreamResponse:
        body = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit"}})
        return web.Response(status=429, body=body, content_type="application/json", headers={"Retry-After": "7"})

    async with upstream(limited) as url, open_session() as session:
        provider = adapter(url, session)
        with pytest.raises(ProviderError) as caught:
            await provider.complete(BODY, LIMITS)
        _chunks, error = await collect(provider.stream(BODY, LIMITS))
    assert caught.value.failure is FailureClass.RATE_LIMITED and caught.value.retry_after == 7
    assert error is not None and error.failure is FailureClass.RATE_LIMITED and error.retry_after == 7
    assert "slow down" in caught.value.message


@pytest.mark.asyncio
async def test_what_the_session_sends_no_cookies_kept_our_user_agent_our_key() -> None:
    seen: list[dict[str, str]] = []

    async def cookie_setter(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        response = web.Response(body=completion_bytes("hi"), content_type="application/json")
        response.set_cookie("session", "from-provider")
        return response

    async with upstream(cookie_setter) as url, open_session() as session:
        provider = adapter(url, session)
        await provider.complete(BODY, LIMITS)
        await provider.complete(BODY, LIMITS)
    assert all("Cookie" not in headers for headers in seen)
    assert seen[1]["User-Agent"] == "fallback-proxy"
    assert seen[1]["Authorization"] == "Bearer k"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            aiohttp.ClientConnectorError(
                aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None),
                ConnectionRefusedError(111, "refused"),
            ),
            FailureClass.CONNECTION_ERROR,
        ),
        (aiohttp.ServerDisconnectedError(), FailureClass.CONNECTION_ERROR),
        (aiohttp.ClientPayloadError("Response payload is not completed"), FailureClass.CONNECTION_ERROR),
        (aiohttp.ClientOSError(104, "reset"), FailureClass.CONNECTION_ERROR),
        (ConnectionResetError(104, "reset"), FailureClass.CONNECTION_ERROR),
        (aiohttp.ConnectionTimeoutError("connect"), FailureClass.TIMEOUT),
        (aiohttp.SocketTimeoutError("read"), FailureClass.TIMEOUT),
        (aiohttp.ServerTimeoutError("read"), FailureClass.TIMEOUT),
        (TimeoutError(), FailureClass.TIMEOUT),
    ],
)
def test_aiohttp_exceptions_classify_like_their_httpx_counterparts(exc: Exception, expected: FailureClass) -> None:
    assert classify.from_exception(exc).failure is expected


def answering(body: bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type=content_type)

    return handler


@pytest.mark.asyncio
async def test_a_whole_answer_with_tool_calls_logprobs_and_usage_is_read_as_its_stream() -> None:
    lp = {"content": [{"token": "ok", "logprob": -0.1, "bytes": [111, 107], "top_logprobs": []}]}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    whole = orjson.dumps(
        {
            "id": "c",
            "created": 1,
            "model": "m",
            "choices": [
                "junk",  # not a choice: skipped
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                    "finish_reason": "tool_calls",
                    "logprobs": lp,
                },
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
    async with upstream(answering(whole)) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert error is None and len(chunks) == 2
    choice = chunks[0].parsed()["choices"][0]
    assert choice["delta"] == {"role": "assistant", "tool_calls": [{"index": 0, **call}]}  # no null content
    assert choice["logprobs"] == lp and chunks[0].finish_reason == "tool_calls" and chunks[0].tool_calls
    assert chunks[1].parsed()["usage"]["total_tokens"] == 5 and chunks[1].parsed()["choices"] == []
    assert chunks[0].more and not chunks[1].more


@pytest.mark.asyncio
async def test_a_whole_error_answer_to_a_stream_request_is_classified() -> None:
    body = orjson.dumps({"choices": [], "error": {"message": "This model's maximum context length is 8192 tokens"}})
    async with upstream(answering(body)) as url, open_session() as session:
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert chunks == [] and error is not None and error.failure is FailureClass.CONTEXT_WINDOW_EXCEEDED


@pytest.mark.asyncio
async def test_an_event_that_is_no_object_is_skipped_and_an_error_event_ends_the_stream() -> None:
    events = chunk_bytes("a") + b"data: [1, 2]\n\n" + b'data: {"error": {"message": "overloaded"}}\n\n'
    async with (
        upstream(answering(events, content_type="text/event-stream")) as url,
        open_session() as session,
    ):
        chunks, error = await collect(adapter(url, session).stream(BODY, LIMITS))
    assert [c.text for c in chunks] == ["a"]
    assert error is not None and error.failure is FailureClass.SERVER_ERROR and "overloaded" in error.message


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "failure", "words"),
    [
        (b"<html>busy</html>", FailureClass.SERVER_ERROR, "not JSON"),
        (b'{"error": {"message": "maximum context length exceeded"}}', FailureClass.CONTEXT_WINDOW_EXCEEDED, "context"),
        (b'{"object": "chat.completion"}', FailureClass.SERVER_ERROR, ""),
    ],
    ids=["not-json", "error", "no-choices"],
)
async def test_a_whole_answer_that_is_no_completion_is_a_provider_failure(
    body: bytes, failure: FailureClass, words: str
) -> None:
    async with upstream(answering(body)) as url, open_session() as session:
        with pytest.raises(ProviderError) as caught:
            await adapter(url, session).complete(BODY, LIMITS)
    assert caught.value.failure is failure and words in caught.value.message


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "failure", "words"),
    [
        (b"upstream down", FailureClass.SERVER_ERROR, "not JSON"),
        (b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}', None, "API key"),
        (b'{"object": "list", "data": [{"embedding": {"x": 1}}]}', FailureClass.SERVER_ERROR, "malformed"),
        (b'{"object": "list", "data": "none"}', FailureClass.SERVER_ERROR, "malformed"),
    ],
    ids=["not-json", "error", "not-a-vector", "no-list"],
)
async def test_an_embeddings_answer_of_the_wrong_shape_is_a_provider_failure(
    body: bytes, failure: FailureClass | None, words: str
) -> None:
    async with upstream(answering(body), path="/v1/embeddings") as url, open_session() as session:
        with pytest.raises(ProviderError) as caught:
            await adapter(url, session).embed({"model": "x", "input": "hi"}, LIMITS)
    assert failure is None or caught.value.failure is failure
    assert words in caught.value.message


class ClosesKeptAliveConnections:
    """A raw HTTP/1.1 upstream that answers the first request on each connection
    (kept alive) and closes the connection, unanswered, when a next request comes
    on it: what a client meets when the server's keep-alive timeout closes a
    pooled connection as the request goes out. `answering`: how many requests it
    answers in all (then it closes every one unanswered, a server that fails)."""

    def __init__(self, answering: int | None = None) -> None:
        self.answering = answering
        self.requests: list[tuple[int, bool]] = []  # (connection, answered), in turn
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()  # the session was closed first: no connection is left open

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = 1 + len({number for number, _ in self.requests})
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line[:15] == b"content-length:")
                body = orjson.loads(await reader.readexactly(length))
                answered = sum(done for _, done in self.requests)
                if served or (self.answering is not None and answered >= self.answering):
                    self.requests.append((connection, False))
                    return  # the request was read; the connection closes with no answer
                self.requests.append((connection, True))
                served += 1
                if body.get("stream"):
                    content, kind = chunk_bytes("hi", "stop") + b"data: [DONE]\n\n", b"text/event-stream"
                else:
                    content, kind = completion_bytes("hi"), b"application/json"
                size = str(len(content)).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %s\r\n\r\n" % (kind, size))
                writer.write(content)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def ask_twice(url: str, stream: bool) -> list[str | ProviderError]:
    """Two calls in turn through one adapter on one pooled session: the second
    goes out on the connection the first was answered on."""
    answers: list[str | ProviderError] = []
    async with open_session() as session:
        chat = adapter(url, session)
        for _ in range(2):
            if stream:
                chunks, failed = await collect(chat.stream(BODY, LIMITS))
                answers.append(failed or "".join(chunk.text for chunk in chunks))
            else:
                try:
                    answers.append(
                        orjson.loads((await chat.complete(BODY, LIMITS)).body)["choices"][0]["message"]["content"]
                    )
                except ProviderError as exc:
                    answers.append(exc)
    return answers


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_pooled_connection_the_server_closed_is_no_failure(stream: bool) -> None:
    server = ClosesKeptAliveConnections()
    async with server as url:
        assert await ask_twice(url, stream) == ["hi", "hi"]
    assert server.requests == [(1, True), (1, False), (2, True)]  # sent again once, on a new connection


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_call_closed_unanswered_on_a_new_connection_too_is_the_providers_failure(stream: bool) -> None:
    server = ClosesKeptAliveConnections(answering=1)
    async with server as url:
        first, second = await ask_twice(url, stream)
    assert first == "hi"
    assert isinstance(second, ProviderError) and second.failure is FailureClass.CONNECTION_ERROR
    assert server.requests == [(1, True), (1, False), (2, False)]  # sent again once, never more


def padded_chunk(text: str, padding: str, finish: str | None = None) -> bytes:
    """A chunk as OpenAI writes it, ending with a random `obfuscation` string."""
    chunk = {
        "id": "chatcmpl-p",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "service_tier": "default",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}],
        "obfuscation": padding,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


PIECES = ["Hel", "lo", ", ", '"wo', 'rld"', " \u00e9\u4e2d", "\\n", "!"]


@pytest.mark.asyncio
async def test_openai_padded_chunks_reach_the_client_as_they_came_and_read_right() -> None:
    """OpenAI pads each chunk with a random `obfuscation`: the stream's chunks go
    on byte for byte, their text read right (most by the learnt shape), and a
    non-stream answer assembles the same text."""
    events = [padded_chunk(piece, "x" * (i % 5) + "Zq") for i, piece in enumerate(PIECES)]
    events += [padded_chunk("", "end", finish="stop"), b"data: [DONE]\n\n"]

    async def padded(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        return response

    async with upstream(padded) as url, open_session() as session:
        provider = adapter(url, session)
        chunks, error = await collect(provider.stream(BODY, LIMITS))
        assembled = await live.collect(provider.parsed_reads, provider.provider, BODY, math.inf, 1 << 20)
    assert error is None
    assert [b"data: " + c.payload + b"\n\n" for c in chunks] == events[:-1]
    assert [c.text for c in chunks] == [*PIECES, ""]
    assert [c.finish_reason for c in chunks] == [None] * len(PIECES) + ["stop"]
    assert orjson.loads(assembled.body)["choices"][0]["message"]["content"] == "".join(PIECES)
