"""What operators see: Prometheus metrics (one registry per app), the
one-JSON-line-per-request log, and the record a request builds as it walks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.adapters.base import Usage
from proxy.errors import Attempt

request_log = logging.getLogger("fallback_proxy.request")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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

    def attempt(self, provider: str, outcome: str, ms: float, detail: str = "") -> None:
        self.attempts.append(Attempt(provider, outcome, ms, detail))

    @property
    def fallbacks(self) -> list[Attempt]:
        return [a for a in self.attempts if a.outcome != "ok"]

    def headers(self) -> dict[str, str]:
        """The `x-proxy-*` headers of the contract."""
        headers = {"x-proxy-route": self.route, "x-proxy-attempts": str(len(self.attempts))}
        if self.provider:
            headers["x-proxy-provider"] = self.provider
        fallbacks = self.fallbacks
        if fallbacks:
            headers["x-proxy-fallbacks"] = ",".join(f"{a.provider}={a.outcome}" for a in fallbacks)
        headers["x-request-id"] = self.request_id
        return headers

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def log_line(self) -> bytes:
        line = {
            "event": "request",
            "ts": round(time.time(), 3),
            "request_id": self.request_id,
            "route": self.route,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "provider": self.provider,
            "model": self.model,
            "attempts": [
                {"provider": a.provider, "outcome": a.outcome, "ms": round(a.ms, 1)}
                | ({"detail": a.detail} if a.detail and a.outcome != "ok" else {})
                for a in self.attempts
            ],
            "interrupted": self.interrupted,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "total_ms": round(self.elapsed_ms(), 1),
            "tokens": None
            if self.usage is None
            else {"prompt": self.usage.prompt_tokens, "completion": self.usage.completion_tokens},
        }
        return orjson.dumps(line)


class Metrics:
    """The documented metrics, registered on the app's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "fallback_proxy_requests", "Requests answered, by route, answering provider and outcome.",
            ["route", "provider", "outcome"], registry=registry,
        )
        self.attempts = Counter(
            "fallback_proxy_attempts", "Provider attempts and skips, by provider and outcome class.",
            ["provider", "outcome"], registry=registry,
        )
        self.fallbacks = Counter(
            "fallback_proxy_fallbacks", "Fallbacks from one provider to the next, with the reason.",
            ["route", "from_provider", "to_provider", "reason"], registry=registry,
        )
        self.latency = Histogram(
            "fallback_proxy_request_duration_seconds", "Whole request time as seen by the proxy.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.ttft = Histogram(
            "fallback_proxy_time_to_first_token_seconds", "Time to the first token of streamed answers.",
            ["provider"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.tokens = Counter(
            "fallback_proxy_tokens", "Tokens reported by providers.", ["provider", "kind"], registry=registry,
        )


class Observer:
    """Turns finished request records into metrics and a log line."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def finish(self, record: RequestRecord) -> None:
        m = self.metrics
        provider = record.provider or "none"
        m.requests.labels(record.route, provider, record.outcome).inc()
        m.latency.labels(record.route).observe(record.elapsed_ms() / 1000)
        previous: Attempt | None = None
        for attempt in record.attempts:
            m.attempts.labels(attempt.provider, attempt.outcome).inc()
            if previous is not None:
                m.fallbacks.labels(record.route, previous.provider, attempt.provider, previous.outcome).inc()
            previous = attempt
        if record.ttft_ms is not None and record.provider:
            m.ttft.labels(record.provider).observe(record.ttft_ms / 1000)
        if record.usage is not None and record.provider:
            m.tokens.labels(record.provider, "prompt").inc(record.usage.prompt_tokens)
            m.tokens.labels(record.provider, "completion").inc(record.usage.completion_tokens)
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(record.log_line().decode())


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: request lines pass through as they are, every
    other record becomes {"ts", "level", "logger", "message"} (+ "exc")."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == request_log.name:
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


def configure_logging(level: str = "info") -> None:
    """Send every log line to stderr as JSON (for the CLI; tests use caplog)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "LiteLLM", "litellm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
