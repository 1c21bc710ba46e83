"""Admin endpoints under `/admin/`, behind the separate admin key.

Off (404) when `server.admin_key` is not set. They show health and quota
state, switch providers off and on (drills), and reload the config. Nothing
here prints a key.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from proxy.errors import AuthenticationFailed, ProxyError, error_body
from proxy.intake import authenticate, read_body
from proxy.quota import quota_day
from proxy.state import ReplayStats, StoreUnavailable

if TYPE_CHECKING:
    from proxy.app import ProxyState
    from proxy.runtime import Runtime


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _not_found(message: str) -> Response:
    return Response(error_body(message, "invalid_request_error", "not_found"), 404, media_type="application/json")


class AdminHandlers:
    def __init__(self, state: ProxyState) -> None:
        self.state = state

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/admin/status", self.status, methods=["GET"]),
            Route("/admin/providers/{name}/disable", self.disable, methods=["POST"]),
            Route("/admin/providers/{name}/enable", self.enable, methods=["POST"]),
            Route("/admin/reload", self.reload, methods=["POST"]),
        ]

    def _admit(self, request: Request) -> Runtime | Response:
        """The runtime, or the response refusing the caller."""
        runtime = self.state.runtime
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
                    "sha256": self.state.config_hash or None,
                    "routes": sorted(config.routes),
                },
                "store": runtime.store.kind,
                "store_queue": _queue(runtime.store.replay_stats()),
                "providers": providers,
            }
        )

    async def _quota(self, runtime: Runtime, name: str) -> dict[str, Any] | None:
        quota = runtime.config.providers[name].quota
        if quota is None:
            return None
        day = quota_day(time.time(), runtime.quota.zone)
        try:
            requests, tokens = await runtime.store.usage(name, day)
        except StoreUnavailable as exc:
            return {"day": day, "error": exc.reason}
        return {
            "day": day,
            "requests_used": requests,
            "requests_per_day": quota.requests_per_day,
            "tokens_used": tokens,
            "tokens_per_day": quota.tokens_per_day,
        }

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
        outcome = await self.state.reload("POST /admin/reload")
        return _json(outcome, 200 if outcome["reloaded"] else 422)


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
