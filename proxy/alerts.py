"""Operator alerts to webhooks: failovers, breakers, quotas, the state store and
config reloads, posted as generic JSON, Slack or Telegram messages.

`Alerter.notify()` is synchronous and never blocks a request: it de-duplicates the
event and puts it on a bounded queue; one background worker posts it to every
webhook that subscribes to its kind. Delivery failures are logged (with the
webhook's origin only, never its path or query, where tokens live) and counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from proxy.config import ALERT_FORMATS, ALERT_KINDS

log = logging.getLogger("fallback_proxy.alerts")


_EMOJI: dict[str, str] = {
    "failover": "\N{TWISTED RIGHTWARDS ARROWS}",
    "breaker_open": "\N{LARGE RED CIRCLE}",
    "recovered": "\N{WHITE HEAVY CHECK MARK}",
    "quota_exhausted": "\N{NO ENTRY}",
    "quota_fail_closed": "\N{NO ENTRY}",
    "store_down": "\N{WARNING SIGN}",
    "store_up": "\N{WHITE HEAVY CHECK MARK}",
    "config_reload_failed": "\N{WARNING SIGN}",
}
_SUMMARY_MAX = 300
_SLACK_SECTION_MAX = 3000  # Slack rejects a section whose text is longer
_TELEGRAM_TEXT_MAX = 4096  # Telegram rejects a longer message
_RESERVED = frozenset({"event", "ts", "instance", "summary", "suppressed"})


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where alerts go. `url` may hold a secret (a Telegram bot token, a Slack
    hook path): only `origin` is ever logged or shown in `repr`."""

    url: str
    format: str = "json"
    events: frozenset[str] = ALERT_KINDS
    chat_id: str | None = None
    timeout: float = 5.0
    origin: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            parsed = httpx.URL(self.url)
        except httpx.InvalidURL:
            raise ValueError("webhook url is not a valid URL") from None  # the text may hold a token
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("webhook url must be an http:// or https:// URL with a host")
        if self.format not in ALERT_FORMATS:
            raise ValueError(f"webhook format must be one of {sorted(ALERT_FORMATS)}, not {self.format!r}")
        unknown = set(self.events) - ALERT_KINDS
        if unknown:
            raise ValueError(f"unknown alert kinds {sorted(unknown)}; known: {sorted(ALERT_KINDS)}")
        if self.format == "telegram" and not self.chat_id:
            raise ValueError("a telegram webhook needs a chat_id")
        if not self.timeout > 0:
            raise ValueError(f"webhook timeout must be positive, not {self.timeout!r}")
        port = f":{parsed.port}" if parsed.port is not None else ""
        object.__setattr__(self, "origin", f"{parsed.scheme}://{parsed.host}{port}")

    def __repr__(self) -> str:
        return f"Webhook({self.origin}, format={self.format!r}, events={len(self.events)})"


class AlertDeliveryMetrics(Protocol):
    """Counters the app provides for alert delivery."""

    def delivered(self, kind: str, fmt: str) -> None: ...
    def failed(self, kind: str, fmt: str) -> None: ...
    def suppressed(self, kind: str) -> None: ...


class NoAlertMetrics:
    """Counts nothing."""

    def delivered(self, kind: str, fmt: str) -> None:
        pass

    def failed(self, kind: str, fmt: str) -> None:
        pass

    def suppressed(self, kind: str) -> None:
        pass


@dataclass(slots=True)
class _Seen:
    sent_at: float
    suppressed: int = 0


class Deduper:
    """Per key, the first event is sent; repeats within `window` seconds of the last
    one sent are suppressed; the next one after the window carries their count."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._seen: dict[tuple[str, str], _Seen] = {}

    def admit(self, key: tuple[str, str], now: float) -> int | None:
        """None: suppress this one. Otherwise send it, with the number suppressed since the last."""
        seen = self._seen.get(key)
        if seen is not None and now - seen.sent_at < self.window:
            seen.suppressed += 1
            return None
        self._seen[key] = _Seen(sent_at=now)
        return 0 if seen is None else seen.suppressed


def dedupe_key(kind: str, fields: Mapping[str, object]) -> tuple[str, str]:
    subject = fields.get("provider") or fields.get("from_provider") or "-"
    return kind, str(subject)


def summarize(kind: str, fields: Mapping[str, object]) -> str:
    """One human line for an event."""

    def f(name: str) -> str:
        value = fields.get(name)
        return "?" if value is None else _text(value)

    if kind == "failover":
        line = f"failover on route {f('route')}: {f('from_provider')} → {f('to_provider')} ({f('reason')})"
    elif kind == "breaker_open":
        line = f"breaker open: {f('provider')} ({f('reason')}), retry in {f('retry_in_s')}s"
    elif kind == "recovered":
        line = f"recovered: {f('provider')}"
    elif kind == "quota_exhausted":
        line = f"quota exhausted: {f('provider')} ({f('reason')})"
    elif kind == "quota_fail_closed":
        line = f"quota gate failing closed for {f('provider')}: state store unavailable ({f('reason')})"
    elif kind == "store_down":
        line = f"state store down: {f('reason')} (on {f('operation')})"
    elif kind == "store_up":
        line = "state store back"
    elif kind == "config_reload_failed":
        line = f"config reload rejected: {f('problems')} (from {f('source')})"
    else:
        line = " ".join([kind, *(f"{k}={_text(v)}" for k, v in fields.items() if k not in _RESERVED)])
    return _truncate(" ".join(line.split()), _SUMMARY_MAX)


def _text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(value: object) -> str | int | float | None:
    """A JSON-safe scalar: anything else becomes its text, so encoding a body cannot fail."""
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True, slots=True)
class _Alert:
    kind: str
    fields: Mapping[str, object]  # the event's fields plus "ts" and "suppressed"
    hooks: tuple[Webhook, ...]


class Alerter:
    """Delivers operator events to webhooks, de-duplicated, off the request path.

    Call `start()` once the event loop runs and `aclose()` before closing `client`."""

    def __init__(
        self,
        webhooks: Sequence[Webhook],
        client: httpx.AsyncClient,
        *,
        dedupe_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: AlertDeliveryMetrics | None = None,
        instance: str = "",
        queue_size: int = 1000,
        retry_delay: float = 1.0,
    ) -> None:
        self.webhooks = tuple(webhooks)
        self._client = client
        self._dedupe = Deduper(dedupe_seconds)
        self._clock = clock
        self._metrics: AlertDeliveryMetrics = metrics if metrics is not None else NoAlertMetrics()
        self.instance = instance
        self.retry_delay = retry_delay
        self._queue: asyncio.Queue[_Alert] = asyncio.Queue(maxsize=queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Alerter(webhooks={list(self.webhooks)!r}, pending={self._queue.qsize()})"

    @property
    def pending(self) -> int:
        """Alerts queued and not yet taken by the worker."""
        return self._queue.qsize()

    def notify(self, kind: str, **fields: str | int | float | None) -> None:
        """De-duplicate, then queue for delivery; never blocks and never raises.

        Does nothing without a running event loop, without webhooks, or after `aclose()`.
        When the queue is full the alert is dropped and counted as failed."""
        if self._closed or not self.webhooks:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if kind not in ALERT_KINDS:
            log.warning("alert of unknown kind %r dropped", kind)
            return
        hooks = tuple(hook for hook in self.webhooks if kind in hook.events)
        if not hooks:
            return
        suppressed = self._dedupe.admit(dedupe_key(kind, fields), self._clock())
        if suppressed is None:
            self._metrics.suppressed(kind)
            return
        record = {name: _plain(value) for name, value in fields.items()}
        alert = _Alert(kind, {**record, "ts": round(time.time(), 3), "suppressed": suppressed}, hooks)
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            log.warning("alert %s dropped: %d alerts already queued", kind, self._queue.qsize())
            self._count_failed(alert)

    async def start(self) -> None:
        """Start the delivery worker (once)."""
        if self._worker is None and not self._closed:
            self._worker = asyncio.create_task(self._run(), name="alert-delivery")
            self._worker.add_done_callback(self._worker_done)

    async def aclose(self, timeout: float = 2.0) -> None:
        """Deliver what is queued for up to `timeout` seconds, then stop; what is
        left undelivered is counted as failed."""
        self._closed = True
        if self._worker is None and not self._queue.empty():
            self._worker = asyncio.create_task(self._run(), name="alert-delivery")
        if self._worker is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            except TimeoutError:
                log.warning("alerts: %d still queued after %.1fs at shutdown", self._queue.qsize(), timeout)
            self._worker.cancel()
            await asyncio.wait([self._worker])
        while not self._queue.empty():
            self._count_failed(self._queue.get_nowait())
            self._queue.task_done()

    def format(self, webhook: Webhook, kind: str, fields: Mapping[str, object]) -> dict[str, object]:
        """The JSON body for `webhook`. `fields` may carry "ts" (unix seconds; now if
        absent) and "suppressed" (repeats not sent since the last one, 0 if absent)."""
        ts = fields.get("ts")
        suppressed = fields.get("suppressed") or 0
        shown = {name: value for name, value in fields.items() if name not in _RESERVED}
        summary = summarize(kind, shown)
        if webhook.format == "slack":
            return self._slack(kind, summary, shown, suppressed)
        if webhook.format == "telegram":
            return self._telegram(webhook, summary, shown, suppressed)
        return {
            "event": kind,
            "ts": ts if isinstance(ts, (int, float)) else round(time.time(), 3),
            "instance": self.instance,
            "summary": summary,
            **shown,
            "suppressed": suppressed,
        }

    def _lines(self, fields: Mapping[str, object], suppressed: object) -> list[tuple[str, str]]:
        lines = [(name, _text(value)) for name, value in fields.items() if value is not None]
        if self.instance:
            lines.append(("instance", self.instance))
        if suppressed:
            lines.append(("suppressed", f"{suppressed} more since the last alert"))
        return lines

    def _slack(self, kind: str, summary: str, fields: Mapping[str, object], suppressed: object) -> dict[str, object]:
        text = f"{_EMOJI.get(kind, '')} *fallback-proxy* {_slack_escape(summary)}".strip()
        lines = [f"*{_slack_escape(k)}*: {_slack_escape(v)}" for k, v in self._lines(fields, suppressed)]
        section = _truncate("\n".join([text, *lines]), _SLACK_SECTION_MAX)
        return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": section}}]}

    def _telegram(
        self, webhook: Webhook, summary: str, fields: Mapping[str, object], suppressed: object
    ) -> dict[str, object]:
        lines = "\n".join(f"{k}: {v}" for k, v in self._lines(fields, suppressed))
        text = f"{summary}\n{lines}" if lines else summary
        return {
            "chat_id": webhook.chat_id,
            "text": _truncate(text, _TELEGRAM_TEXT_MAX),
            "disable_web_page_preview": True,
        }

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                await asyncio.gather(*(self._deliver(hook, alert) for hook in alert.hooks))
            finally:
                self._queue.task_done()

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("alert delivery worker stopped; alerts will not be delivered", exc_info=task.exception())

    async def _deliver(self, hook: Webhook, alert: _Alert) -> None:
        """Post one alert to one webhook; count and log the outcome, never raise."""
        try:
            ok = await self._post(hook, alert)
        except asyncio.CancelledError:
            self._metrics.failed(alert.kind, hook.format)
            raise
        if ok:
            self._metrics.delivered(alert.kind, hook.format)
        else:
            self._metrics.failed(alert.kind, hook.format)

    async def _post(self, hook: Webhook, alert: _Alert) -> bool:
        if self._client.is_closed:
            log.warning("alert %s to %s not sent: the HTTP client is closed", alert.kind, hook.origin)
            return False
        body = self.format(hook, alert.kind, alert.fields)
        problem, retry = await self._attempt(hook, body)
        attempts = 1
        if problem is not None and retry:
            log.info("alert %s to %s failed (%s); retrying", alert.kind, hook.origin, problem)
            await asyncio.sleep(self.retry_delay)
            problem, _ = await self._attempt(hook, body)
            attempts = 2
        if problem is None:
            return True
        log.warning("alert %s to %s failed after %d attempt(s): %s", alert.kind, hook.origin, attempts, problem)
        return False

    async def _attempt(self, hook: Webhook, body: dict[str, object]) -> tuple[str | None, bool]:
        """One POST: (None, _) when delivered, else (what went wrong, whether to retry)."""
        try:
            response = await self._client.post(hook.url, json=body, timeout=hook.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            message = _scrub(str(exc), hook)
            return (f"{type(exc).__name__}: {message}" if message else type(exc).__name__), _retryable(exc)
        if response.is_success:
            return None, False
        detail = _scrub(response.text[:200], hook)
        return f"HTTP {response.status_code} {detail}".strip(), response.is_server_error

    def _count_failed(self, alert: _Alert) -> None:
        for hook in alert.hooks:
            self._metrics.failed(alert.kind, hook.format)


def _retryable(exc: Exception) -> bool:
    """Connection failures are worth one more try; a read that timed out is not: the
    hook may have got the alert, and waiting again would hold up the ones behind it."""
    if isinstance(exc, httpx.TimeoutException):
        return isinstance(exc, httpx.ConnectTimeout)
    return isinstance(exc, httpx.TransportError)


def _scrub(text: str, hook: Webhook) -> str:
    """Remove the webhook's URL and path (which may hold a token) from error text."""
    url = httpx.URL(hook.url)
    for secret in (hook.url, str(url), url.raw_path.decode("ascii", "replace")):
        if secret and secret != "/":
            text = text.replace(secret, "<redacted>")
    return text
