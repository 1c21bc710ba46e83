"""uvicorn's HTTP protocols, answering a request it cannot parse in OpenAI's shape.

uvicorn answers malformed HTTP (a bad request line, a broken header, invalid
chunked framing) itself, before the app sees anything, with a plain-text 400.
A client of this proxy expects every error as an OpenAI error object, so the
two protocols below send the same 400 with that body instead.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

INVALID_HTTP_BODY = orjson.dumps(
    {
        "error": {
            "message": "Invalid HTTP request received: the request line, a header or the body framing "
            "could not be parsed.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_http",
        }
    }
)


def _raw_400(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    head.extend(name + b": " + value + b"\r\n" for name, value in default_headers)
    head.append(b"content-type: application/json\r\n")
    head.append(b"content-length: %d\r\n" % len(INVALID_HTTP_BODY))
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + INVALID_HTTP_BODY


class _OpenAIErrors:
    """Mixed into uvicorn's protocols: their plain-text 400, as an OpenAI error."""

    transport: asyncio.Transport
    server_state: ServerState

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_raw_400(self.server_state.default_headers))
        self.transport.close()


class H11OpenAIErrors(_OpenAIErrors, H11Protocol):
    """h11 (pure Python) with OpenAI-shaped 400s."""


class HttpToolsOpenAIErrors(_OpenAIErrors, HttpToolsProtocol):
    """httptools (the fast parser, what `serve` uses) with OpenAI-shaped 400s."""
