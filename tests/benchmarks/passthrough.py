"""The practical floor: a bare Starlette app relaying to the upstream with one
aiohttp ClientSession, bytes in and bytes out, no parsing, no policy.

    python -m tests.benchmarks.passthrough --upstream http://127.0.0.1:9100 --port 9200

The same server stack as fallback-proxy (uvicorn, one worker, uvloop,
httptools, Starlette), so the gap between the two is what the proxy itself
costs: routing, parsing, deadlines, the record, metrics and the log line.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build_app(upstream: str, limit: int = 1000) -> Starlette:
    """`limit`: aiohttp's pool size (0: none; the slow-streams scenario holds thousands open)."""
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
        upstream = await session.request(
            request.method,
            base + request.url.path,
            data=body if body else None,
            headers={"content-type": "application/json"},
        )
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
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.upstream, args.limit),
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
