"""A fast fake LLM upstream for the benchmark: raw asyncio protocol + httptools.

    python -m tests.benchmarks.upstream --port 9100

Serves, over HTTP/1.1 keep-alive, with answers built once and cached:

* ``POST /v1/chat/completions`` (OpenAI): a ``chat.completion``, or with
  ``"stream": true`` an SSE stream of 22 ``chat.completion.chunk`` events
  (role, 20 content deltas, finish), a usage event when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``;
* ``POST /v1/messages`` (Anthropic Messages): a ``message``, or the Anthropic
  event stream (message_start, content_block_start, ping, 20 text deltas,
  content_block_stop, message_delta, message_stop);
* ``GET /v1/models``;
* ``POST /v1/traces``: an OTLP/HTTP trace sink (answers an empty
  ``ExportTraceServiceResponse``), for the row with traces on.

Streams are sent in chunked transfer encoding, one chunk per event, each event
its own ``write`` with a turn of the event loop in between: a token-by-token
upstream with zero think time. With ``--chunk-interval-ms M --stream-chunks N``
(the slow-streams scenario) an OpenAI stream is instead N content chunks, one
write every M ms on a fixed schedule (the role chunk goes with the first, the
finish, usage and ``[DONE]`` with the last), like a model generating tokens. It is not Starlette (the fault-injecting fakes
in ``proxy/fakes`` are too slow to measure a proxy with); the payload shapes
are the same. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import orjson

CONTENT_CHUNKS = 20  # + role chunk + finish chunk = 22 chunk events
PIECE = " word"
REPLY = PIECE * CONTENT_CHUNKS
PROMPT_TOKENS = 12
CREATED = 1_700_000_000


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    payload = data if isinstance(data, bytes) else _json(data)
    return head + b"data: " + payload + b"\n\n"


def openai_completion(model: str) -> bytes:
    return _json(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY.strip(), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": CONTENT_CHUNKS,
                "total_tokens": PROMPT_TOKENS + CONTENT_CHUNKS,
            },
            "system_fingerprint": "fp_bench",
        }
    )


def openai_stream(model: str, include_usage: bool, chunks: int = CONTENT_CHUNKS) -> list[bytes]:
    base = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_bench",
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": PIECE}) for _ in range(chunks)]
    events.append(chunk({}, "stop"))
    if include_usage:
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks, "total_tokens": PROMPT_TOKENS + chunks}
        events.append(_sse({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_message(model: str) -> bytes:
    return _json(
        {
            "id": "msg_01bench000000000000000000",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": REPLY.strip()}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": CONTENT_CHUNKS},
        }
    )


def anthropic_stream(model: str) -> list[bytes]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_01bench000000000000000000",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1},
        },
    }
    events = [
        _sse(start, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    events += [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": PIECE}},
            "content_block_delta",
        )
        for _ in range(CONTENT_CHUNKS)
    ]
    events += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": CONTENT_CHUNKS},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


MODELS = _json(
    {
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "bench"},
            {
                "id": "claude-sonnet-4-5-20250929",
                "type": "model",
                "object": "model",
                "created": CREATED,
                "display_name": "claude",
                "created_at": "2025-09-29T00:00:00Z",
                "owned_by": "bench",
            },
        ],
        "has_more": False,
    }
)


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
NOT_FOUND = _response(
    "404 Not Found", b"application/json", b'{"error":{"message":"not found","type":"invalid_request_error"}}'
)
TRACES_ACCEPTED = _response("200 OK", b"application/x-protobuf", b"")  # an empty ExportTraceServiceResponse
BAD_REQUEST = _response(
    "400 Bad Request", b"application/json", b'{"error":{"message":"bad json","type":"invalid_request_error"}}'
)


def _framed(events: list[bytes]) -> list[bytes]:
    """Each event as one HTTP chunk; the last element also ends the body."""
    frames = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    frames[-1] += b"0\r\n\r\n"
    return frames


class Answers:
    """Encoded answers, cached per (kind, model, options)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, bool], Any] = {}

    def get(self, kind: str, model: str, flag: bool, build: Callable[[], Any]) -> Any:
        key = (kind, model, flag)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = build()
        return found


ANSWERS = Answers()


@dataclass(frozen=True)
class Pacing:
    """Slow streams: `chunks` content chunks, one write every `interval` seconds (0: as fast as possible)."""

    chunks: int = CONTENT_CHUNKS
    interval: float = 0.0


def paced_writes(events: list[bytes], chunks: int) -> list[bytes]:
    """The framed events of a slow stream grouped into its `chunks` writes: the
    role chunk with the first content chunk, the finish, usage and [DONE] with the last."""
    frames = _framed(events)
    writes = [frames[0] + frames[1], *frames[2 : chunks + 1]]
    writes[-1] += b"".join(frames[chunks + 1 :])
    return writes


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("body", "loop", "pacing", "parser", "transport", "url")

    def __init__(self, pacing: Pacing = Pacing()) -> None:
        self.pacing = pacing
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.loop = asyncio.get_event_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None:
            return
        path = self.url.split(b"?", 1)[0]
        method = self.parser.get_method()
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            transport.write(_response("200 OK", b"application/json", MODELS))
            return
        if method == b"POST" and path == b"/v1/traces":
            transport.write(TRACES_ACCEPTED)
            return
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/chat/completions", b"/v1/messages"):
            transport.write(NOT_FOUND)
            return
        try:
            request = orjson.loads(b"".join(self.body))
            model = str(request.get("model") or "unknown")
        except (ValueError, AttributeError):
            transport.write(BAD_REQUEST)
            return
        stream = request.get("stream") is True
        if path == b"/v1/messages":
            if stream:
                self._stream(ANSWERS.get("as", model, False, lambda: _framed(anthropic_stream(model))))
            else:
                body = ANSWERS.get(
                    "a", model, False, lambda: _response("200 OK", b"application/json", anthropic_message(model))
                )
                transport.write(body)
            return
        if stream:
            options = request.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            pacing = self.pacing
            if pacing.interval:
                writes = ANSWERS.get(
                    "op", model, usage, lambda: paced_writes(openai_stream(model, usage, pacing.chunks), pacing.chunks)
                )
                self._paced(writes, pacing.interval)
                return
            self._stream(ANSWERS.get("os", model, usage, lambda: _framed(openai_stream(model, usage))))
        else:
            transport.write(
                ANSWERS.get(
                    "o", model, False, lambda: _response("200 OK", b"application/json", openai_completion(model))
                )
            )

    def _stream(self, frames: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(STREAM_HEAD + frames[0])
        if len(frames) > 1:
            self.loop.call_soon(self._write_rest, frames, 1)

    def _paced(self, writes: list[bytes], interval: float) -> None:
        """One write now, then one every `interval` on a fixed schedule (no drift)."""
        assert self.transport is not None
        self.transport.write(STREAM_HEAD + writes[0])
        start = self.loop.time()
        for index in range(1, len(writes)):
            self.loop.call_at(start + index * interval, self._write_paced, writes[index])

    def _write_paced(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _write_rest(self, frames: list[bytes], index: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(frames[index])
        if index + 1 < len(frames):
            self.loop.call_soon(self._write_rest, frames, index + 1)


async def serve(host: str, port: int, pacing: Pacing = Pacing()) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(pacing), host, port, backlog=4096, reuse_address=True)
    print(f"upstream listening on http://{host}:{port} (pid {os.getpid()})", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--stream-chunks", type=int, default=CONTENT_CHUNKS, help="content chunks of a paced stream")
    parser.add_argument(
        "--chunk-interval-ms", type=float, default=0.0, help="pace OpenAI streams: one write every this many ms"
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pacing = Pacing(args.stream_chunks, args.chunk_interval_ms / 1000)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, pacing))


if __name__ == "__main__":
    main()
