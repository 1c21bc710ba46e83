"""What operators see: the record a request builds as it walks, the
one-JSON-line-per-request log and the event lines, the ring of recent
failovers, and what turns them into metrics (`proxy.metrics` declares those)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

import orjson

from proxy.adapters.base import AdapterHooks, Usage
from proxy.errors import Attempt, FailureClass, ProviderError
from proxy.logtext import TextLogHandler
from proxy.metrics import Children, Metrics

if TYPE_CHECKING:
    from proxy.adapters.base import Adapter
    from proxy.alerts import Alerter
    from proxy.config import ProviderConfig
    from proxy.health import ProviderHealth
    from proxy.state import Admission, StoreUnavailable

request_log = logging.getLogger("fallback_proxy.request")
event_log = logging.getLogger("fallback_proxy.events")

# Attempts that cost no network call.
SKIP_OUTCOMES = frozenset(failure.value for failure in FailureClass if failure.is_skip)
T = TypeVar("T")
AttemptCall = Callable[["Adapter", "ProviderConfig", dict[str, Any], float], Awaitable[T]]
"""One call to one provider, as the dispatcher makes it: adapter, provider, body, deadline."""


class RequestHooks(Protocol):
    """What one request tells whoever traces it, as it goes (aiohttp's
    `TraceConfig` callbacks, per request). `proxy.telemetry` implements it with
    OpenTelemetry spans. `RequestRecord.trace` is None when nothing traces: the
    core's whole cost is then a None check at each hook."""

    def traced(self, call: AttemptCall[T]) -> AttemptCall[T]:
        """`call` with each provider call (retries included) wrapped in an attempt:
        started once the quota admitted it, ended with its answer or failure (a
        stream's attempt ends with the stream: `StreamHooks`)."""
        ...

    def on_visit_failed(self, provider: str, error: ProviderError) -> None:
        """A node of the walk failed or was skipped (a skip makes no call); the
        walk follows the edge for `error.failure` next."""
        ...

    def on_continuation(self, provider: str, failure: ProviderError) -> None:
        """`provider` failed after its first token; the next provider is asked to continue the stream."""
        ...

    def on_request_end(self, record: RequestRecord) -> None:
        """The request is over (answered, refused or its stream ended): `record` says how."""
        ...


class StreamHooks(Protocol):
    """The attempt of a stream that reached its first token: ends with that stream."""

    def on_stream_end(self, usage: Usage | None, failure: ProviderError | None) -> None:
        """The provider's stream is over: `failure` when it broke, None when it ended or was closed."""
        ...


@dataclass(slots=True)
class RequestRecord:
    """Everything one request did: filled by the dispatcher, emitted once at the end."""

    request_id: str
    route: str
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    provider: str | None = None
    model: str | None = None
    ttft_ms: float | None = None
    usage: Usage | None = None
    status: int = 200
    outcome: str = "ok"
    interrupted: str | None = None  # failure class of a provider that failed after the first token
    trimmed: int = 0  # oldest messages dropped to fit the answering provider's context window
    continued: list[str] = field(default_factory=list)  # providers that continued the stream mid-way
    last_resort: str | None = None  # a breaker-skipped provider tried once every other node had failed
    interruption: Attempt | None = None  # the last provider that failed after the first token, and why
    trace: RequestHooks | None = field(default=None, repr=False)  # the request's trace, when traces are on
    endpoint: str = "chat"  # "chat", "responses" or "embeddings"

    def attempt(self, provider: str, outcome: str, ms: float, detail: str = "", cause: str = "") -> None:
        self.attempts.append(Attempt(provider, outcome, ms, detail, cause))

    @property
    def fallbacks(self) -> list[Attempt]:
        return [a for a in self.attempts if a.outcome != "ok"]

    def headers(self) -> dict[str, str]:
        """The `x-proxy-*` headers of the contract: `x-proxy-attempts` counts the
        providers called, `x-proxy-skips` those passed over without a call."""
        skips = sum(1 for a in self.attempts if a.outcome in SKIP_OUTCOMES)
        headers = {"x-proxy-route": self.route, "x-proxy-attempts": str(len(self.attempts) - skips)}
        if skips:
            headers["x-proxy-skips"] = str(skips)
        if self.provider:
            headers["x-proxy-provider"] = self.provider
        fallbacks = self.fallbacks
        if fallbacks:
            headers["x-proxy-fallbacks"] = ",".join(f"{a.provider}={a.outcome}" for a in fallbacks)
        if self.trimmed:
            headers["x-proxy-trimmed"] = str(self.trimmed)
        if self.last_resort:
            headers["x-proxy-last-resort"] = self.last_resort
        headers["x-request-id"] = self.request_id
        return headers

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def log_line(self, total_ms: float | None = None) -> bytes:
        if total_ms is None:
            total_ms = self.elapsed_ms()
        line = {
            "event": "request",
            "ts": round(time.time(), 3),
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "route": self.route,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "provider": self.provider,
            "model": self.model,
            "attempts": [_attempt_fields(a) for a in self.attempts],
            "interrupted": self.interrupted,
            "trimmed": self.trimmed,
            "continued_by": self.continued or None,
            "last_resort": self.last_resort,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "total_ms": round(total_ms, 1),
            "tokens": None
            if self.usage is None
            else {"prompt": self.usage.prompt_tokens, "completion": self.usage.completion_tokens},
        }
        if self.interruption is not None:
            line["interruption"] = _attempt_fields(self.interruption, timed=False)
        return orjson.dumps(line)


def _attempt_fields(attempt: Attempt, *, timed: bool = True) -> dict[str, object]:
    """An attempt in the log line: the plain words a client saw (`detail`) and,
    for the operator, the technical `cause` (the exception class and text)."""
    fields: dict[str, object] = {"provider": attempt.provider, "outcome": attempt.outcome}
    if timed:
        fields["ms"] = round(attempt.ms, 1)
    if attempt.outcome != "ok":
        if attempt.detail:
            fields["detail"] = attempt.detail
        if attempt.cause:
            fields["cause"] = attempt.cause
    return fields


NOT_PROVIDER_ERRORS = frozenset({"ok", "client_error", "unhealthy", "quota_exhausted", "unsupported", "policy"})
"""Outcomes that say nothing against the provider: an answer, the client's own
error, and the skips decided without a call."""


@dataclass(frozen=True, slots=True)
class Failover:
    """A request whose first choice did not answer it (or whose stream another
    provider had to continue): one row of the status page's recent failovers."""

    at: float  # wall-clock time the request ended
    request_id: str
    route: str
    failed: tuple[Attempt, ...]  # the attempts that failed or were skipped, in order
    answered_by: str | None  # None: nobody answered (an error status)
    status: int
    outcome: str  # the request's: "ok", "stream_interrupted", "client_disconnected", ...
    interruption: Attempt | None = None  # a provider that failed after its first token


@dataclass(frozen=True, slots=True)
class LastError:
    """The most recent failure of a provider seen by this process."""

    at: float
    outcome: str
    detail: str


class RecentFailovers:
    """The last `size` failovers and each provider's last error, in this process.

    Fed by `Observer.finish` only for requests that had a failure, so a clean
    request costs nothing here, and then only an append of the finished record
    (no longer changed by anyone) and of its failed attempts: the status page's
    views are built when it asks. Bounded, so a storm of failovers costs a fixed
    amount of memory."""

    def __init__(self, size: int = 50) -> None:
        self._ring: deque[tuple[float, RequestRecord]] = deque(maxlen=size)
        self._last: dict[str, tuple[float, Attempt]] = {}

    def add(self, record: RequestRecord, now: float) -> None:
        interruption = record.interruption
        if interruption is None and all(a.outcome in _ANSWERED_OR_CLIENTS for a in record.attempts):
            return  # the client's own error, passed back: not a failover
        self._ring.append((now, record))
        for attempt in record.attempts:
            if attempt.outcome not in NOT_PROVIDER_ERRORS:
                self._last[attempt.provider] = (now, attempt)
        if interruption is not None:
            self._last[interruption.provider] = (now, interruption)

    def latest(self, count: int | None = None) -> list[Failover]:
        """The most recent first."""
        items = [_failover(now, record) for now, record in reversed(self._ring)]
        return items if count is None else items[:count]

    @property
    def last_errors(self) -> dict[str, LastError]:
        return {name: LastError(now, a.outcome, a.detail) for name, (now, a) in self._last.items()}


_ANSWERED_OR_CLIENTS = frozenset({"ok", "client_error"})


def _failover(now: float, record: RequestRecord) -> Failover:
    failed = tuple(a for a in record.attempts if a.outcome != "ok")
    answered_by = record.provider if record.status < 400 else None
    return Failover(
        now, record.request_id, record.route, failed, answered_by, record.status, record.outcome, record.interruption
    )


class Observer:
    """Turns finished request records into metrics, a log line and failover alerts."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.alerts: Alerter | None = None
        self.recent = RecentFailovers()

    def finish(self, record: RequestRecord) -> None:
        total_ms = record.elapsed_ms()
        route, provider = record.route, record.provider
        metrics, seconds = self.metrics, total_ms / 1000
        metrics.requests.inc((route, provider or "none", record.outcome))
        metrics.latency.observe((route,), seconds)
        metrics.endpoint_requests.inc((record.endpoint, route, record.outcome))
        metrics.endpoint_latency.observe((record.endpoint,), seconds)
        first_fallback: Attempt | None = None
        previous: Attempt | None = None
        for attempt in record.attempts:
            metrics.attempts.inc((attempt.provider, attempt.outcome))
            if previous is not None and previous.outcome != "ok":  # "ok" then another: a continuation
                metrics.fallbacks.inc((route, previous.provider, attempt.provider, previous.outcome))
            # A policy skip (private work, a provider disabled for want of its key) is the
            # route working as configured: no failover to show or alert on.
            if first_fallback is None and attempt.outcome not in ("ok", FailureClass.POLICY.value):
                first_fallback = attempt
            previous = attempt
        if provider:
            if record.ttft_ms is not None:
                metrics.ttft.observe((provider,), record.ttft_ms / 1000)
            if record.usage is not None:
                metrics.tokens.inc((provider, "prompt"), record.usage.prompt_tokens)
                metrics.tokens.inc((provider, "completion"), record.usage.completion_tokens)
        if first_fallback is not None or record.interruption is not None:
            self.recent.add(record, time.time())
        if record.trace is not None:  # telemetry hook: the request span ends
            record.trace.on_request_end(record)
        if request_log.isEnabledFor(logging.INFO):
            write_line(request_log, record.log_line(total_ms))
        if self.alerts is not None and provider and first_fallback is not None:
            self.alerts.notify(
                "failover",
                route=route,
                from_provider=first_fallback.provider,
                to_provider=provider,
                reason=first_fallback.outcome,
            )


def write_line(logger: logging.Logger, line: bytes) -> None:
    """Log a ready-made JSON line at INFO. When the only place it would go is
    the stream of :func:`configure_logging`, it is written there directly: the
    same bytes, without a `LogRecord` and the formatting machinery."""
    handler = _direct_handler(logger)
    if handler is None:
        logger.info(line.decode())
    else:
        handler.write_line(line)


def _direct_handler(logger: logging.Logger) -> JsonLogHandler | None:
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        if current.handlers:
            if len(current.handlers) != 1 or (current.propagate and current.parent is not None):
                return None
            handler = current.handlers[0]
            if type(handler) is JsonLogHandler and not handler.filters and handler.level <= logging.INFO:
                return handler
            return None
        if not current.propagate:
            return None
        current = current.parent
    return None


def event(kind: str, level: int = logging.INFO, **fields: object) -> None:
    """One JSON event line (failover, breaker, recovery, quota, store)."""
    if event_log.isEnabledFor(level):
        event_log.log(level, orjson.dumps({"event": kind, "ts": round(time.time(), 3), **fields}).decode())


class OperatorEvents(AdapterHooks):
    """Health and quota events, as metrics and event log lines."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.alerts: Alerter | None = None
        self._store_down = False
        self._quota_remaining = Children(metrics.quota_remaining)  # set on every admitted call

    def _alert(self, kind: str, **fields: str | int | float | None) -> None:
        if self.alerts is not None:
            self.alerts.notify(kind, **fields)

    def state(self, provider: str, health: ProviderHealth) -> None:
        self.metrics.health.labels(provider).set(health.state.level)
        self.metrics.breaker_open.labels(provider).set(0 if health.breaker.value == "closed" else 1)
        event("health", provider=provider, state=health.state.value, breaker=health.breaker.value, reason=health.reason)

    def breaker_opened(self, provider: str, health: ProviderHealth) -> None:
        self.metrics.breaker_opened.labels(provider).inc()
        retry_in = round(max(0.0, health.retry_at - time.time()), 1)
        event("breaker_open", logging.WARNING, provider=provider, reason=health.reason, retry_in_s=retry_in)
        self._alert("breaker_open", provider=provider, reason=health.reason, retry_in_s=retry_in)

    def recovered(self, provider: str, health: ProviderHealth) -> None:
        self.metrics.recoveries.labels(provider).inc()
        event("recovered", logging.WARNING, provider=provider, state=health.state.value)
        self._alert("recovered", provider=provider, state=health.state.value)

    def switched(self, provider: str, health: ProviderHealth) -> None:
        kind = "provider_disabled" if health.disabled else "provider_enabled"
        event(kind, logging.WARNING, provider=provider, reason=health.reason)

    def probe(self, provider: str, outcome: str) -> None:
        self.metrics.probes.labels(provider, outcome).inc()

    def malformed(self, provider: str, payload: bytes) -> None:
        """`AdapterHooks.malformed`: an unreadable stream event was skipped."""
        self.metrics.malformed.labels(provider).inc()
        event("malformed_chunk", logging.WARNING, provider=provider, payload=payload[:200].decode("utf-8", "replace"))

    def excused(self, provider: str, failure: str, lag: float) -> None:
        """A timeout left uncounted: this process's event loop was late, not the provider."""
        self.metrics.health_excused.labels(provider, failure, "event_loop_lag").inc()
        event("failure_excused", provider=provider, failure=failure, reason="event_loop_lag", loop_lag_s=round(lag, 3))

    def store_error(self, operation: str, error: StoreUnavailable) -> None:
        self.metrics.store_errors.labels(operation).inc()
        if not self._store_down:
            self._store_down = True
            event("store_down", logging.WARNING, operation=operation, reason=error.reason)
            self._alert("store_down", operation=operation, reason=error.reason)

    def store_ok(self) -> None:
        if self._store_down:
            self._store_down = False
            event("store_up", logging.WARNING)
            self._alert("store_up")

    def admitted(self, provider: ProviderConfig, admission: Admission) -> None:
        self.store_ok()
        quota = provider.quota
        if quota is None:
            return
        if quota.requests_per_day is not None:
            remaining = quota.requests_per_day - admission.requests_used
            self._quota_remaining(provider.name, "requests").set(remaining)
        if quota.tokens_per_day is not None:
            remaining = quota.tokens_per_day - admission.tokens_used
            self._quota_remaining(provider.name, "tokens").set(remaining)

    def exhausted(self, provider: ProviderConfig, reason: str) -> None:
        self.store_ok()
        self.metrics.quota_exhausted.labels(provider.name).inc()
        event("quota_exhausted", provider=provider.name, reason=reason)
        self._alert("quota_exhausted", provider=provider.name, reason=reason)

    def fail_closed(self, provider: ProviderConfig, error: StoreUnavailable) -> None:
        self.metrics.quota_fail_closed.labels(provider.name).inc()
        self.store_error("admit", error)
        event("quota_fail_closed", logging.WARNING, provider=provider.name, reason=error.reason)
        self._alert("quota_fail_closed", provider=provider.name, reason=error.reason)

    def settle_failed(self, provider: str, error: StoreUnavailable) -> None:
        self.store_error("settle", error)

    def uncertain(self, provider: str, detail: str) -> None:
        """A call stays counted though nobody knows whether the provider received it."""
        self.metrics.quota_uncertain.labels(provider).inc()
        event("quota_uncertain", provider=provider, detail=detail[:200])

    def store_pending(self, count: int) -> None:
        self.metrics.store_pending.set(count)

    def store_replayed(self, count: int) -> None:
        self.metrics.store_replayed.inc(count)

    def store_dropped(self, count: int) -> None:
        self.metrics.store_dropped.inc(count)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: request lines pass through as they are, every
    other record becomes {"ts", "level", "logger", "message"} (+ "exc")."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name in (request_log.name, event_log.name):
            return message
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class JsonLogHandler(logging.StreamHandler[TextIO]):
    """The CLI's handler: JSON lines to a stream (stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonLogFormatter())

    def write_line(self, line: bytes) -> None:
        """Write one ready-made line, as `emit` would have written it."""
        text = line.decode() + self.terminator
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except (OSError, ValueError):  # a closed or failing stream: the logging module's own report
            self.handleError(logging.makeLogRecord({"msg": text, "name": request_log.name}))
        finally:
            self.release()


def configure_logging(level: str = "info", log_format: str = "json") -> None:
    """Send every log line to stderr, as JSON or as readable text (for the CLI;
    tests use caplog)."""
    handler: logging.Handler = TextLogHandler() if log_format == "text" else JsonLogHandler()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "LiteLLM", "litellm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
