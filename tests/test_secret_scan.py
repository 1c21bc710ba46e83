"""The suite's own guard: a response showing a configured secret is caught."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.conftest import ServedApp


def test_a_response_that_shows_a_secret_is_caught(serve_asgi: Callable[[ASGIApp], ServedApp]) -> None:
    async def leaky(request: Request) -> PlainTextResponse:
        return PlainTextResponse("upstream said: bad key sk-upstream-123", headers={"x-debug": "admin-secret"})

    served = serve_asgi(Starlette(routes=[Route("/leak", leaky)]))
    assert httpx.get(served.url + "/leak").status_code == 200
    leaks = list(served.scan.leaks)
    served.scan.leaks.clear()  # caught here on purpose: the fixture's teardown would fail the test
    assert any("'sk-upstream'" in leak and "GET /leak" in leak for leak in leaks)
    assert any("'admin-secret'" in leak for leak in leaks)
