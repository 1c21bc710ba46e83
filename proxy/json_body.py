"""A JSON answer as an ASGI response, its head ready-made."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class JSONBody(Response):
    """A JSON answer whose body is ready-made: Starlette's `Response` without
    the rendering and header building such a body does not need (it is on the
    path of every non-stream answer). The same head: the given headers, then
    `content-length` and `content-type`."""

    def __init__(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        self.body = body
        self.background = None
        raw = (
            [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
            if headers
            else []
        )
        raw += [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        self.raw_headers = raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONBody(body, status, headers)
