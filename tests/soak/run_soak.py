"""A bounded load and soak test of `fallback-proxy serve`, loopback only.

    python -m tests.soak.run_soak [--clients 200] [--minutes 2] [--seed N]

Starts its own redis-server (append-only, so a SIGKILL loses no acknowledged
write; on a free port), four fake
OpenAI providers as subprocesses (two that flap, a quota'd one with a small
quota that flaps too, and a healthy quota'd last fallback), and the proxy as a
subprocess with Redis and an admin key. While N streaming clients send requests
in a loop until the end time (each with a client-side deadline), a flapper gives
the fakes a new random fault every second (503/500/429, hangs, slow tokens,
mid-stream deaths, in-band errors) and Redis is SIGKILLed and restarted a few
times. Then it heals everything, waits a quiet period and checks: every request
ended with a complete answer or a clean OpenAI error; the proxy's RSS and file
descriptors; the quota counters in Redis against the requests the fakes received.

Prints a summary and exits 1 when a check fails. See docs/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import re
import ssl
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from tests.redis_server import free_port
from tests.soak import chaos
from tests.soak.load import REPLIES, Result, client_loop, watch_lag
from tests.soak.procs import Child, DurableRedis, Sample, sample, start_fake, start_proxy, wait_http
from tests.soak.report import summarize

CLIENT_KEY = "sk-soak-client"
ADMIN_KEY = "sk-soak-admin"
FLAPPING = ("flaky-a", "flaky-b", "small")
QUOTAED = ("small", "anchor")
SAMPLE_EVERY = 10.0
ROUTE_BUDGET = 20


@dataclass
class Run:
    """Everything the soak started and measured."""

    args: argparse.Namespace
    workdir: Path
    redis: DurableRedis
    fakes: dict[str, Child]
    fake_urls: dict[str, str]
    proxy: Child | None = None
    proxy_port: int = 0
    started: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    chaos_log: list[str] = field(default_factory=list)
    fault_changes: Counter[str] = field(default_factory=Counter)
    redis_timeline: chaos.RedisTimeline = field(default_factory=chaos.RedisTimeline)
    load_seconds: float = 0.0
    peers: dict[str, str] = field(default_factory=dict)  # socket inode -> peer, across samples
    lags: list[tuple[float, float]] = field(default_factory=list)  # (when, this process's loop lag)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def sample(self, label: str) -> Sample:
        assert self.proxy is not None
        ports = {int(u.rsplit(":", 1)[1]) for u in self.fake_urls.values()}
        taken = sample(
            self.proxy.pid,
            time.monotonic() - self.started,
            label,
            own_port=self.proxy_port,
            upstream_ports=ports,
            redis_port=self.redis.port,
            peers=self.peers,
        )
        self.samples.append(taken)
        return taken


def proxy_config(run: Run, small_quota: int) -> dict[str, Any]:
    timeout = {"connect": 1, "first_token": 3, "idle": 2, "total": 20}

    def provider(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": f"openai/soak-{name}",
            "api_key": "sk-upstream",
            "api_base": run.fake_urls[name] + "/v1",
            "timeout": timeout,
            **extra,
        }

    return {
        "redis": {"url": run.redis.url},
        "auth": {"keys": [CLIENT_KEY]},
        "server": {"admin_key": ADMIN_KEY, "shutdown_grace_seconds": 10, "reload_check_seconds": 0},
        "limits": {"concurrent_streams": 100_000},
        "health": {
            "failure_threshold": 3,
            "cooldown_seconds": 5,
            "probe_interval_seconds": 2,
            "probe_timeout_seconds": 1,
        },
        "providers": {
            "flaky-a": provider("flaky-a", retries=1),
            "flaky-b": provider("flaky-b"),
            "small": provider("small", retries=1, quota={"requests_per_day": small_quota}),
            "anchor": provider("anchor", quota={"requests_per_day": 10_000_000, "tokens_per_day": 10**9}),
        },
        # A budget under the clients' deadline: without one a walk may take the sum
        # of every provider's total timeout, retries included.
        "routes": {
            "default": {"chain": ["flaky-a", "flaky-b", "small", "anchor"], "budget": ROUTE_BUDGET},
            "hedged": {"chain": ["flaky-b", "small", "anchor"], "hedge_after_ms": 400, "budget": ROUTE_BUDGET},
            "edges": {
                "first": "flaky-a",
                "budget": ROUTE_BUDGET,
                "on": {"flaky-a": {"rate_limited": "anchor", "default": "small"}, "small": {"default": "anchor"}},
            },
        },
    }


def start_everything(run: Run) -> None:
    """Redis, the fakes and the proxy, each answering; `stop_everything` undoes it, even halfway."""
    run.redis.start()
    for name, reply in REPLIES.items():
        port = free_port()
        run.fakes[name] = start_fake(name, port, reply, run.workdir)
        run.fake_urls[name] = f"http://127.0.0.1:{port}"
    for name, url in run.fake_urls.items():
        wait_http(url + "/_fault", run.fakes[name])
    args = run.args
    small_quota = args.small_quota or max(20, int(args.clients * args.minutes))
    config = run.workdir / "proxy.yaml"
    config.write_text(yaml.safe_dump(proxy_config(run, small_quota), sort_keys=False))
    run.proxy_port = free_port()
    run.proxy = start_proxy(config, run.proxy_port, run.workdir)
    wait_http(run.url + "/readyz", run.proxy, timeout=60)


async def drive(run: Run) -> None:
    """The load, the chaos and the sampler until the end time and the last client is
    done; then everything healed, the quiet period and the last sample."""
    args = run.args
    run.started = time.monotonic()
    end = run.started + args.minutes * 60
    rng = random.Random(args.seed)
    watcher = asyncio.create_task(chaos.watch_store(run.url, run.started, run.redis_timeline))
    lag = asyncio.create_task(watch_lag(run.lags))
    sampler = asyncio.create_task(_sample_every(run, SAMPLE_EVERY))
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    tls = ssl.create_default_context()  # unused on http://, but each client would load the CA bundle again

    def connect() -> httpx.AsyncClient:
        # One client (one keep-alive connection) per simulated user: a pool shared by
        # hundreds of streams queues requests in httpcore for seconds before they are sent.
        return httpx.AsyncClient(
            base_url=run.url, headers=headers, verify=tls, timeout=httpx.Timeout(args.deadline * 2, connect=5)
        )

    clients = [
        asyncio.create_task(client_loop(connect, n, end, args.deadline, random.Random(rng.random()), run.results))
        for n in range(args.clients)
    ]
    flapper = asyncio.create_task(
        chaos.flap(
            {name: run.fake_urls[name] for name in FLAPPING}, end, random.Random(rng.random()), run.fault_changes
        )
    )
    killer = asyncio.create_task(
        chaos.kill_redis(
            run.redis,
            run.started,
            end,
            args.redis_kills,
            random.Random(rng.random()),
            run.chaos_log,
            run.redis_timeline,
        )
    )
    async with asyncio.timeout(args.minutes * 60 + args.deadline + 30):
        await asyncio.gather(*clients, flapper, killer)
    sampler.cancel()
    lag.cancel()
    run.load_seconds = time.monotonic() - run.started
    run.sample("load end")
    await chaos.heal(list(run.fake_urls.values()))
    print(f"soak: load done after {run.load_seconds:.0f}s; quiet for {args.quiet:g}s", flush=True)
    await asyncio.sleep(max(0.0, args.quiet - 1))
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await asyncio.sleep(1)  # the proxy notices the watcher's connection close
    run.sample("quiet")


async def _sample_every(run: Run, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        run.sample("load")


# --- after the run ----------------------------------------------------------------


@dataclass
class Figures:
    fakes: dict[str, dict[str, int]]  # each fake's /_stats: chat completions received, their tokens
    redis: dict[str, tuple[int, int]]  # provider -> (req, tok) in Redis
    admin: dict[str, Any]
    metrics: dict[str, float]
    open_streams: dict[str, str]
    log: dict[str, Any]
    unsettled: dict[str, int] = field(default_factory=dict)  # provider -> admissions never settled
    exit_code: int | None = None
    exit_seconds: float = 0.0


def collect(run: Run) -> Figures:
    fakes = {name: httpx.get(url + "/_stats", timeout=5).json() for name, url in run.fake_urls.items()}
    store = redis.Redis(port=run.redis.port, decode_responses=True)
    try:
        counters, unsettled = {}, {}
        for provider in QUOTAED:
            req = tok = marks = 0
            for key in store.scan_iter(f"fp:{{{provider}}}:quota:*"):
                values = store.hgetall(key)
                req, tok = req + int(values.get("req", 0)), tok + int(values.get("tok", 0))
                marks += sum(1 for field in values if field.startswith("m:"))
            counters[provider], unsettled[provider] = (req, tok), marks
        # Open streams are leases (a sorted set per client key); every stream has ended by now.
        streams = {key: str(store.zcard(key)) for key in store.scan_iter("fp:*:lease:streams:*")}
    finally:
        store.close()
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    admin = httpx.get(run.url + "/admin/status", headers=auth, timeout=5).json()
    metrics = scrape(httpx.get(run.url + "/metrics", timeout=5).text)
    return Figures(fakes, counters, admin, metrics, streams, read_log(run), unsettled=unsettled)


def scrape(text: str) -> dict[str, float]:
    """Each `_total` counter family summed over its labels, and the store errors by operation."""
    sums: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        match = re.match(r"(fallback_proxy_[a-z_]+_total)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            sums[match.group(1)] += float(match.group(3))
            operation = re.search(r'operation="([a-z_]+)"', match.group(2) or "")
            if match.group(1) == "fallback_proxy_store_errors_total" and operation:
                sums[f"store_errors:{operation.group(1)}"] += float(match.group(3))
    return dict(sums)


def read_log(run: Run) -> dict[str, Any]:
    assert run.proxy is not None
    text = run.proxy.log.read_text(errors="replace")
    lines = text.splitlines()
    errors = [line for line in lines if '"level":"error"' in line or '"level":"critical"' in line]
    events = Counter(match.group(1) for line in lines if (match := re.match(r'\{"event":"([a-z_]+)"', line)))
    # Calls the upstream may or may not have received (cancelled, or the connection broke
    # with no answer): the quota counts them; the fake's count may be lower by as many.
    uncertain = Counter(json.loads(line)["provider"] for line in lines if line.startswith('{"event":"quota_uncertain"'))
    outcomes = {}
    # Answers each provider gave (an "ok" attempt), and the tokens of the answers it gave last
    # (a stream it continued included): what its token quota should hold.
    answered: Counter[str] = Counter()
    answered_tokens: Counter[str] = Counter()
    for line in lines:
        if line.startswith('{"event":"request"'):
            record = json.loads(line)
            outcomes[record["request_id"]] = (
                record["ts"] - record["total_ms"] / 1000,
                f"{record['status']} {record['outcome']} after {record['total_ms']:.0f} ms",
            )
            answered.update(a["provider"] for a in record["attempts"] if a["outcome"] == "ok")
            last = (record["continued_by"] or [record["provider"]])[-1]
            if last is not None and record["tokens"]:
                answered_tokens[last] += record["tokens"]["prompt"] + record["tokens"]["completion"]
    return {
        "requests": events.pop("request", 0),
        "outcomes": outcomes,
        "tracebacks": text.count("Traceback"),
        "errors": errors,
        "events": events,
        "uncertain": uncertain,
        "answered": answered,
        "answered_tokens": answered_tokens,
    }


def stop_proxy(run: Run, figures: Figures) -> None:
    """SIGTERM, as an orchestrator would: it must exit cleanly within its grace period."""
    assert run.proxy is not None
    started = time.monotonic()
    figures.exit_code = run.proxy.close(timeout=15)
    figures.exit_seconds = time.monotonic() - started


def stop_everything(run: Run) -> None:
    if run.proxy is not None:
        run.proxy.close(timeout=15)
    for fake in run.fakes.values():
        fake.close()
    run.redis.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.run_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent streaming clients (default 200)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the clients send (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    parser.add_argument("--deadline", type=float, default=30.0, help="client-side deadline per request, s")
    parser.add_argument(
        "--quiet",
        type=float,
        default=40.0,
        help="quiet period before the last sample, s (default 40: idle upstream "
        "keep-alive connections expire after 30 s)",
    )
    parser.add_argument("--redis-kills", type=int, default=3, help="times Redis is SIGKILLed (default 3)")
    parser.add_argument(
        "--small-quota",
        type=int,
        default=0,
        help="requests_per_day of the small quota'd provider (default: clients x minutes, at least 20)",
    )
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=64.0,
        help="RSS growth allowed from 10 s into the load to the end (default 64 MB)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.minutes <= 0 or args.minutes > 60:
        parser.error("--clients must be >= 1 and --minutes in (0, 60]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fp-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.clients} clients for {args.minutes:g} min, logs in {workdir}", flush=True)
    run = Run(args, workdir, DurableRedis(), {}, {})
    try:
        start_everything(run)
        run.started = time.monotonic()
        run.sample("start")
        asyncio.run(drive(run))
        figures = collect(run)
        stop_proxy(run, figures)
    finally:
        stop_everything(run)
    with (workdir / "results.jsonl").open("w") as file:
        for result in run.results:
            file.write(json.dumps(dataclasses.asdict(result)) + "\n")
    text, failed = summarize(run, figures)
    print(text)
    (workdir / "summary.txt").write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
