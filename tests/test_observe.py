"""Observer.finish: the same metrics and the same log line, by whichever path the line takes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.adapters import Usage
from proxy.metrics import Metrics
from proxy.observe import JsonLogHandler, Observer, OperatorEvents, RequestRecord, request_log
from proxy.state import Admission

from .conftest import build_config, openai_provider


def record() -> RequestRecord:
    r = RequestRecord("req-1", "default", stream=True)
    r.attempt("cloud", "timeout", 12.34, "first token")
    r.attempt("backup", "ok", 5.0)
    r.provider, r.model, r.ttft_ms, r.usage = "backup", "gpt-test", 7.5, Usage(12, 20)
    return r


@pytest.fixture
def cli_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The request log going to a `JsonLogHandler` (as under `configure_logging`),
    writing into a buffer."""
    stream = io.StringIO()
    handler = JsonLogHandler()
    handler.setStream(stream)
    request_log.addHandler(handler)
    monkeypatch.setattr(request_log, "propagate", False)
    monkeypatch.setattr(request_log, "level", logging.INFO)
    try:
        yield stream
    finally:
        request_log.removeHandler(handler)


def test_the_log_line_goes_straight_to_the_cli_stream(
    cli_logging: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_log_record(self: JsonLogHandler, log_record: logging.LogRecord) -> None:
        raise AssertionError("the line went through a LogRecord")

    monkeypatch.setattr(JsonLogHandler, "emit", no_log_record)
    monkeypatch.setattr(request_log, "handlers", [h for h in request_log.handlers if type(h) is JsonLogHandler])
    Observer(Metrics(CollectorRegistry())).finish(record())
    lines = cli_logging.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["event"] == "request" and line["request_id"] == "req-1" and line["provider"] == "backup"
    assert line["attempts"] == [
        {"provider": "cloud", "outcome": "timeout", "ms": 12.3, "detail": "first token"},
        {"provider": "backup", "outcome": "ok", "ms": 5.0},
    ]
    assert line["tokens"] == {"prompt": 12, "completion": 20} and line["ttft_ms"] == 7.5
    assert line["endpoint"] == "chat"
    assert set(line) == {
        "event",
        "ts",
        "request_id",
        "endpoint",
        "route",
        "stream",
        "status",
        "outcome",
        "provider",
        "model",
        "attempts",
        "interrupted",
        "trimmed",
        "continued_by",
        "last_resort",
        "ttft_ms",
        "total_ms",
        "tokens",
    }


def test_with_other_handlers_the_line_goes_through_logging(
    cli_logging: io.StringIO, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_log, "propagate", True)  # pytest's capturing handler on the root logger
    Observer(Metrics(CollectorRegistry())).finish(record())
    captured = [json.loads(r.getMessage()) for r in caplog.records if r.name == request_log.name]
    assert captured and all(line == captured[0] for line in captured) and captured[0]["request_id"] == "req-1"
    assert json.loads(cli_logging.getvalue()) == captured[0]  # the same line, once, on the CLI stream too


def test_no_line_when_the_level_filters_it(cli_logging: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_log, "level", logging.WARNING)
    request_log.manager._clear_cache()  # type: ignore[attr-defined]
    registry = CollectorRegistry()
    Observer(Metrics(registry)).finish(record())
    assert cli_logging.getvalue() == ""
    assert b'fallback_proxy_requests_total{outcome="ok",provider="backup",route="default"} 1.0' in (
        generate_latest(registry)
    )


def test_metrics_count_every_request_with_cached_children() -> None:
    registry = CollectorRegistry()
    observer = Observer(Metrics(registry))
    for _ in range(3):
        observer.finish(record())
    text = generate_latest(registry).decode()
    assert 'fallback_proxy_requests_total{outcome="ok",provider="backup",route="default"} 3.0' in text
    assert 'fallback_proxy_attempts_total{outcome="timeout",provider="cloud"} 3.0' in text
    assert (
        'fallback_proxy_fallbacks_total{from_provider="cloud",reason="timeout",route="default",'
        'to_provider="backup"} 3.0'
    ) in text
    assert 'fallback_proxy_tokens_total{kind="completion",provider="backup"} 60.0' in text
    assert 'fallback_proxy_time_to_first_token_seconds_count{provider="backup"} 3.0' in text
    assert 'fallback_proxy_request_duration_seconds_count{route="default"} 3.0' in text


def without_created(text: str) -> str:
    """The exposition without its `_created` samples' values (times of day)."""
    return "\n".join(line.rsplit(" ", 1)[0] if "_created{" in line else line for line in text.splitlines())


def test_the_request_tallies_are_scraped_as_prometheus_clients_own_metrics_would_be() -> None:
    """What a scrape shows of the tallied families is what prometheus_client's
    `Counter` and `Histogram` show for the same counts: names, HELP and TYPE,
    labels, cumulative buckets (a value on a bound counts in that bucket),
    `_count`, `_sum`, `_created`."""
    tallied = CollectorRegistry()
    metrics = Metrics(tallied)
    plain = CollectorRegistry()
    requests = Counter(
        "fallback_proxy_requests",
        "Requests answered, by route, answering provider and outcome.",
        ["route", "provider", "outcome"],
        registry=plain,
    )
    latency = Histogram(
        "fallback_proxy_request_duration_seconds",
        "Whole request time as seen by the proxy.",
        ["route"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        registry=plain,
    )
    for route, provider, outcome, amount in [("a", "x", "ok", 1), ("b", "none", "timeout", 1), ("a", "x", "ok", 2)]:
        metrics.requests.inc((route, provider, outcome), amount)
        requests.labels(route, provider, outcome).inc(amount)
    for route, seconds in [("a", 0.0), ("a", 0.005), ("a", 0.0051), ("b", 7.0), ("b", 1000.0), ("a", 0.3)]:
        metrics.latency.observe((route,), seconds)
        latency.labels(route).observe(seconds)
    ours = generate_latest(tallied).decode()
    theirs = without_created(generate_latest(plain).decode())
    for family in ("fallback_proxy_requests", "fallback_proxy_request_duration_seconds"):
        block = "\n".join(
            line for line in without_created(ours).splitlines() if family + "_" in line or f" {family} " in line
        )
        expected = "\n".join(line for line in theirs.splitlines() if family + "_" in line or f" {family} " in line)
        assert block == expected and block


def test_quota_remaining_follows_each_admitted_call() -> None:
    registry = CollectorRegistry()
    events = OperatorEvents(Metrics(registry))
    provider = build_config(
        {
            "providers": {
                "cloud": openai_provider("http://127.0.0.1:9", quota={"requests_per_day": 100, "tokens_per_day": 5000})
            },
            "routes": {"default": ["cloud"]},
        }
    ).providers["cloud"]
    events.admitted(provider, Admission(admitted=True, requests_used=1, tokens_used=600))
    events.admitted(provider, Admission(admitted=True, requests_used=2, tokens_used=1300))
    text = generate_latest(registry).decode()
    assert 'fallback_proxy_quota_remaining{kind="requests",provider="cloud"} 98.0' in text
    assert 'fallback_proxy_quota_remaining{kind="tokens",provider="cloud"} 3700.0' in text
