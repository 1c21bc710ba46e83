"""Admin endpoints under `/admin/`, behind the separate admin key.

Off (404) when `server.admin_key` is not set. They show health and quota
state, switch providers off and on (drills), and reload the config. Nothing
here prints a key. The HTML status page (`GET /status`, rendered by
`proxy.status`) is served from here too: the admin key is its HTTP Basic
password, so that a browser asks for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.errors import AuthenticationFailed, ProxyError, error_body
from proxy.intake import authenticate, credentials, read_body
from proxy.quota import quota_day
from proxy.state import ReplayStats, StoreUnavailable
from proxy.status import HEADERS, REALM, ProviderView, QuotaToday, StatusView, Usage, refresh_seconds, render

if TYPE_CHECKING:
    from proxy.runtime import Runtime
    from proxy.service import Service


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _not_found(message: str) -> Response:
    return Response(error_body(message, "invalid_request_error", "not_found"), 404, media_type="application/json")


class AdminHandlers:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/admin/status", self.status, methods=["GET"]),
            Route("/admin/providers", self.providers, methods=["GET"]),
            Route("/admin/providers/{name}/disable", self.disable, methods=["POST"]),
            Route("/admin/providers/{name}/enable", self.enable, methods=["POST"]),
            Route("/admin/reload", self.reload, methods=["POST"]),
        ]

    def _admit(self, request: Request) -> Runtime | Response:
        """The runtime, or the response refusing the caller."""
        runtime = self.service.runtime
        if runtime is None or runtime.admin_digest is None:
            return _not_found("The admin endpoints are off: set server.admin_key to turn them on.")
        try:
            authenticate(request, (runtime.admin_digest,), admin=True)
        except AuthenticationFailed as exc:
            return _error(exc)
        return runtime

    async def status(self, request: Request) -> Response:
        runtime = self._admit(request)
        if isinstance(runtime, Response):
            return runtime
        config = runtime.config
        providers: dict[str, Any] = {}
        for name, health in runtime.health.snapshot().items():
            off = config.providers[name].disabled_reason  # no key: left out by the config
            providers[name] = {
                "state": "disabled" if off else health.state.value,
                "breaker": health.breaker.value,
                "reason": off or health.reason,
                "disabled": bool(off) or health.disabled,
                "ttft_s": health.ttft,
                "local": config.providers[name].local,
                "quota": await self._quota(runtime, name),
            }
        return _json(
            {
                "config": {
                    "source": config.source,
                    "sha256": self.service.config_hash or None,
                    "routes": sorted(config.routes),
                },
                "store": runtime.store.kind,
                "store_queue": _queue(runtime.store.replay_stats()),
                "providers": providers,
            }
        )

    async def _quota(self, runtime: Runtime, name: str) -> dict[str, Any] | None:
        today = await quota_today(runtime, name)
        if today is None:
            return None
        if today.error:
            return {"day": today.day, "error": today.error}
        requests, tokens = today.requests or Usage(0, None), today.tokens or Usage(0, None)
        return {
            "day": today.day,
            "requests_used": requests.used,
            "requests_per_day": requests.limit,
            "tokens_used": tokens.used,
            "tokens_per_day": tokens.limit,
        }

    async def providers(self, request: Request) -> Response:
        """Per provider: health state, breaker, why, last error, quota used and left today, disabled."""
        runtime = self._admit(request)
        if isinstance(runtime, Response):
            return runtime
        views = await self.provider_views(runtime)
        return _json({"store": runtime.store.kind, "providers": {name: provider_json(v) for name, v in views.items()}})

    async def provider_views(self, runtime: Runtime) -> dict[str, ProviderView]:
        """Every provider's health (this replica's view, kept in step through the
        store), today's quota (asked of the store) and last error (this process)."""
        health = runtime.health.snapshot()
        names = list(runtime.config.providers)
        quotas = await asyncio.gather(*(quota_today(runtime, name) for name in names))
        last_errors = self.service.observer.recent.last_errors
        return {
            name: ProviderView(name, runtime.config.providers[name].local, health[name], quota, last_errors.get(name))
            for name, quota in zip(names, quotas, strict=True)
        }

    async def status_page(self, request: Request) -> Response:
        """`GET /status`: the HTML status page, the admin key as HTTP Basic password."""
        runtime = self._admit_page(request)
        if isinstance(runtime, Response):
            return runtime
        view = StatusView(
            config=runtime.config,
            providers=await self.provider_views(runtime),
            failovers=self.service.observer.recent.latest(),
            store=runtime.store.kind,
            config_sha256=self.service.config_hash,
            now=time.time(),
            refresh_seconds=refresh_seconds(request.query_params.get("refresh")),
        )
        return HTMLResponse(render(view), headers=HEADERS)

    def _admit_page(self, request: Request) -> Runtime | Response:
        """The runtime, or the response refusing the browser: a 401 with a Basic
        challenge (the browser asks for a user name and password: any name, the
        admin key). A bearer admin key is accepted as well (curl, scripts)."""
        runtime = self.service.runtime
        if runtime is None or runtime.admin_digest is None:
            return _not_found("The status page is off: set server.admin_key to turn it on.")
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return self._admit(request)
        password = basic_password(header)
        candidate = hashlib.sha256((password or "").encode()).digest()
        if hmac.compare_digest(candidate, runtime.admin_digest) and password is not None:
            return runtime
        message = "Incorrect admin key provided." if password is not None else "Sign in with the admin key as password."
        challenge = {"www-authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}
        return Response(AuthenticationFailed(message).body(), 401, headers=challenge, media_type="application/json")

    def _provider(self, request: Request) -> tuple[Runtime, str] | Response:
        """The runtime and the named provider, or the response refusing the call."""
        runtime = self._admit(request)
        if isinstance(runtime, Response):
            return runtime
        name: str = request.path_params["name"]
        if name not in runtime.config.providers:
            return _not_found(f"No provider named '{name}'.")
        return runtime, name

    async def disable(self, request: Request) -> Response:
        found = self._provider(request)
        if isinstance(found, Response):
            return found
        runtime, name = found
        reason = await _reason(request)
        runtime.health.disable(name, f"disabled by operator: {reason}")
        return _json({"provider": name, "disabled": True, "reason": reason})

    async def enable(self, request: Request) -> Response:
        found = self._provider(request)
        if isinstance(found, Response):
            return found
        runtime, name = found
        runtime.health.enable(name)
        off = runtime.config.providers[name].disabled_reason  # the operator's switch is lifted, not the config's
        return _json(
            {"provider": name, "disabled": True, "reason": off} if off else {"provider": name, "disabled": False}
        )

    async def reload(self, request: Request) -> Response:
        runtime = self._admit(request)
        if isinstance(runtime, Response):
            return runtime
        outcome = await self.service.reload("POST /admin/reload")
        return _json(outcome, 200 if outcome["reloaded"] else 422)


async def quota_today(runtime: Runtime, name: str) -> QuotaToday | None:
    """A provider's quota used today, from the store; None when it has no quota."""
    quota = runtime.config.providers[name].quota
    if quota is None:
        return None
    day = quota_day(time.time(), runtime.quota.zone)
    try:
        requests, tokens = await runtime.store.usage(name, day)
    except StoreUnavailable as exc:
        return QuotaToday(day, error=exc.reason)
    return QuotaToday(day, Usage(requests, quota.requests_per_day), Usage(tokens, quota.tokens_per_day))


def provider_json(view: ProviderView) -> dict[str, Any]:
    """One provider in `GET /admin/providers`."""
    health, error = view.health, view.last_error
    return {
        "state": health.state.value,
        "breaker": health.breaker.value,
        "reason": health.reason or None,
        "disabled": health.disabled,
        "local": view.local,
        "ttft_s": health.ttft,
        "last_error": None if error is None else {"at": error.at, "outcome": error.outcome, "detail": error.detail},
        "quota": _quota_json(view.quota),
    }


def _quota_json(quota: QuotaToday | None) -> dict[str, Any] | None:
    if quota is None:
        return None
    if quota.error:
        return {"day": quota.day, "error": quota.error}
    return {"day": quota.day, "requests": _usage_json(quota.requests), "tokens": _usage_json(quota.tokens)}


def _usage_json(usage: Usage | None) -> dict[str, int | None]:
    usage = usage or Usage(0, None)
    return {"used": usage.used, "limit": usage.limit, "left": usage.left}


def basic_password(header: str) -> str | None:
    """The password of an `Authorization: Basic …` header (any user name), or None."""
    scheme, token = credentials(header)
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon else None


def _queue(stats: ReplayStats) -> dict[str, int]:
    return {"pending": stats.pending, "replayed": stats.replayed, "dropped": stats.dropped}


def _error(exc: ProxyError) -> Response:
    return Response(exc.body(), exc.status_code, headers=exc.headers(), media_type="application/json")


async def _reason(request: Request) -> str:
    try:
        body = await read_body(request, 4096)
    except ProxyError:
        return "drill"
    if not body:
        return "drill"
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "drill"
    reason = parsed.get("reason") if isinstance(parsed, dict) else None
    return reason[:200] if isinstance(reason, str) and reason else "drill"
