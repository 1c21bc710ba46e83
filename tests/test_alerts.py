"""Operator alerts: body formats (pure), and delivery to a real webhook receiver on
127.0.0.1 — filtering, de-duplication, retries, timeouts, shutdown, no token in logs."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.alerts import Alerter, Webhook, dedupe_key, summarize
from proxy.config import ALERT_KINDS

TOKEN = "123456:SECRET-TOKEN-abc"


class Receiver:
    """A webhook endpoint: records each POST as (path, JSON body) and answers from a
    per-path script of statuses; "hang" holds the request until teardown."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []
        self.script: dict[str, list[int | str]] = {}
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.path, await request.json()))
        plan = self.script.get(request.path)
        action = plan.pop(0) if plan else 200
        if action == "hang":
            await self.release.wait()
            action = 200
        assert isinstance(action, int)
        return web.json_response({"ok": action < 300}, status=action)

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in self.received if p == path]


class RecordingMetrics:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def delivered(self, kind: str, fmt: str) -> None:
        self.events.append(("delivered", kind, fmt))

    def failed(self, kind: str, fmt: str) -> None:
        self.events.append(("failed", kind, fmt))

    def suppressed(self, kind: str) -> None:
        self.events.append(("suppressed", kind))

    def count(self, outcome: str) -> int:
        return Counter(event[0] for event in self.events)[outcome]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def serve(rec: Receiver, port: int = 0) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    runner = await serve(rec)
    yield rec
    rec.release.set()
    await runner.cleanup()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest_asyncio.fixture
async def make(client: httpx.AsyncClient, metrics: RecordingMetrics) -> AsyncIterator[Callable[..., Alerter]]:
    """`make(*webhooks, **kwargs)`: an Alerter with the recording metrics, closed after the test."""
    made: list[Alerter] = []

    def _make(*hooks: Webhook, **kwargs: Any) -> Alerter:
        alerter = Alerter(hooks, client, metrics=metrics, retry_delay=0.01, **kwargs)
        made.append(alerter)
        return alerter

    yield _make
    for alerter in made:
        await alerter.aclose(timeout=0.5)


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


FAILOVER: dict[str, str] = {
    "route": "default",
    "from_provider": "openai-4o",
    "to_provider": "local-qwen",
    "reason": "timeout",
}
HOOK = Webhook("https://hooks.example/x")
CLIENT = httpx.AsyncClient()  # for the pure tests: never sends, holds no connection


# --- pure: summaries, bodies, dedupe, validation ---------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields", "summary"),
    [
        ("failover", FAILOVER, "failover on route default: openai-4o → local-qwen (timeout)"),
        (
            "breaker_open",
            {"provider": "openai-4o", "reason": "server_error: 3 consecutive failures", "retry_in_s": 30.0},
            "breaker open: openai-4o (server_error: 3 consecutive failures), retry in 30s",
        ),
        ("breaker_open", {"provider": "a", "reason": "x", "retry_in_s": 12.5}, "breaker open: a (x), retry in 12.5s"),
        ("recovered", {"provider": "openai-4o", "state": "healthy"}, "recovered: openai-4o"),
        (
            "quota_exhausted",
            {"provider": "openai-4o", "reason": "daily quota reached: 5000/5000 requests"},
            "quota exhausted: openai-4o (daily quota reached: 5000/5000 requests)",
        ),
        (
            "quota_fail_closed",
            {"provider": "openai-4o", "reason": "connection refused"},
            "quota gate failing closed for openai-4o: state store unavailable (connection refused)",
        ),
        ("store_down", {"operation": "admit", "reason": "READONLY"}, "state store down: READONLY (on admit)"),
        ("store_up", {}, "state store back"),
        (
            "config_reload_failed",
            {"source": "SIGHUP", "problems": "routes.default[2]: unknown provider\n  'olama'"},
            "config reload rejected: routes.default[2]: unknown provider 'olama' (from SIGHUP)",
        ),
        ("failover", {}, "failover on route ?: ? → ? (?)"),
    ],
)
def test_summary_is_one_human_line(kind: str, fields: dict[str, object], summary: str) -> None:
    assert summarize(kind, fields) == summary


def test_summary_is_capped() -> None:
    line = summarize("store_down", {"operation": "admit", "reason": "x" * 1000})
    assert len(line) == 300 and line.endswith("…")


def test_json_body() -> None:
    alerter = Alerter([HOOK], CLIENT, instance="pod-1")
    body = alerter.format(HOOK, "failover", {**FAILOVER, "ts": 1700000000.25, "suppressed": 3})
    assert body == {
        "event": "failover",
        "ts": 1700000000.25,
        "instance": "pod-1",
        "summary": "failover on route default: openai-4o → local-qwen (timeout)",
        **FAILOVER,
        "suppressed": 3,
    }
    fresh = alerter.format(HOOK, "store_up", {})
    assert fresh["suppressed"] == 0 and isinstance(fresh["ts"], float) and abs(fresh["ts"] - time.time()) < 5


def test_slack_body_is_escaped_mrkdwn() -> None:
    hook = Webhook("https://hooks.slack.com/services/T/B/X", format="slack")
    alerter = Alerter([hook], CLIENT, instance="pod-1")
    fields = {"provider": "a<b>", "reason": "x & y", "retry_in_s": 30.0, "ts": 1.0, "suppressed": 2}
    body = alerter.format(hook, "breaker_open", fields)
    assert body["text"] == "\N{LARGE RED CIRCLE} *fallback-proxy* breaker open: a&lt;b&gt; (x &amp; y), retry in 30s"
    assert body["blocks"] == [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": "\n".join(
                    [
                        str(body["text"]),
                        "*provider*: a&lt;b&gt;",
                        "*reason*: x &amp; y",
                        "*retry_in_s*: 30",
                        "*instance*: pod-1",
                        "*suppressed*: 2 more since the last alert",
                    ]
                ),
            },
        }
    ]


def test_telegram_body_is_plain_text() -> None:
    hook = Webhook(f"https://api.telegram.org/bot{TOKEN}/sendMessage", format="telegram", chat_id="-10042")
    alerter = Alerter([hook], CLIENT)
    body = alerter.format(hook, "recovered", {"provider": "openai-4o", "state": "healthy", "note": None})
    assert body == {
        "chat_id": "-10042",
        "text": "recovered: openai-4o\nprovider: openai-4o\nstate: healthy",
        "disable_web_page_preview": True,
    }
    huge = alerter.format(hook, "store_down", {"operation": "admit", "reason": "r" * 10_000})
    assert isinstance(huge["text"], str) and len(huge["text"]) == 4096


def test_dedupe_key_is_kind_and_provider() -> None:
    assert dedupe_key("breaker_open", {"provider": "a"}) == ("breaker_open", "a")
    assert dedupe_key("failover", FAILOVER) == ("failover", "openai-4o")
    assert dedupe_key("store_up", {}) == ("store_up", "-")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": f"ftp://api.telegram.org/bot{TOKEN}"}, "http"),
        ({"url": f"https:///bot{TOKEN}"}, "http"),
        ({"url": f"https://api.telegram.org/bot{TOKEN}", "format": "xml"}, "format"),
        ({"url": f"https://api.telegram.org/bot{TOKEN}", "format": "telegram"}, "chat_id"),
        ({"url": f"https://api.telegram.org/bot{TOKEN}", "events": frozenset({"failover", "oops"})}, "oops"),
        ({"url": f"https://api.telegram.org/bot{TOKEN}", "timeout": 0}, "timeout"),
    ],
)
def test_invalid_webhook_is_rejected_without_echoing_the_url(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Webhook(**kwargs)
    assert "SECRET" not in str(info.value)


def test_webhook_repr_shows_only_the_origin() -> None:
    hook = Webhook(f"https://api.telegram.org:8443/bot{TOKEN}/sendMessage?x=1", format="telegram", chat_id="1")
    assert hook.origin == "https://api.telegram.org:8443"
    assert "SECRET" not in repr(hook) and "api.telegram.org:8443" in repr(hook)
    assert "SECRET" not in repr(Alerter([hook], CLIENT))
    assert Webhook("https://x.example/a").events == ALERT_KINDS


# --- delivery over a real socket -------------------------------------------------------


@pytest.mark.asyncio
async def test_each_format_is_delivered(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    hooks = [
        Webhook(receiver.url + "/json"),
        Webhook(receiver.url + "/slack", format="slack"),
        Webhook(f"{receiver.url}/bot{TOKEN}/sendMessage", format="telegram", chat_id="7"),
    ]
    alerter = make(*hooks, instance="pod-1")
    await alerter.start()
    before = time.time()
    alerter.notify("failover", **FAILOVER)
    await eventually(lambda: metrics.count("delivered") == 3)

    (sent_json,) = receiver.bodies("/json")
    assert before - 1 < sent_json.pop("ts") < time.time() + 1
    assert sent_json == {
        "event": "failover",
        "instance": "pod-1",
        "summary": "failover on route default: openai-4o → local-qwen (timeout)",
        **FAILOVER,
        "suppressed": 0,
    }
    (sent_slack,) = receiver.bodies("/slack")
    assert sent_slack == alerter.format(hooks[1], "failover", FAILOVER)
    (sent_telegram,) = receiver.bodies(f"/bot{TOKEN}/sendMessage")
    assert sent_telegram == alerter.format(hooks[2], "failover", FAILOVER)
    assert sorted(metrics.events) == sorted(("delivered", "failover", fmt) for fmt in ("json", "slack", "telegram"))


@pytest.mark.asyncio
async def test_each_webhook_gets_only_its_events(receiver: Receiver, make: Callable[..., Alerter]) -> None:
    alerter = make(
        Webhook(receiver.url + "/failovers", events=frozenset({"failover"})),
        Webhook(receiver.url + "/health", events=frozenset({"breaker_open", "recovered"})),
    )
    await alerter.start()
    alerter.notify("failover", **FAILOVER)
    alerter.notify("breaker_open", provider="a", reason="x", retry_in_s=30)
    alerter.notify("store_up")  # nobody subscribes
    await alerter.aclose()
    assert [b["event"] for b in receiver.bodies("/failovers")] == ["failover"]
    assert [b["event"] for b in receiver.bodies("/health")] == ["breaker_open"]
    assert len(receiver.received) == 2


@pytest.mark.asyncio
async def test_repeats_within_the_window_are_suppressed_and_counted(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    clock = FakeClock()
    alerter = make(Webhook(receiver.url + "/h"), dedupe_seconds=300, clock=clock)
    await alerter.start()

    def breaker(provider: str, at: float) -> None:
        clock.now = at
        alerter.notify("breaker_open", provider=provider, reason="server_error", retry_in_s=30)

    breaker("a", 1000)  # sent
    breaker("a", 1100)  # suppressed
    breaker("b", 1150)  # another provider: sent
    breaker("a", 1299)  # suppressed
    alerter.notify("failover", **FAILOVER)  # another kind: sent
    breaker("a", 1300)  # the window is over: sent, carrying the 2 suppressed
    breaker("a", 1301)  # a new window: suppressed
    await eventually(lambda: metrics.count("delivered") == 4)

    sent = [(b["event"], b.get("provider"), b["suppressed"]) for b in receiver.bodies("/h")]
    assert sent == [("breaker_open", "a", 0), ("breaker_open", "b", 0), ("failover", None, 0), ("breaker_open", "a", 2)]
    assert metrics.count("suppressed") == 3 and ("suppressed", "breaker_open") in metrics.events


@pytest.mark.asyncio
async def test_notify_never_blocks_on_a_hanging_webhook(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script["/slow"] = ["hang", "hang"]
    # A hook that hangs for a second, against bounds of a quarter of that: slack for a busy box.
    alerter = make(Webhook(receiver.url + "/slow", timeout=1.0))
    await alerter.start()

    async def request_path() -> str:
        alerter.notify("failover", **FAILOVER)
        await asyncio.sleep(0)
        return "answer"

    started = time.perf_counter()
    alerter.notify("breaker_open", provider="a", reason="x", retry_in_s=1)
    assert time.perf_counter() - started < 0.25
    await eventually(lambda: len(receiver.received) == 1)  # the hook now hangs
    started = time.perf_counter()
    assert await request_path() == "answer"
    assert time.perf_counter() - started < 0.25

    await eventually(lambda: metrics.count("failed") == 2, timeout=5)
    assert metrics.events == [("failed", "breaker_open", "json"), ("failed", "failover", "json")]
    assert len(receiver.received) == 2  # a read timeout is not retried
    assert "ReadTimeout" in caplog.text


@pytest.mark.asyncio
async def test_a_server_error_is_retried_once(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    receiver.script["/flaky"] = [500]
    receiver.script["/down"] = [503, 502, 200]
    alerter = make(Webhook(receiver.url + "/flaky"), Webhook(receiver.url + "/down", format="slack"))
    await alerter.start()
    alerter.notify("recovered", provider="a", state="healthy")
    await eventually(lambda: len(metrics.events) == 2)
    assert len(receiver.bodies("/flaky")) == 2 and len(receiver.bodies("/down")) == 2
    assert sorted(metrics.events) == [("delivered", "recovered", "json"), ("failed", "recovered", "slack")]


@pytest.mark.asyncio
async def test_a_client_error_is_not_retried(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script["/bad"] = [400]
    alerter = make(Webhook(receiver.url + "/bad"))
    await alerter.start()
    alerter.notify("store_up")
    await eventually(lambda: metrics.count("failed") == 1)  # counted once no attempt is left to make
    assert len(receiver.bodies("/bad")) == 1
    assert "HTTP 400" in caplog.text and "failed after 1 attempt(s)" in caplog.text


@pytest.mark.asyncio
async def test_a_failing_webhook_does_not_stop_the_others(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    alerter = make(Webhook(f"http://127.0.0.1:{unused_port()}/refused"), Webhook(receiver.url + "/ok"))
    await alerter.start()
    alerter.notify("quota_exhausted", provider="a", reason="daily quota reached")
    alerter.notify("quota_exhausted", provider="b", reason="daily quota reached")
    await eventually(lambda: len(metrics.events) == 4)
    assert [b["provider"] for b in receiver.bodies("/ok")] == ["a", "b"]
    assert (
        sorted(metrics.events)
        == [("delivered", "quota_exhausted", "json")] * 2 + [("failed", "quota_exhausted", "json")] * 2
    )


@pytest.mark.asyncio
async def test_the_url_token_never_reaches_the_logs(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="httpx")  # as configure_logging does: httpx logs full URLs at INFO
    caplog.set_level(logging.DEBUG)
    path = f"/bot{TOKEN}/sendMessage"
    receiver.script[path] = [500, 500, "hang", 404]
    hooks = [
        Webhook(f"{receiver.url}{path}?key=SECRET-QUERY", format="telegram", chat_id="1", timeout=0.3),
        Webhook(f"http://user:SECRET-PASSWORD@127.0.0.1:{unused_port()}/bot{TOKEN}/x", format="telegram", chat_id="1"),
    ]
    alerter = make(*hooks)
    await alerter.start()
    alerter.notify("store_down", operation="admit", reason="READONLY")  # 500, 500 / refused
    alerter.notify("store_up")  # hangs (timeout) / refused
    alerter.notify("quota_exhausted", provider="a", reason="r")  # 404 / refused
    await eventually(lambda: metrics.count("failed") == 6)

    assert caplog.records and "SECRET" not in caplog.text
    assert all("SECRET" not in str(r.args) and "SECRET" not in (r.exc_text or "") for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6
    assert any(receiver.url in w and "HTTP 500" in w for w in warnings)
    assert any(f"http://127.0.0.1:{hooks[1].origin.rsplit(':', 1)[1]}" in w for w in warnings)


@pytest.mark.asyncio
async def test_aclose_flushes_what_is_queued(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    alerter = make(Webhook(receiver.url + "/h"))
    await alerter.start()
    for provider in "abcde":
        alerter.notify("recovered", provider=provider, state="healthy")
    await alerter.aclose()
    assert [b["provider"] for b in receiver.bodies("/h")] == list("abcde")
    assert metrics.count("delivered") == 5
    alerter.notify("recovered", provider="f", state="healthy")  # closed: ignored
    assert alerter.pending == 0


@pytest.mark.asyncio
async def test_aclose_gives_up_after_its_timeout(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    receiver.script["/slow"] = ["hang"]
    alerter = make(Webhook(receiver.url + "/slow", timeout=5))
    await alerter.start()
    alerter.notify("recovered", provider="a", state="healthy")
    alerter.notify("recovered", provider="b", state="healthy")
    await eventually(lambda: len(receiver.received) == 1)
    started = time.perf_counter()
    await alerter.aclose(timeout=0.2)
    assert time.perf_counter() - started < 1
    assert metrics.events == [("failed", "recovered", "json")] * 2  # the one in flight and the one queued


@pytest.mark.asyncio
async def test_a_full_queue_drops_and_counts(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics
) -> None:
    alerter = make(Webhook(receiver.url + "/h"), Webhook(receiver.url + "/s", format="slack"), queue_size=1)
    alerter.notify("recovered", provider="a", state="healthy")
    alerter.notify("recovered", provider="b", state="healthy")  # no room
    assert alerter.pending == 1
    assert metrics.events == [("failed", "recovered", "json"), ("failed", "recovered", "slack")]
    await alerter.aclose()  # flushes even though the worker was never started
    assert [b["provider"] for b in receiver.bodies("/h")] == ["a"]


@pytest.mark.asyncio
async def test_without_webhooks_or_with_an_unknown_kind_nothing_happens(
    receiver: Receiver, make: Callable[..., Alerter], metrics: RecordingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    idle = make()
    await idle.start()
    idle.notify("failover", **FAILOVER)
    assert idle.pending == 0
    await idle.aclose()
    alerter = make(Webhook(receiver.url + "/h"))
    alerter.notify("bogus", provider="a")
    assert alerter.pending == 0 and "unknown kind 'bogus'" in caplog.text
    assert metrics.events == []


def test_notify_without_a_running_loop_is_a_no_op(metrics: RecordingMetrics) -> None:
    rec = Receiver()
    port = unused_port()
    client = httpx.AsyncClient()
    alerter = Alerter([Webhook(f"http://127.0.0.1:{port}/h")], client, metrics=metrics, clock=lambda: 0.0)
    alerter.notify("breaker_open", provider="a", reason="x", retry_in_s=1)
    assert alerter.pending == 0 and metrics.events == []

    async def then_in_a_loop() -> None:
        runner = await serve(rec, port)
        await alerter.start()
        alerter.notify("breaker_open", provider="a", reason="x", retry_in_s=1)
        await alerter.aclose()
        await client.aclose()
        await runner.cleanup()

    asyncio.run(then_in_a_loop())
    # the ignored call opened no dedupe window: the next one went out
    assert len(rec.received) == 1 and metrics.events == [("delivered", "breaker_open", "json")]
