"""The load generator of the slow-streams scenario: many concurrent streaming
clients in one process (run several for more), one keep-alive connection each.

    python -m tests.benchmarks.slowload --port 8080 --users 2500 --ramp 5 --hold 20 --t0 $(date +%s.%N)

Each user starts at its share of the ramp, then sends one streaming request
after another until the hold is over, and notes what it saw: streams completed
(a 200 that ended with `data: [DONE]` and no in-band error), refusals (503
`server_overloaded`, retried after Retry-After with exponential backoff and
jitter, as the OpenAI SDKs do), every other failure by kind, the time to the
first event, and the gaps between the reads that brought events (the
inter-chunk delay a client sees). Gaps and first-event times are counted only
inside the measurement window (`--window-start`, `--window-end`, seconds after
`--t0`, a wall-clock time shared by every process of one run).

A raw asyncio protocol with httptools on uvloop, not aiohttp: at 10,000 streams
of 10 chunks per second the generator reads 100,000 chunks per second on the
core it shares with the upstream, and aiohttp's client costs several times
more per read. Every second it prints one status line (`{"open": ...}`) on
stdout, and at the end one result line (`{"result": ...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

EVENT_END = b"\n\n"
DONE = b"data: [DONE]\n\n"
MAX_BACKOFF = 8.0
# A connection idle longer than this is closed by the client itself, as pooled
# HTTP clients do (httpx: 5 s), so it never races uvicorn's 5 s keep-alive close.
IDLE_CLOSE = 4.0


@dataclass
class Tally:
    """What this process saw; histograms are {0.1 ms bin: count}."""

    completed: int = 0  # streams that ended with [DONE], whenever they ended
    completed_in_window: int = 0
    refused: int = 0  # 503 server_overloaded
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    gaps: collections.Counter[int] = field(default_factory=collections.Counter)
    first_event: collections.Counter[int] = field(default_factory=collections.Counter)
    open: int = 0  # streams with a 200 head and no end yet
    peak_open: int = 0
    in_flight: int = 0  # requests sent and not ended (the server holds them, head or not)


class Exchange:
    """One response being read: status, what kind of failure it was, the events' timing."""

    __slots__ = (
        "body",
        "done",
        "error",
        "events",
        "last_read",
        "retry_after",
        "reused",
        "sent_at",
        "status",
        "tail",
    )

    def __init__(self, sent_at: float, reused: bool) -> None:
        self.sent_at = sent_at
        self.reused = reused  # the connection had answered before (a keep-alive close can race it)
        self.status = 0
        self.body = bytearray()  # kept only for an error answer
        self.tail = b""  # the last bytes of a stream: [DONE], events split across reads
        self.events = 0
        self.last_read = 0.0
        self.retry_after = 1.0
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Client(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, tally: Tally, in_window: Callable[[float], bool]) -> None:
        self.tally = tally
        self.in_window = in_window
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        exchange = self.exchange
        if exchange is not None and not exchange.done.done():
            if exchange.status:
                self._end(exchange, "connection closed mid-answer")
            elif exchange.reused:
                self._end(exchange, "connection closed before an answer (reused keep-alive connection)")
            else:
                self._end(exchange, "connection closed before an answer (new connection)")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.exchange is not None and not self.exchange.done.done():
                self._end(self.exchange, "unparsable answer")
            if self.transport is not None:
                self.transport.close()

    def send(self, raw: bytes) -> Exchange:
        assert self.transport is not None
        self.exchange = Exchange(time.perf_counter(), self.answered > 0)
        self.answered += 1
        self.tally.in_flight += 1
        self.transport.write(raw)
        return self.exchange

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after" and self.exchange is not None:
            with contextlib.suppress(ValueError):
                self.exchange.retry_after = float(value)

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.status = self.parser.get_status_code()
        if exchange.status == 200:
            self.tally.open += 1
            self.tally.peak_open = max(self.tally.peak_open, self.tally.open)

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.status != 200:
            exchange.body += data
            return
        joined = exchange.tail + data
        events = joined.count(EVENT_END) - exchange.tail.count(EVENT_END)
        exchange.tail = joined[-len(DONE) :]
        if not events:
            return
        now = time.perf_counter()
        if exchange.events == 0:
            if self.in_window(now):
                self.tally.first_event[round((now - exchange.sent_at) * 10_000)] += 1
        elif self.in_window(now):
            self.tally.gaps[round((now - exchange.last_read) * 10_000)] += 1
        if b'"error"' in data:
            exchange.error = "in-band error event"
        exchange.events += events
        exchange.last_read = now

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.status != 200:
            self._end(exchange, None)
        elif exchange.error is None and not exchange.tail.endswith(DONE):
            self._end(exchange, "stream ended without [DONE]")
        else:
            self._end(exchange, exchange.error)

    def _end(self, exchange: Exchange, error: str | None) -> None:
        if exchange.status == 200:
            self.tally.open -= 1
        self.tally.in_flight -= 1
        exchange.error = error
        exchange.done.set_result(None)


@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    raw: bytes
    t0: float  # wall clock
    ramp: float
    hold: float
    window: tuple[float, float]  # seconds after t0
    users: int


def classify_refusal(exchange: Exchange) -> str:
    """'server_overloaded', or the failure's kind for the tally."""
    code = ""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        code = json.loads(bytes(exchange.body))["error"]["code"] or ""
    if exchange.status == 503 and code == "server_overloaded":
        return "server_overloaded"
    return f"HTTP {exchange.status} {code}".strip()


async def user(index: int, plan: Plan, tally: Tally, clock: Callable[[], float]) -> None:
    """One client: streams, one after another, on one connection (a new one after a failure)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, plan.ramp * index / plan.users - clock()))
    end = plan.ramp + plan.hold
    window_start, window_end = plan.window
    start_perf = time.perf_counter() - clock()  # perf_counter at t0

    def in_window(now: float) -> bool:
        return window_start <= now - start_perf < window_end

    client: Client | None = None
    backoff = 0.5
    while clock() < end:
        if client is None or client.transport is None:
            try:
                _, client = await loop.create_connection(lambda: Client(tally, in_window), plan.host, plan.port)
            except OSError as exc:
                tally.errors[f"connect: {type(exc).__name__}"] += 1
                client = None
                await asyncio.sleep(0.5)
                continue
        exchange = client.send(plan.raw)
        await exchange.done
        if exchange.status == 200 and exchange.error is None:
            tally.completed += 1
            if in_window(time.perf_counter()):
                tally.completed_in_window += 1
            backoff = 0.5
            continue
        if exchange.status:
            kind = classify_refusal(exchange) if exchange.status != 200 else str(exchange.error)
        else:
            kind = str(exchange.error)
        if kind == "server_overloaded":
            tally.refused += 1
            delay = max(exchange.retry_after, backoff) * (0.5 + random.random())
            backoff = min(MAX_BACKOFF, backoff * 2)
            if delay >= IDLE_CLOSE and client.transport is not None:
                client.transport.close()
                client = None
            await asyncio.sleep(delay)
            continue
        tally.errors[kind] += 1
        if client.transport is None:
            client = None
        await asyncio.sleep(0.2)
    if client is not None and client.transport is not None:
        client.transport.close()


async def report(tally: Tally, clock: Callable[[], float], until: float) -> None:
    while clock() < until:
        await asyncio.sleep(1.0)
        line = {
            "t": round(clock(), 2),
            "open": tally.open,
            "in_flight": tally.in_flight,
            "completed": tally.completed,
            "refused": tally.refused,
        }
        print(json.dumps(line), flush=True)


async def run(plan: Plan) -> Tally:
    tally = Tally()
    offset = time.time() - time.perf_counter()

    def clock() -> float:
        """Seconds since the run's t0 (shared by every process)."""
        return time.perf_counter() + offset - plan.t0

    reporter = asyncio.create_task(report(tally, clock, plan.ramp + plan.hold + 120))
    try:
        await asyncio.gather(*(user(i, plan, tally, clock) for i in range(plan.users)))
    finally:
        reporter.cancel()
    return tally


def request(host: str, port: int, path: str, model: str) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Stream thirty words, slowly."}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--model", default="default")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the users start")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds after the ramp before users stop")
    parser.add_argument("--t0", type=float, default=None, help="wall-clock start shared by every generator")
    parser.add_argument("--window-start", type=float, default=None)
    parser.add_argument("--window-end", type=float, default=None)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.users + 64 > hard:
        raise SystemExit(f"{args.users} users need more than RLIMIT_NOFILE {hard}: run more generators")
    plan = Plan(
        host=args.host,
        port=args.port,
        raw=request(args.host, args.port, args.path, args.model),
        t0=args.t0 if args.t0 is not None else time.time(),
        ramp=args.ramp,
        hold=args.hold,
        window=(
            args.ramp if args.window_start is None else args.window_start,
            args.ramp + args.hold if args.window_end is None else args.window_end,
        ),
        users=args.users,
    )
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    tally = runner(run(plan))
    result = {
        **{key: value for key, value in vars(tally).items() if not isinstance(value, collections.Counter)},
        "errors": dict(tally.errors),
        "gaps": {str(k): v for k, v in tally.gaps.items()},
        "first_event": {str(k): v for k, v in tally.first_event.items()},
    }
    print(json.dumps({"result": result}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
