"""The practical floor: a bare Starlette app relaying to the upstream with one
aiohttp ClientSession, bytes in and bytes out, no parsing, no policy.

    python -m tests.benchmarks.passthrough --upstream http://127.0.0.1:9100 --port 9200
    python -m tests.benchmarks.passthrough --upstream ... --assemble

`--assemble` is the floor of fallback-proxy's default non-stream design (issue 11:
a non-stream request is sent upstream as a stream, so that first-token and idle
deadlines bound it, and the chunks are assembled into one `chat.completion`): the
same exchange with nothing else, no deadlines, no checks, no continuation. Streams
are relayed as bytes either way.

The same server stack as fallback-proxy (uvicorn, one worker, uvloop,
httptools, Starlette), so the gap between the two is what the proxy itself
costs: routing, parsing, deadlines, the record, metrics and the log line.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def assembled(events: bytes) -> bytes:
    """An SSE stream of `chat.completion.chunk`s as the one `chat.completion` it
    amounts to (each choice's text and finish reason, the usage): the least a
    proxy that streams non-stream requests upstream must do with the answer."""
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str | None] = {}
    head: dict[str, object] = {}
    usage = None
    for line in events.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        chunk = orjson.loads(payload)
        head = chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            content = (choice.get("delta") or {}).get("content")
            if content:
                texts.setdefault(index, []).append(content)
            if choice.get("finish_reason"):
                finishes[index] = choice["finish_reason"]
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": "".join(texts.get(index, ())), "refusal": None},
            "logprobs": None,
            "finish_reason": finishes.get(index),
        }
        for index in sorted(texts.keys() | finishes.keys())
    ]
    answer = {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": choices,
        "usage": usage,
    }
    return orjson.dumps(answer)


def build_app(upstream: str, limit: int = 1000, assemble: bool = False) -> Starlette:
    """`limit`: aiohttp's pool size (0: none; the slow-streams scenario holds thousands open).
    `assemble`: non-stream requests are streamed upstream and assembled."""
    session: aiohttp.ClientSession | None = None
    base = upstream.rstrip("/")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        try:
            yield
        finally:
            await session.close()

    async def relay(request: Request) -> Response:
        assert session is not None
        body = await request.body()
        streamed_upstream = False
        if assemble and body:
            request_body = orjson.loads(body)
            if not request_body.get("stream"):
                request_body["stream"] = streamed_upstream = True
                request_body["stream_options"] = {"include_usage": True}
                body = orjson.dumps(request_body)
        upstream = await session.request(
            request.method,
            base + request.url.path,
            data=body if body else None,
            headers={"content-type": "application/json"},
        )
        if streamed_upstream and upstream.status == 200:
            events = await upstream.read()
            upstream.release()
            return Response(assembled(events), media_type="application/json")
        content_type = upstream.headers.get("content-type", "application/json")
        if content_type.startswith("text/event-stream"):

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for data in upstream.content.iter_any():
                        yield data
                finally:
                    upstream.release()

            return StreamingResponse(chunks(), status_code=upstream.status, media_type=content_type)
        data = await upstream.read()
        upstream.release()
        return Response(data, status_code=upstream.status, media_type=content_type)

    routes = [
        Route("/v1/chat/completions", relay, methods=["POST"]),
        Route("/v1/models", relay, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--limit", type=int, default=1000, help="aiohttp's connection pool size; 0: no limit")
    parser.add_argument("--assemble", action="store_true", help="non-stream requests streamed upstream and assembled")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.upstream, args.limit, args.assemble),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
