"""Browser clients from other origins (CORS), as OpenAI's own API allows them:
every origin when `auth.keys` are set (a page must hold a key), none for a
keyless proxy (any page the user opens could otherwise spend its providers'
quotas), `server.cors_origins` chooses. Starlette's `CORSMiddleware` does the
work, only for requests that carry an `Origin` header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Scope

from proxy.config import Config

# What a page's script may read of an answer (a browser hides other headers of a cross-origin answer).
EXPOSED_HEADERS: Final = (
    "x-request-id",
    "x-proxy-provider",
    "x-proxy-route",
    "x-proxy-attempts",
    "x-proxy-skips",
    "x-proxy-fallbacks",
    "x-proxy-trimmed",
    "x-proxy-last-resort",
    "retry-after",
)


def cors_origins(config: Config) -> tuple[str, ...]:
    """The origins whose pages may call the proxy: `server.cors_origins`, else
    every origin when `auth.keys` are set and none when the proxy is keyless."""
    if config.server.cors_origins is not None:
        return config.server.cors_origins
    return ("*",) if config.auth_keys else ()


def from_a_browser(scope: Scope) -> bool:
    """Whether an HTTP request carries an `Origin` header (a browser's cross-origin call)."""
    # A loop, not `any(...)`: this runs on every request, and a generator costs more than the scan.
    for name, _ in scope["headers"]:  # noqa: SIM110
        if name == b"origin":
            return True
    return False


class BrowserOrigins:
    """`CORSMiddleware` around `app` for the origins the current config allows,
    built again when a reload changes them."""

    __slots__ = ("_app", "_config", "_cors")

    def __init__(self, app: ASGIApp, config: Callable[[], Config]) -> None:
        self._app = app
        self._config = config
        self._cors: tuple[tuple[str, ...], CORSMiddleware] | None = None

    def middleware(self) -> CORSMiddleware | None:
        """None: no origin is allowed (the request is served as any other)."""
        origins = cors_origins(self._config())
        if not origins:
            return None
        if self._cors is None or self._cors[0] != origins:
            cors = CORSMiddleware(
                self._app,
                allow_origins=origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],  # the SDKs send their own (`x-stainless-*`, `openai-beta`): echoed
                expose_headers=EXPOSED_HEADERS,
                max_age=600,
            )
            self._cors = (origins, cors)
        return self._cors[1]
