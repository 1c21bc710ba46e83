"""Log lines as readable text, for a person at a terminal (`--log-format text`,
the default when stderr is one): the request and event lines, which the rest
of the proxy writes as JSON, become one-liners; other records get a time, a
level and their logger. A leaf: it imports nothing of the proxy."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, TextIO

import orjson

REQUEST_LOGGER: Final = "fallback_proxy.request"
EVENT_LOGGER: Final = "fallback_proxy.events"


class TextLogFormatter(logging.Formatter):
    """One readable line per record, for a person at a terminal: the request
    and event lines (JSON when they reach here) become one-liners, e.g.

        12:00:01.123 INFO    request 9f2c4e1a default stream 200 ok by local-qwen (qwen2.5:7b):
            openai-4o timeout 10003ms "no first token within 10s" -> local-qwen ok 212ms; ttft 10216ms, total 11830ms, tokens 12+85
        12:00:12.500 WARNING breaker_open provider=openai-4o reason="timeout: 3 consecutive failures" retry_in_s=30.0

    (each on one line)."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{self.formatTime(record, '%H:%M:%S')}.{int(record.msecs):03d} {record.levelname:<7}"
        message = record.getMessage()
        if record.name in (REQUEST_LOGGER, EVENT_LOGGER):
            parsed = _json_object(message)
            if parsed is not None:
                return f"{head} {request_text(parsed) if parsed.get('event') == 'request' else event_text(parsed)}"
        line = f"{head} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def request_text(line: Mapping[str, Any]) -> str:
    """A request log line as one readable line."""
    who = f" by {line['provider']}" if line.get("provider") else ""
    if who and line.get("model"):
        who += f" ({line['model']})"
    attempts = " -> ".join(_attempt_text(attempt) for attempt in line.get("attempts") or ()) or "no attempt"
    kind = "stream" if line.get("stream") else "plain"
    text = f"request {str(line.get('request_id', ''))[:8]} {line.get('route')} {kind} {line.get('status')}"
    text += f" {line.get('outcome')}{who}: {attempts}"
    interruption = line.get("interruption")
    if isinstance(interruption, dict):
        text += f"; cut mid-stream: {_attempt_text(interruption)}"
    if line.get("continued_by"):
        text += f"; continued by {', '.join(line['continued_by'])}"
    if line.get("trimmed"):
        text += f"; trimmed {line['trimmed']} messages"
    timing = [f"ttft {line['ttft_ms']:.0f}ms"] if line.get("ttft_ms") is not None else []
    timing.append(f"total {line.get('total_ms') or 0:.0f}ms")
    tokens = line.get("tokens")
    if isinstance(tokens, dict):
        timing.append(f"tokens {tokens.get('prompt')}+{tokens.get('completion')}")
    return f"{text}; {', '.join(timing)}"


def _attempt_text(attempt: Mapping[str, Any]) -> str:
    text = f"{attempt.get('provider')} {attempt.get('outcome')}"
    if attempt.get("ms") is not None:
        text += f" {attempt['ms']:.0f}ms"
    if attempt.get("detail"):
        text += f" {_quoted(attempt['detail'])}"
    if attempt.get("cause"):
        text += f" [{attempt['cause']}]"
    return text


def event_text(line: Mapping[str, Any]) -> str:
    """An event line as `kind key=value ...` (strings with spaces quoted)."""
    fields = " ".join(f"{key}={_value_text(value)}" for key, value in line.items() if key not in ("event", "ts"))
    return f"{line.get('event')} {fields}".rstrip()


def _value_text(value: object) -> str:
    if isinstance(value, str):
        return _quoted(value) if (not value or any(c.isspace() or c in '"=' for c in value)) else value
    if value is None:
        return "-"
    return orjson.dumps(value).decode()


def _quoted(text: str) -> str:
    return orjson.dumps(text).decode()


class TextLogHandler(logging.StreamHandler[TextIO]):
    """The CLI's handler for a terminal: readable lines to a stream (stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(TextLogFormatter())
