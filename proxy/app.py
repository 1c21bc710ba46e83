"""The ASGI app: `create_app(config, ...)` builds everything a request needs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.admin import AdminHandlers
from proxy.config import Config, Route
from proxy.cors import BrowserOrigins, from_a_browser
from proxy.embeddings import answer_body, embedding_needs, in_space
from proxy.errors import (
    AllProvidersFailed,
    Attempt,
    ModelNotFound,
    ProviderError,
    ProxyError,
    ServerOverloaded,
    error_body,
)
from proxy.intake import (
    authenticate,
    check_headers,
    header,
    parse_chat_request,
    parse_embeddings_request,
    parse_json_object,
    read_body,
)
from proxy.json_body import json_response
from proxy.limits import Ticket, client_id
from proxy.observe import RequestRecord
from proxy.openapi import openapi_spec
from proxy.overload import InFlight
from proxy.responses import ResponsesEncoder, ResponsesStream, from_completion, translate
from proxy.runtime import Runtime
from proxy.service import Service, listen_for_sighup
from proxy.shaping import needs_of
from proxy.state import StateStore, StoreUnavailable
from proxy.stream import ChatEncoder, Encoder, SSEResponse, StreamSession

if TYPE_CHECKING:
    pass

log = logging.getLogger("fallback_proxy")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def create_app(
    config: Config,
    *,
    store: StateStore | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """Build the proxy for one config. `store` replaces the state store that
    `config.redis` names; `transport` the transport of the httpx client used
    for alert webhooks and litellm's `acompletion` fallback (the adapters call
    providers through a pooled aiohttp session); `registry` the metrics registry."""
    service = Service(config, registry or CollectorRegistry(auto_describe=True), store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start(transport)
        hangup = listen_for_sighup(service)
        log.info(
            "ready: %d providers, %d routes, %s state",
            len(config.providers),
            len(config.routes),
            service.store.kind if service.store else "?",
        )
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.stop()

    handlers = Handlers(service)
    admin = AdminHandlers(service)
    routes = [
        HttpRoute("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        HttpRoute("/chat/completions", handlers.chat_completions, methods=["POST"]),
        HttpRoute("/v1/responses", handlers.responses, methods=["POST"]),
        HttpRoute("/v1/embeddings", handlers.embeddings, methods=["POST"]),
        HttpRoute("/v1/models", handlers.models, methods=["GET"]),
        HttpRoute("/v1/models/{model:path}", handlers.model, methods=["GET"]),
        HttpRoute("/healthz", handlers.healthz, methods=["GET"]),
        HttpRoute("/readyz", handlers.readyz, methods=["GET"]),
        HttpRoute("/metrics", handlers.metrics, methods=["GET"]),
        HttpRoute("/openapi.json", handlers.openapi, methods=["GET"]),
        HttpRoute("/status", admin.status_page, methods=["GET"]),
        *admin.routes(),
    ]
    app = ProxyApp(
        handlers.chat_completions_asgi,
        service.in_flight,
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception},
        middleware=[Middleware(InternalErrors)],
    )
    app.state.service = service
    return app


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> Response:
    return json_response(exc.body(), exc.status_code, {**exc.headers(), **(headers or {})})


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return json_response(error_body(message, error_type, None), exc.status_code, dict(exc.headers or {}))


CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


class ProxyApp(Starlette):
    """Starlette for every route but the hot one: `POST` to the chat
    completions paths goes straight to its raw ASGI handler, so a stream's
    sends reach the server without Starlette's middleware and routing layers
    (three send wrappers per chunk). Other methods on those paths still meet
    their Starlette routes (a 405), and `InternalErrors` still guards them.

    Every proxied request (`POST` to `/v1/...` and the chat paths) is counted
    in flight for exactly as long as its response lasts, a stream to its last
    byte; when the worker is full (`server.max_in_flight`) a new one is refused
    at once with 503 `server_overloaded` and `Retry-After`, before its body is
    read, and those in flight go on unaffected. A browser's request (one with
    an `Origin` header) meets the CORS layer first (`proxy.cors`)."""

    def __init__(self, chat: ASGIApp, in_flight: InFlight, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat = chat
        self.in_flight = in_flight
        self.browsers = BrowserOrigins(self._serve, lambda: self.state.service.config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and from_a_browser(scope):
            cors = self.browsers.middleware()
            if cors is not None:
                await cors(scope, receive, send)
                return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if path is None or not (path in CHAT_PATHS or path.startswith("/v1/")):
            await super().__call__(scope, receive, send)
            return
        in_flight = self.in_flight
        if not in_flight.enter():
            await _shed(send, in_flight.limit)
            return
        try:
            if path in CHAT_PATHS:
                scope["app"] = self
                await self.chat(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        finally:
            in_flight.leave()


def _route_path(scope: Scope) -> str:
    """The path the routes see: without the `root_path` the app is mounted under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _shed(send: Send, limit: int) -> None:
    """The whole answer to a request this worker has no room for: two sends, no body read."""
    refused = ServerOverloaded(limit)
    body = refused.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", os.urandom(16).hex().encode()),
        *((name.encode(), value.encode()) for name, value in refused.headers().items()),
    ]
    await send({"type": "http.response.start", "status": refused.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def internal_error(scope: Scope, receive: Receive, send: Send) -> None:
    """Log the exception being handled (once) and answer an OpenAI-shaped 500."""
    log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
    body = error_body("The proxy hit an internal error; it has been logged.", "server_error", "internal_error")
    await json_response(body, 500)(scope, receive, send)


class InternalErrors:
    """The last line: a bug becomes one logged traceback and an OpenAI-shaped
    500, and the connection stays usable. (Starlette's own handler for
    `Exception` answers, then raises again, so uvicorn logs it twice and drops
    the connection.) Once a response has started there is nothing to answer:
    the error goes on to the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # the one place a bug in any Starlette endpoint is caught, logged and answered
            if started:
                raise
            await internal_error(scope, receive, send)


class Handlers:
    """The HTTP endpoints, over one `Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def chat_completions_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`chat_completions` as a raw ASGI app, with `InternalErrors`' guarantee:
        every response it builds starts with its first send, so anything raised
        before that is answered here."""
        try:
            response = await self.chat_completions(Request(scope, receive))
        except Exception:  # the one place a bug in this endpoint is caught, logged and answered
            await internal_error(scope, receive, send)
            return
        await response(scope, receive, send)

    async def chat_completions(self, request: Request) -> Response:
        service = self.service
        runtime = service.runtime  # this request stays on it, even if a reload swaps it
        assert runtime is not None
        config = runtime.config
        record = RequestRecord(request_id=_request_id(request), route="-", stream=False)
        if service.tracing is not None:  # telemetry hook: the request span, continuing the client's trace
            record.trace = service.tracing.on_request_start(request.headers, request.scope["path"], record)
        ticket: Ticket | None = None
        try:
            check_headers(request, config.limits.max_header_bytes)
            authenticate(request, runtime.key_digests)
            body = await read_body(request, config.server.max_body_bytes)
            payload = parse_chat_request(body, config.limits.max_messages)
            ticket = await runtime.limits.enter(
                client_id(header(request, b"authorization")), payload.get("stream") is True
            )
            model = payload["model"]
            route = config.route_for(model)
            if route is None:
                raise ModelNotFound(model, list(config.routes), list(config.providers))
            record.route = route.name
            record.stream = payload.get("stream") is True
            needs = needs_of(payload, header(request, b"x-proxy-local-only"))
            if record.stream:
                session = StreamSession(runtime.dispatcher, route, payload, needs, record)
                await session.open()
                stream_ticket, ticket = ticket, None  # the stream gives it back when it ends
                return self._stream_response(runtime, session, record, stream_ticket, ChatEncoder())
            completion = await runtime.dispatcher.complete(route, payload, needs, record)
        except ProxyError as exc:
            record.status = exc.status_code
            record.outcome = exc.code or exc.error_type
            service.observer.finish(record)
            return error_response(exc, record.headers() if record.route != "-" else {"x-request-id": record.request_id})
        finally:
            if ticket is not None:
                await runtime.limits.leave(ticket)
        service.observer.finish(record)
        return json_response(completion.body, headers=record.headers())

    def _stream_response(
        self, runtime: Runtime, session: StreamSession, record: RequestRecord, ticket: Ticket | None, encoder: Encoder
    ) -> Response:
        def on_end(outcome: str, failure: ProviderError | None) -> None:
            record.outcome = outcome
            if failure is not None:  # a provider failed after its first token: say who and why in the log
                record.interruption = Attempt(
                    failure.provider, failure.failure.value, 0.0, failure.message, failure.cause
                )
            record.continued = session.continued
            self.service.observer.finish(record)
            if ticket is not None and ticket.lease is not None:  # without a lease there is nothing to give back
                runtime.dispatcher.background.spawn(runtime.limits.leave(ticket))

        response: SSEResponse
        body = session.serve(encoder, on_end, lambda: response.cut_reason)
        response = SSEResponse(
            body,
            headers={**SSE_HEADERS, **record.headers()},
            shutdown=encoder.shutting_down,
            final=encoder.final,
            write_timeout=runtime.config.limits.client_write_timeout_seconds,
            broken=encoder.broken,
        )
        return response

    async def embeddings(self, request: Request) -> Response:
        """`POST /v1/embeddings`: the checks, walk, headers and accounting of chat,
        within the vector space of the route's first provider."""
        runtime = self.service.runtime
        assert runtime is not None
        record = RequestRecord(request_id=_request_id(request), route="-", stream=False, endpoint="embeddings")
        self._trace(request, record, "embeddings")
        ticket: Ticket | None = None
        try:
            payload = parse_embeddings_request(await self._admitted_body(request, runtime))
            ticket = await runtime.limits.enter(client_id(header(request, b"authorization")), False)
            route = _route(runtime, payload["model"], record)
            needs = embedding_needs(runtime.config, route, payload, header(request, b"x-proxy-local-only"))
            try:
                answer = await runtime.dispatcher.embed(route, payload, needs, record)
            except AllProvidersFailed as exc:
                raise in_space(exc, needs.embedding_space or "", route.name) from exc
            content = answer_body(answer, payload)
        except ProxyError as exc:
            return self._refused(record, exc)
        finally:
            if ticket is not None:
                await runtime.limits.leave(ticket)
        self.service.observer.finish(record)
        return json_response(content, headers=record.headers())

    async def responses(self, request: Request) -> Response:
        """`POST /v1/responses`: translated to a chat request for the same walk, the
        answer translated back into a `Response` (or its event stream)."""
        runtime = self.service.runtime
        assert runtime is not None
        record = RequestRecord(request_id=_request_id(request), route="-", stream=False, endpoint="responses")
        self._trace(request, record, "chat")  # GenAI conventions: a Responses call is a chat operation
        ticket: Ticket | None = None
        try:
            payload = parse_json_object(await self._admitted_body(request, runtime), "Responses request")
            chat, echo = translate(payload)
            record.stream = payload.get("stream") is True
            ticket = await runtime.limits.enter(client_id(header(request, b"authorization")), record.stream)
            route = _route(runtime, payload["model"], record)
            needs = needs_of(chat, header(request, b"x-proxy-local-only"))
            if record.stream:
                chat["stream"] = True
                chat["stream_options"] = {"include_usage": True}
                session = StreamSession(runtime.dispatcher, route, chat, needs, record)
                await session.open()
                stream_ticket, ticket = ticket, None  # the stream gives it back when it ends
                encoder = ResponsesEncoder(ResponsesStream(echo, record.model or payload["model"]))
                return self._stream_response(runtime, session, record, stream_ticket, encoder)
            completion = await runtime.dispatcher.complete(route, chat, needs, record)
            content = orjson.dumps(from_completion(orjson.loads(completion.body), echo))
        except ProxyError as exc:
            return self._refused(record, exc)
        finally:
            if ticket is not None:
                await runtime.limits.leave(ticket)
        self.service.observer.finish(record)
        return json_response(content, headers=record.headers())

    def _trace(self, request: Request, record: RequestRecord, operation: str) -> None:
        """The request's span, when traces are on."""
        tracing = self.service.tracing
        if tracing is not None:
            record.trace = tracing.on_request_start(request.headers, request.scope["path"], record, operation)

    async def _admitted_body(self, request: Request, runtime: Runtime) -> bytes:
        """The body of a request whose headers and key are fine (else a 431 or 401)."""
        config = runtime.config
        check_headers(request, config.limits.max_header_bytes)
        authenticate(request, runtime.key_digests)
        return await read_body(request, config.server.max_body_bytes)

    def _refused(self, record: RequestRecord, exc: ProxyError) -> Response:
        record.status = exc.status_code
        record.outcome = exc.code or exc.error_type
        self.service.observer.finish(record)
        return error_response(exc, record.headers() if record.route != "-" else {"x-request-id": record.request_id})

    def _key_refused(self, request: Request) -> Response | None:
        """A 401 for a `/v1` read without a valid key (when `auth.keys` is set)."""
        runtime = self.service.runtime
        try:
            authenticate(request, runtime.key_digests if runtime is not None else ())
        except ProxyError as exc:
            return error_response(exc)
        return None

    async def models(self, request: Request) -> Response:
        if (refused := self._key_refused(request)) is not None:
            return refused
        config = self.service.config
        data = [_model_entry(name, "route") for name in config.routes]
        data += [_model_entry(name, "provider") for name in config.providers]
        return json_response(orjson.dumps({"object": "list", "data": data}))

    async def model(self, request: Request) -> Response:
        if (refused := self._key_refused(request)) is not None:
            return refused
        name = request.path_params["model"]
        config = self.service.config
        if name in config.routes:
            return json_response(orjson.dumps(_model_entry(name, "route")))
        if name in config.providers:
            return json_response(orjson.dumps(_model_entry(name, "provider")))
        return error_response(ModelNotFound(name, list(config.routes), list(config.providers)))

    async def healthz(self, request: Request) -> Response:
        return json_response(b'{"status":"ok"}')

    async def readyz(self, request: Request) -> Response:
        """200 when this replica should get traffic: started, and not overloaded
        (above 90% of `server.max_in_flight`, until back below 70%)."""
        service = self.service
        in_flight = service.in_flight
        ready = service.ready and not in_flight.overloaded
        body: dict[str, object] = {
            "ready": ready,
            "config": service.config.source or "(in memory)",
            "routes": len(service.config.routes),
            "providers": len(service.config.providers),
            "store": await self._store_status(),
            "health": {
                name: {"state": h.state.value, "breaker": h.breaker.value, "reason": h.reason}
                | _disabled_by_config(service.config, name)
                for name, h in (service.runtime.health.snapshot() if service.runtime else {}).items()
            },
            "load": {**in_flight.status(), "event_loop_lag_seconds": round(service.lag.recent(), 4)},
        }
        if in_flight.overloaded:
            body["reason"] = (
                f"overloaded: {in_flight.count} requests in flight (not ready from {in_flight.high}, "
                f"ready again at {in_flight.low}; server.max_in_flight {in_flight.limit})"
            )
        return json_response(orjson.dumps(body), 200 if ready else 503)

    async def _store_status(self) -> dict[str, str]:
        store = self.service.store
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

    async def openapi(self, request: Request) -> Response:
        return json_response(orjson.dumps(openapi_spec()))

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _route(runtime: Runtime, model: str, record: RequestRecord) -> Route:
    """The route a request's `model` names (404 when none), noted on its record."""
    config = runtime.config
    route = config.route_for(model)
    if route is None:
        raise ModelNotFound(model, list(config.routes), list(config.providers))
    record.route = route.name
    return route


def _disabled_by_config(config: Config, name: str) -> dict[str, str]:
    """For a provider the config leaves out (no key), what /readyz shows instead of its health."""
    provider = config.providers.get(name)
    if provider is None or provider.disabled_reason is None:
        return {}
    return {"state": "disabled", "reason": provider.disabled_reason}


def _model_entry(name: str, kind: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": f"fallback-proxy:{kind}"}


def _request_id(request: Request) -> str:
    given = header(request, b"x-request-id")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return os.urandom(16).hex()  # as opaque as a uuid4's hex, without building a UUID
