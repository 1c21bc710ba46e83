"""Running the app under uvicorn, for `serve`, `demo` and drills."""

from __future__ import annotations

import importlib.util
import math

import httpx
import uvicorn

from proxy.app import create_app
from proxy.config import Config
from proxy.protocol import HttpToolsOpenAIErrors


def build_server(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> uvicorn.Server:
    """A uvicorn server for `config` (host and port default to the config's)."""
    app = create_app(config, transport=transport)
    uv_config = uvicorn.Config(
        app,
        host=host or config.server.host,
        port=config.server.port if port is None else port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=HttpToolsOpenAIErrors,  # malformed HTTP gets an OpenAI error body, not plain text
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(config.server.shutdown_grace_seconds),
        # Longer than clients' own keep-alive (httpx and the OpenAI SDK: 5 s), so a
        # client never sends on a connection the server is closing.
        timeout_keep_alive=75,
    )
    return uvicorn.Server(uv_config)


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with port 0)."""
    for listener in server.servers:
        for sock in listener.sockets:
            port: int = sock.getsockname()[1]
            return port
    raise RuntimeError("the server is not listening")
