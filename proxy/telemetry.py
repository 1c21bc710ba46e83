"""OpenTelemetry traces: one SERVER span per request, one CLIENT span per provider call.

Imported only when traces are on (`proxy.service.start_tracing`): with them off no
OpenTelemetry module is loaded and the core's hooks (`RequestHooks`,
`StreamHooks` in `proxy.observe`) cost a None check each.

    chat default                 SERVER  the client's request (its `traceparent` is the parent)
    ├── chat gpt-4o              CLIENT  a call to one provider: timeout      (`traceparent` sent upstream)
    │     (event fallback_proxy.skip: claude, quota_exhausted)        a skip makes no call: an event
    └── chat qwen2.5:7b          CLIENT  the next one answers (fallback_reason=timeout)

Attributes follow the GenAI semantic conventions (`gen_ai.*`, `server.*`,
`error.type`); our own facts are `fallback_proxy.*`. What a client asked and
what it was answered are never recorded: only request parameters (max_tokens,
temperature, top_p), names, counts, classes and timings. Error messages are
left out too (an upstream's error may quote the prompt): the failure class
says what happened, the log line says the rest.

Spans are exported by the SDK's `BatchSpanProcessor`: ending a span appends it
to a bounded queue (when full, the span is dropped) and a thread of its own
posts batches over OTLP/HTTP, so a slow, hanging or dead collector never holds
a request. At shutdown the last spans get one bounded flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import orjson
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from proxy.adapters.base import UPSTREAM_TRACE, Adapter, Chunk, Completion, Usage
from proxy.config import ProviderConfig, TelemetrySettings
from proxy.errors import FailureClass, ProviderError
from proxy.observe import AttemptCall, RequestRecord
from proxy.state import StoreUnavailable
from proxy.stream.live import LiveStream

T = TypeVar("T")
Attributes = dict[str, AttributeValue]

# litellm's provider prefixes whose GenAI `gen_ai.provider.name` differs from the prefix.
_GEN_AI_PROVIDERS: Final[Mapping[str, str]] = {
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "cohere_chat": "cohere",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
    "ollama_chat": "ollama",
}
_SHUTDOWN_SECONDS: Final = 5.0
_INTERRUPTED: Final = frozenset({"stream_interrupted", "internal_error"})


class Tracing:
    """The process's tracer: a `TracerProvider` of its own (never the global
    one), its batch exporter, and the spans of each request."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.provider = TracerProvider(sampler=_sampler(settings), resource=_resource(settings), shutdown_on_exit=False)
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            certificate_file=settings.certificate,
            client_key_file=settings.client_key,
            client_certificate_file=settings.client_certificate,
            headers=dict(settings.headers),
            timeout=settings.timeout,
            compression=Compression(settings.compression),
        )
        processor = BatchSpanProcessor(
            exporter,
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay * 1000,
            max_export_batch_size=settings.max_export_batch_size,
            export_timeout_millis=settings.timeout * 1000,
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("fallback_proxy", _version())
        self.propagator = TraceContextTextMapPropagator()
        self._providers: dict[tuple[str, str, str | None], Attributes] = {}
        # A full queue logs a warning for every span it drops: a line per request while the
        # collector is away. The exporter's own warnings (one per failed batch) stay.
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)

    def __repr__(self) -> str:
        return f"Tracing({self.settings.endpoint!r}, sampler={self.settings.sampler!r})"

    def on_request_start(
        self, headers: Mapping[str, str], path: str, record: RequestRecord, operation: str = "chat"
    ) -> RequestSpan:
        """The request's span, a child of the client's `traceparent` when it sent one."""
        parent = self.propagator.extract(headers)
        span = self.tracer.start_span(operation, context=parent, kind=SpanKind.SERVER)
        request = RequestSpan(self, span, operation)
        if request.recording:
            request.attributes.update(
                {
                    "gen_ai.operation.name": operation,
                    "http.request.method": "POST",
                    "url.path": path,
                    "fallback_proxy.request_id": record.request_id,
                }
            )
        return request

    def provider_attributes(self, provider: ProviderConfig) -> Attributes:
        """What every attempt on `provider` carries, worked out once per provider."""
        key = (provider.name, provider.model, provider.api_base)
        attributes = self._providers.get(key)
        if attributes is None:
            if len(self._providers) > 4096:  # reloads renamed providers many times over
                self._providers.clear()
            attributes = self._providers[key] = _provider_attributes(provider)
        return attributes

    def headers_for(self, span: Span) -> dict[str, str]:
        """The W3C `traceparent` (and `tracestate`) naming `span` as the parent."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=set_span_in_context(span))
        return carrier

    async def aclose(self, timeout: float = _SHUTDOWN_SECONDS) -> None:
        """Export what is queued and stop, waiting at most `timeout` seconds: a
        hanging collector is left to its daemon thread, not waited for."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=shutdown, name="otel-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, min(timeout, self.settings.timeout))


class RequestSpan:
    """One request's SERVER span and what its attempts need to know (the
    `RequestHooks` of `proxy.observe`). Attributes are gathered in a dict and
    set once, as the span ends: the SDK checks each one on every call."""

    __slots__ = (
        "_calls",
        "_continuing",
        "_fallback",
        "_parameters",
        "attributes",
        "context",
        "operation",
        "recording",
        "span",
        "tracing",
    )

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self.tracing = tracing
        self.span = span
        self.operation = operation
        self.recording = span.is_recording()
        self.context: Context = set_span_in_context(span)
        self._calls: dict[str, int] = {}
        self._fallback: tuple[str, str] | None = None  # the node the walk left last, and why
        self._continuing = False
        self._parameters = False
        self.attributes: Attributes = {}

    def traced(self, call: AttemptCall[T]) -> AttemptCall[T]:
        async def traced_call(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> T:
            attempt = AttemptSpan(self, provider, body)
            token = UPSTREAM_TRACE.set(attempt.headers)
            try:
                result = await call(adapter, provider, body, deadline)
            except BaseException as exc:  # noted on the span, and raised on unchanged
                attempt.failed(exc)
                raise
            finally:
                UPSTREAM_TRACE.reset(token)
            attempt.answered(result)
            return result

        return traced_call

    def attempt_attributes(self, provider: ProviderConfig, body: dict[str, Any]) -> Attributes:
        """Where this call stands in the walk: retry, fallback, continuation, quota."""
        retry = self._calls.get(provider.name, 0)
        self._calls[provider.name] = retry + 1
        if not self.recording:
            return {}
        parameters = _parameters(body)
        attributes = {
            "gen_ai.operation.name": self.operation,
            **self.tracing.provider_attributes(provider),
            **parameters,
        }
        if not self._parameters:  # the request span shows the parameters asked for, once
            self._parameters = True
            self.attributes.update(parameters)
        attributes["fallback_proxy.retry"] = retry
        if self._fallback is not None and self._fallback[0] != provider.name:
            attributes["fallback_proxy.fallback_from"], attributes["fallback_proxy.fallback_reason"] = self._fallback
        if self._continuing:
            attributes["fallback_proxy.continuation"] = True
        if provider.quota is not None:
            attributes["fallback_proxy.quota.decision"] = "admitted"
        return attributes

    def on_visit_failed(self, provider: str, error: ProviderError) -> None:
        self._fallback = (provider, error.failure.value)
        if not (self.recording and error.failure.is_skip):
            return
        attributes: Attributes = {
            "fallback_proxy.provider": provider,
            "fallback_proxy.skip_reason": error.failure.value,
        }
        if error.failure is FailureClass.QUOTA_EXHAUSTED:
            spent = not isinstance(error.__cause__, StoreUnavailable)
            attributes["fallback_proxy.quota.decision"] = "exhausted" if spent else "store_unavailable"
        self.span.add_event("fallback_proxy.skip", attributes)

    def on_continuation(self, provider: str, failure: ProviderError) -> None:
        self._continuing = True
        self._fallback = (provider, failure.failure.value)
        if self.recording:
            attributes: Attributes = {
                "fallback_proxy.provider": provider,
                "fallback_proxy.reason": failure.failure.value,
            }
            self.span.add_event("fallback_proxy.continuation", attributes)

    def on_request_end(self, record: RequestRecord) -> None:
        span = self.span
        if self.recording:
            if record.route != "-":
                span.update_name(f"{self.operation} {record.route}")
            span.set_attributes({**self.attributes, **_outcome(record)})
            if record.status >= 500 or record.outcome in _INTERRUPTED:
                span.set_status(Status(StatusCode.ERROR))
        span.end()


class AttemptSpan:
    """One call to one provider: a CLIENT span, ended with the answer, the
    failure, or (for a stream) the end of the stream (`StreamHooks`)."""

    __slots__ = (
        "attributes",
        "complete",
        "ended",
        "finish_reasons",
        "headers",
        "model",
        "recording",
        "span",
        "started",
        "usage",
    )

    def __init__(self, request: RequestSpan, provider: ProviderConfig, body: dict[str, Any]) -> None:
        tracing = request.tracing
        self.started = time.perf_counter()
        self.span = tracing.tracer.start_span(
            f"{request.operation} {provider.upstream_model}", context=request.context, kind=SpanKind.CLIENT
        )
        self.recording = self.span.is_recording()
        self.attributes = request.attempt_attributes(provider, body)  # set once, as the span ends
        self.headers = tracing.headers_for(self.span)  # sent even when not sampled: the upstream sees the flag
        self.ended = False
        self.complete = False  # a stream read to its end
        self.usage: Usage | None = None
        self.model: str | None = None
        self.finish_reasons: list[str] = []

    def answered(self, result: object) -> None:
        """A whole answer ends the span; a stream at its first token keeps it open until it ends."""
        if isinstance(result, LiveStream):
            if self.recording:
                ttft_ms = round((time.perf_counter() - self.started) * 1000, 1)
                self.attributes["fallback_proxy.time_to_first_token_ms"] = ttft_ms
                self.attributes.update(_response_id(result))
            for chunk in result.head:
                self._note(chunk)
            result.rest = self._watch(result.rest)
            result.trace = self
            return
        if isinstance(result, Completion):
            self.usage, self.model = result.usage, result.model or None
            if self.recording:
                self.attributes.update(_completion_facts(result.body))
        self._end("ok")

    def failed(self, error: BaseException) -> None:
        if isinstance(error, ProviderError):
            if error.status_code:
                self.attributes["http.response.status_code"] = error.status_code
            self._end(error.failure.value, error.failure.value)
        elif isinstance(error, asyncio.CancelledError):
            self._end("cancelled")  # a hedge lost, or the client went away
        else:
            self._end("internal_error", type(error).__qualname__)

    def on_stream_end(self, usage: Usage | None, failure: ProviderError | None) -> None:
        if failure is not None:
            self._end(failure.failure.value, failure.failure.value)
        elif self.complete:
            self.usage = self.usage or usage
            self._end("ok")
        else:
            self._end("cancelled")  # closed before its end: the client went away, or a hedge lost

    async def _watch(self, rest: AsyncIterator[Chunk]) -> AsyncGenerator[Chunk, None]:
        """The stream as it was, noting its model, finish and usage on the way."""
        try:
            async for chunk in rest:
                self._note(chunk)
                yield chunk
            self.complete = True
        finally:
            aclose = getattr(rest, "aclose", None)
            if aclose is not None:
                await aclose()

    def _note(self, chunk: Chunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish_reasons.append(chunk.finish_reason)
        if chunk.model and self.model is None:
            self.model = chunk.model

    def _end(self, outcome: str, error_type: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        if self.recording:
            attributes = self.attributes
            attributes["fallback_proxy.outcome"] = outcome
            if self.model:
                attributes["gen_ai.response.model"] = self.model
            if self.finish_reasons:
                attributes["gen_ai.response.finish_reasons"] = tuple(self.finish_reasons)
            if self.usage is not None:
                attributes["gen_ai.usage.input_tokens"] = self.usage.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = self.usage.completion_tokens
            if error_type is not None:
                attributes["error.type"] = error_type
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()


def _outcome(record: RequestRecord) -> Attributes:
    """The request span's closing attributes, from the request's record."""
    attributes: Attributes = {
        "http.response.status_code": record.status,
        "fallback_proxy.outcome": record.outcome,
        "fallback_proxy.stream": record.stream,
        "fallback_proxy.attempts": len(record.attempts),
    }
    if record.route != "-":
        attributes["gen_ai.request.model"] = attributes["fallback_proxy.route"] = record.route
    if record.provider:
        attributes["fallback_proxy.provider"] = record.provider
    if record.model:
        attributes["gen_ai.response.model"] = record.model
    if record.usage is not None:
        attributes["gen_ai.usage.input_tokens"] = record.usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.usage.completion_tokens
    if record.ttft_ms is not None:
        attributes["fallback_proxy.time_to_first_token_ms"] = round(record.ttft_ms, 1)
    fallbacks = record.fallbacks
    if fallbacks:
        attributes["fallback_proxy.fallbacks"] = tuple(f"{a.provider}={a.outcome}" for a in fallbacks)
    if record.continued:
        attributes["fallback_proxy.continued_by"] = tuple(record.continued)
    if record.interrupted:
        attributes["fallback_proxy.interrupted"] = record.interrupted
    if record.trimmed:
        attributes["fallback_proxy.trimmed"] = record.trimmed
    if record.outcome != "ok":
        attributes["error.type"] = record.outcome
    return attributes


def _provider_attributes(provider: ProviderConfig) -> Attributes:
    attributes: Attributes = {
        "gen_ai.provider.name": _GEN_AI_PROVIDERS.get(provider.litellm_provider, provider.litellm_provider),
        "gen_ai.request.model": provider.upstream_model,
        "fallback_proxy.provider": provider.name,
    }
    if provider.api_base:
        parts = urlsplit(provider.api_base)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return attributes


def _parameters(body: dict[str, Any]) -> Attributes:
    """The request's sampling parameters (never its messages)."""
    attributes: Attributes = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        attributes["gen_ai.request.max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{key}"] = float(value)
    return attributes


def _completion_facts(body: bytes) -> Attributes:
    """The answer's id and finish reasons (parsed again: only while its span records)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    attributes: Attributes = {}
    if isinstance(parsed.get("id"), str):
        attributes["gen_ai.response.id"] = parsed["id"]
    choices = parsed.get("choices")
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    if reasons and all(isinstance(reason, str) for reason in reasons):
        attributes["gen_ai.response.finish_reasons"] = tuple(reasons)
    return attributes


def _response_id(start: LiveStream) -> Attributes:
    if not start.head:
        return {}
    try:
        first = orjson.loads(start.head[0].payload)
    except orjson.JSONDecodeError:
        return {}
    identity = first.get("id") if isinstance(first, dict) else None
    return {"gen_ai.response.id": identity} if isinstance(identity, str) else {}


def _sampler(settings: TelemetrySettings) -> Sampler:
    name, ratio = settings.sampler, settings.sampler_arg
    root: Sampler = TraceIdRatioBased(ratio) if name.endswith("traceidratio") else ALWAYS_OFF
    if name.endswith("always_on"):
        root = ALWAYS_ON
    return ParentBased(root) if name.startswith("parentbased_") else root


def _resource(settings: TelemetrySettings) -> Resource:
    """Built from the settings alone (`Resource.create` would read the environment again)."""
    attributes: Attributes = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": _distribution_version("opentelemetry-sdk"),
        "service.version": _version(),
        **settings.resource_attributes,
        "service.name": settings.service_name,
    }
    return Resource(attributes)


def _version() -> str:
    return _distribution_version("fallback-proxy")


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
