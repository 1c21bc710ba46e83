"""The ASGI app: `create_app(config, ...)` builds everything a request needs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute
from starlette.types import Message, Receive, Scope, Send

from proxy.adapters import Adapter, Limits, make_adapter
from proxy.background import Background
from proxy.config import Config, RedisSettings
from proxy.dispatch import Dispatcher, StreamStart
from proxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ProviderError,
    ProxyError,
    error_body,
)
from proxy.health import HealthBoard
from proxy.alerts import Alerter, Webhook
from proxy.observe import AlertCounters, Metrics, Observer, OperatorEvents, RequestRecord, event
from proxy.quota import QuotaGate
from proxy.relay import client_stream
from proxy.shaping import needs_of
from proxy.state import MemoryStore, RedisStore, StateStore, StoreUnavailable

log = logging.getLogger("fallback_proxy")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def default_transport() -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection pool: several times cheaper per
    request than httpx's own transport on our machines."""
    from httpx_aiohttp import AiohttpTransport

    transport: httpx.AsyncBaseTransport = AiohttpTransport(
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30)
    )
    return transport


def open_store(settings: RedisSettings) -> StateStore:
    """Redis when a URL is configured (shared by replicas), else in-process."""
    if settings.url is None:
        return MemoryStore()
    return RedisStore.from_url(
        settings.url, prefix=settings.prefix, timeout=settings.timeout, breaker_seconds=settings.breaker_seconds
    )


class ProxyState:
    """What the request handlers share; built in the lifespan."""

    def __init__(self, config: Config, registry: CollectorRegistry, store: StateStore | None) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        self.observer = Observer(self.metrics)
        self.events = OperatorEvents(self.metrics)
        self.key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in config.auth_keys)
        self.store = store
        self.client: httpx.AsyncClient | None = None
        self.dispatcher: Dispatcher | None = None
        self.health: HealthBoard | None = None
        self.background = Background()
        self.alerts: Alerter | None = None
        self.ready = False

    async def start(self, transport: httpx.AsyncBaseTransport | None) -> None:
        config = self.config
        store = self.store = self.store or open_store(config.redis)
        self.client = httpx.AsyncClient(transport=transport or default_transport(), follow_redirects=False)
        self.alerts = _alerter(config, self.client, self.metrics)
        if self.alerts is not None:
            await self.alerts.start()
            self.events.alerts = self.observer.alerts = self.alerts
        adapters: dict[str, Adapter] = {
            name: make_adapter(provider, self.client) for name, provider in config.providers.items()
        }
        self.health = HealthBoard(config.health, config.providers, store, self.events)
        quota = QuotaGate(store, config.quota_timezone, self.events)
        self.dispatcher = Dispatcher(config, adapters, self.health, quota)
        await self.health.refresh()
        if store.kind != "memory":
            self.background.spawn(self.health.follow())
        self.background.spawn(self.health.probe_forever(_probes(config, adapters)))
        for name, provider in config.providers.items():
            if provider.warmup:
                self.background.spawn(_warm_up(name, adapters[name]))
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.background.aclose()
        if self.dispatcher is not None:
            await self.dispatcher.aclose()
        if self.health is not None:
            await self.health.aclose()
        if self.alerts is not None:
            await self.alerts.aclose()
        if self.client is not None:
            await self.client.aclose()
        if self.store is not None:
            await self.store.aclose()


def _alerter(config: Config, client: httpx.AsyncClient, metrics: Metrics) -> Alerter | None:
    settings = config.alerts
    if not settings.webhooks:
        return None
    hooks = [
        Webhook(url=h.url, format=h.format, events=h.events, chat_id=h.chat_id, timeout=h.timeout)
        for h in settings.webhooks
    ]
    return Alerter(hooks, client, dedupe_seconds=settings.dedupe_seconds, metrics=AlertCounters(metrics),
                   instance=socket.gethostname())


async def _warm_up(name: str, adapter: Adapter) -> None:
    """Load a local model at start (in the background: readiness does not wait)."""
    warmup = getattr(adapter, "warmup", None)
    if warmup is None:
        return
    started = time.perf_counter()
    try:
        await warmup()
    except ProviderError as exc:
        event("warmup_failed", logging.WARNING, provider=name, failure=exc.failure.value, detail=exc.message)
        return
    event("warmed_up", provider=name, ms=round((time.perf_counter() - started) * 1000, 1))


def _probes(config: Config, adapters: Mapping[str, Adapter]) -> dict[str, Callable[[], Awaitable[None]]]:
    timeout = config.health.probe_timeout_seconds
    limits = Limits(connect=timeout, read=timeout)
    return {
        name: functools.partial(adapters[name].probe, limits)
        for name, provider in config.providers.items()
        if provider.probe
    }


def create_app(
    config: Config,
    *,
    store: StateStore | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """Build the proxy for one config. `store` replaces the state store that
    `config.redis` names; `transport` the upstream HTTP transport (tests pass
    `httpx.MockTransport`); `registry` the metrics registry."""
    state = ProxyState(config, registry or CollectorRegistry(auto_describe=True), store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start(transport)
        log.info("ready: %d providers, %d routes, %s state", len(config.providers), len(config.routes),
                 state.store.kind if state.store else "?")
        try:
            yield
        finally:
            await state.stop()

    handlers = Handlers(state)
    routes = [
        HttpRoute("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        HttpRoute("/chat/completions", handlers.chat_completions, methods=["POST"]),
        HttpRoute("/v1/models", handlers.models, methods=["GET"]),
        HttpRoute("/v1/models/{model:path}", handlers.model, methods=["GET"]),
        HttpRoute("/healthz", handlers.healthz, methods=["GET"]),
        HttpRoute("/readyz", handlers.readyz, methods=["GET"]),
        HttpRoute("/metrics", handlers.metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
    )
    app.state.proxy = state
    return app


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> Response:
    return json_response(exc.body(), exc.status_code, {**exc.headers(), **(headers or {})})


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return json_response(error_body(message, error_type, None), exc.status_code, dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    body = error_body("The proxy hit an internal error; it has been logged.", "server_error", "internal_error")
    return json_response(body, 500)


class Handlers:
    """The HTTP endpoints, over one `ProxyState`."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def chat_completions(self, request: Request) -> Response:
        state = self.state
        record = RequestRecord(request_id=_request_id(request), route="-", stream=False)
        try:
            self._authenticate(request)
            payload = parse_chat_request(await read_body(request, state.config.server.max_body_bytes))
            model = payload["model"]
            route = state.config.route_for(model)
            if route is None:
                raise ModelNotFound(model, list(state.config.routes), list(state.config.providers))
            record.route = route.name
            record.stream = payload.get("stream") is True
            needs = needs_of(payload, request.headers.get("x-proxy-local-only"))
            assert state.dispatcher is not None
            if record.stream:
                start = await state.dispatcher.open_stream(route, payload, needs, record)
                return self._stream_response(start, record)
            completion = await state.dispatcher.complete(route, payload, needs, record)
        except ProxyError as exc:
            record.status = exc.status_code
            record.outcome = exc.code or exc.error_type
            state.observer.finish(record)
            return error_response(exc, record.headers() if record.route != "-" else {"x-request-id": record.request_id})
        state.observer.finish(record)
        return json_response(completion.body, headers=record.headers())

    def _stream_response(self, start: StreamStart, record: RequestRecord) -> Response:
        def on_end(outcome: str, failure: ProviderError | None) -> None:
            record.outcome = outcome
            assert self.state.dispatcher is not None
            self.state.dispatcher.stream_ended(start, record, failure)
            self.state.observer.finish(record)

        body = client_stream(start, record, on_end)
        return SSEResponse(body, headers={**SSE_HEADERS, **record.headers()})

    def _authenticate(self, request: Request) -> None:
        digests = self.state.key_digests
        if not digests:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("Missing bearer key: send 'Authorization: Bearer <key>'.")
        candidate = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for digest in digests:
            matched |= hmac.compare_digest(candidate, digest)
        if not matched:
            raise AuthenticationFailed("Incorrect API key provided.")

    async def models(self, request: Request) -> Response:
        config = self.state.config
        data = [_model_entry(name, "route") for name in config.routes]
        data += [_model_entry(name, "provider") for name in config.providers]
        return json_response(orjson.dumps({"object": "list", "data": data}))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        config = self.state.config
        if name in config.routes:
            return json_response(orjson.dumps(_model_entry(name, "route")))
        if name in config.providers:
            return json_response(orjson.dumps(_model_entry(name, "provider")))
        return error_response(ModelNotFound(name, list(config.routes), list(config.providers)))

    async def healthz(self, request: Request) -> Response:
        return json_response(b'{"status":"ok"}')

    async def readyz(self, request: Request) -> Response:
        state = self.state
        body = {
            "ready": state.ready,
            "config": state.config.source or "(in memory)",
            "routes": len(state.config.routes),
            "providers": len(state.config.providers),
            "store": await self._store_status(),
            "health": {
                name: {"state": h.state.value, "breaker": h.breaker.value, "reason": h.reason}
                for name, h in (state.health.snapshot() if state.health else {}).items()
            },
        }
        return json_response(orjson.dumps(body), 200 if state.ready else 503)

    async def _store_status(self) -> dict[str, str]:
        store = self.state.store
        if store is None:
            return {"kind": "none", "status": "not started"}
        if store.kind == "memory":
            return {"kind": "memory", "status": "ok (in process: one instance only)"}
        try:
            await store.ping()
        except StoreUnavailable as exc:
            # Still ready: health falls back to this replica's view and quota'd
            # providers are skipped (fail closed), but the proxy answers.
            return {"kind": store.kind, "status": f"unavailable: {exc.reason}"}
        return {"kind": store.kind, "status": "ok"}

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_entry(name: str, kind: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": f"fallback-proxy:{kind}"}


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(limit)
        parts.append(part)
    return b"".join(parts)


def parse_chat_request(body: bytes) -> dict[str, Any]:
    """Parse and check a chat-completions body; OpenAI-shaped 400s otherwise."""
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON chat completions request.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter (a route or provider name).", param="model")
    _check_messages(payload.get("messages"))
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    return payload


def _check_messages(messages: object) -> None:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of message objects.", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}; got {role!r}.", param=f"{where}.role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(f"'{where}.content' must be a string or an array of parts.", param=f"{where}.content")


class SSEResponse(Response):
    """A server-sent-event response that always closes its source: when the
    stream ends, fails, or the client goes away mid-stream."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, task))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were sending
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise
            task.uncancel()  # the watcher saw the client go away: nothing more to send
        finally:
            watcher.cancel()
            await self.chunks.aclose()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


