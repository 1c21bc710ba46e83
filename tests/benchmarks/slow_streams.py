"""The "concurrent slow streams" scenario: many long streams open at once, the
real load of an LLM gateway, on one fallback-proxy worker pinned to one core,
side by side with the bare aiohttp pass-through in the same run.

    python -m tests.benchmarks.run --slow-streams                  # 1,000 / 3,000 / 10,000 streams
    python -m tests.benchmarks.run --slow-streams --levels 200,500 --hold 8   # a quick check

Each stream is 30 chunks 100 ms apart from the fake upstream (`upstream.py
--chunk-interval-ms 100 --stream-chunks 30`). For every level and system, a
fresh system under test is started on core 0 and warmed up; then load
generators (`slowload.py`, 2,500 clients each, on core 1 with the upstream)
ramp up to the level over one stream's length, hold it, and stop. Measured
inside the window (after the ramp and one more stream's length, to the end of
the hold):

* streams completed (and in the window), refusals (503 `server_overloaded`) and
  every other error by kind;
* CPU per stream: the system's CPU time in the window over the streams
  completed in it;
* RSS per open stream: the median RSS in the window above the idle (warmed-up)
  process, over the median number of streams open at once;
* inter-chunk delay: the gaps a client sees between reads that bring events,
  minus the upstream's 100 ms; p50/p99, and the proxy's over the pass-through's;
* the proxy's event-loop lag p99 (`fallback_proxy_event_loop_lag_seconds`),
  its shed count, and after the level each provider's health and breaker.

Only ratios measured in one run mean anything: the machine is noisy (the report
gives the CPU that was none of ours, and steal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.benchmarks.run import (
    LOAD_CORE,
    SUT_CORE,
    Process,
    cpu_seconds,
    free_port,
    machine,
    machine_cpu,
    own_cpu,
    rss_mb,
    wait_ready,
)

LEVELS = (1000, 3000, 10000)
CHUNKS = 30
INTERVAL_MS = 100.0
USERS_PER_GENERATOR = 2500
WARMUP_USERS = 50
LAG_METRIC = "fallback_proxy_event_loop_lag_seconds"


@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]
    ramp: float | None  # seconds over which the clients start; None: one second per 1,000 streams, at least 3
    hold: float  # seconds after the ramp before they stop
    settle: float  # seconds after the ramp before the window opens
    max_in_flight: int | None  # None: the proxy's default
    systems: tuple[str, ...]
    chunks: int = CHUNKS  # per stream, INTERVAL_MS apart

    def ramp_for(self, level: int) -> float:
        return self.ramp if self.ramp is not None else max(3.0, level / 1000)

    def window(self, level: int) -> tuple[float, float]:
        """Seconds after the start: from one stream's length after the ramp to the end of the hold."""
        ramp = self.ramp_for(level)
        return ramp + self.settle, ramp + self.hold


@dataclass
class LevelResult:
    system: str
    level: int
    completed: int = 0
    completed_in_window: int = 0
    refused: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    cpu_s: float = 0.0
    load_core_cpu_s: float = 0.0  # upstream + generators + this script
    foreign_cpu_s: float = 0.0
    steal_s: float = 0.0
    idle_rss_mb: float = 0.0
    rss_mb: float = 0.0
    open_streams: float = 0.0  # median, in the window: 200 heads not yet ended
    in_flight: float = 0.0  # median, in the window: requests sent and not ended
    proxy_in_flight: float | None = None  # median, in the window: what the proxy counts (/readyz)
    not_ready_share: float | None = None  # share of /readyz probes in the window answered 503
    probe_timeout_share: float | None = None  # share of /readyz probes in the window not answered within 2 s
    peak_open: int = 0
    gap_p50_ms: float | None = None
    gap_p99_ms: float | None = None
    first_event_p50_ms: float | None = None
    first_event_p99_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    shed: float | None = None
    breaker_opened: float | None = None
    unhealthy: list[str] = field(default_factory=list)
    failure: str | None = None

    @property
    def cpu_ms_per_stream(self) -> float | None:
        return 1000 * self.cpu_s / self.completed_in_window if self.completed_in_window else None

    @property
    def rss_kb_per_stream(self) -> float | None:
        """Above the idle process, per request the server holds (a stream, or one waiting for its first event)."""
        if not self.in_flight:
            return None
        return 1024 * (self.rss_mb - self.idle_rss_mb) / self.in_flight

    @property
    def other_errors(self) -> int:
        return sum(self.errors.values())


# --- the systems ------------------------------------------------------------------------------


def proxy_config(port: int, upstream: int, max_in_flight: int | None) -> str:
    ceiling = "" if max_in_flight is None else f"  max_in_flight: {max_in_flight}\n"
    return (
        f"server:\n  host: 127.0.0.1\n  port: {port}\n{ceiling}"
        "providers:\n  bench:\n    model: openai/gpt-4o-mini\n    api_key: sk-bench\n"
        f"    api_base: http://127.0.0.1:{upstream}/v1\n"
        "routes:\n  default: [bench]\n"
    )


def start_system(name: str, settings: Settings, workdir: Path, upstream: int) -> tuple[Process, int]:
    port = free_port()
    if name == "aiohttp":
        command = [
            sys.executable,
            "-m",
            "tests.benchmarks.passthrough",
            "--upstream",
            f"http://127.0.0.1:{upstream}",
            "--port",
            str(port),
            "--limit",
            "0",
        ]
    else:
        config = workdir / "fallback-proxy-slow.yaml"
        config.write_text(proxy_config(port, upstream, settings.max_in_flight))
        command = [str(Path(sys.executable).parent / "fallback-proxy"), "serve", "--config", str(config)]
    process = Process(command, SUT_CORE, workdir / f"{name}.log")
    try:
        wait_ready(process, port, timeout=60)
    except BaseException:
        process.stop()
        raise
    return process, port


# --- the load generators ----------------------------------------------------------------------


class Generators:
    """The slowload processes of one level, their status lines read as they come."""

    def __init__(self, port: int, users: int, t0: float, ramp: float, hold: float, window: tuple[float, float]):
        self.processes: list[subprocess.Popen[str]] = []
        self.open: dict[int, int] = {}
        self.in_flight: dict[int, int] = {}
        self.results: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self._threads: list[threading.Thread] = []
        count = max(1, math.ceil(users / USERS_PER_GENERATOR))
        for index in range(count):
            share = users // count + (1 if index < users % count else 0)
            command = [
                "taskset",
                "-c",
                str(LOAD_CORE),
                sys.executable,
                "-m",
                "tests.benchmarks.slowload",
                "--port",
                str(port),
                "--users",
                str(share),
                "--t0",
                repr(t0),
                "--ramp",
                str(ramp),
                "--hold",
                str(hold),
                "--window-start",
                str(window[0]),
                "--window-end",
                str(window[1]),
            ]
            popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.processes.append(popen)
            thread = threading.Thread(target=self._read, args=(index, popen), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, index: int, popen: subprocess.Popen[str]) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            data = json.loads(line)
            if "result" in data:
                self.results.append(data["result"])
            else:
                self.open[index] = data["open"]
                self.in_flight[index] = data["in_flight"]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def open_now(self) -> tuple[int, int]:
        """(streams open, requests in flight) across the generators, as of their last status lines."""
        return sum(self.open.values()), sum(self.in_flight.values())

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for popen in self.processes:
            try:
                popen.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                self.problems.append(f"generator {popen.pid} did not finish in time")
            if popen.returncode and popen.stderr is not None:
                self.problems.append(popen.stderr.read()[-500:])
        for thread in self._threads:
            thread.join(timeout=5)


def merged(results: Sequence[dict[str, Any]], key: str) -> Counter[int]:
    total: Counter[int] = Counter()
    for result in results:
        total.update({int(k): v for k, v in result[key].items()})
    return total


def percentile_of_bins(bins: Counter[int], q: float, unit: float = 0.1) -> float | None:
    """The q-th percentile of a histogram of {bin: count} (bins of `unit` ms)."""
    total = sum(bins.values())
    if not total:
        return None
    rank = math.ceil(q / 100 * total)
    seen = 0
    for value in sorted(bins):
        seen += bins[value]
        if seen >= rank:
            return value * unit
    return max(bins) * unit


# --- the proxy's own metrics ---------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text: str = answer.read().decode()
        return text


_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric family's samples named `name`."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            found[match["labels"] or ""] = float(match["value"])
    return found


def lag_p99_ms(before: str, after: str) -> float | None:
    """p99 of the loop-lag samples taken between two scrapes (linear within a bucket)."""
    name = LAG_METRIC + "_bucket"
    old, new = samples(before, name), samples(after, name)
    buckets = sorted(
        ((float(labels.split('"')[1]), new[labels] - old.get(labels, 0.0)) for labels in new),
        key=lambda b: b[0],
    )
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = 0.99 * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower * 1000
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return (lower + share * (bound - lower)) * 1000
        lower, below = bound, cumulative
    return lower * 1000


def total(text: str, name: str) -> float:
    return sum(samples(text, name).values())


def readyz(port: int) -> tuple[bool | None, int | None]:
    """(ready, requests in flight at the proxy's ASGI door) from /readyz, as a
    readiness probe sees it (2 s); (None, None) when it did not answer in time."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return True, int(json.loads(answer.read())["load"]["in_flight"])
    except urllib.error.HTTPError as refused:
        return False, int(json.loads(refused.read())["load"]["in_flight"])
    except OSError:
        return None, None


def unhealthy_providers(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
        ready = json.loads(answer.read())
    return [
        f"{name}={h['state']}/{h['breaker']}"
        for name, h in ready.get("health", {}).items()
        if (h["state"], h["breaker"]) != ("healthy", "closed")
    ]


# --- one level --------------------------------------------------------------------------------


def warm_up(port: int) -> None:
    generators = Generators(port, WARMUP_USERS, time.time() + 0.2, 0.5, 3.0, (0.0, 0.0))
    generators.wait(timeout=30)


def run_level(
    name: str, level: int, settings: Settings, workdir: Path, upstream: Process, upstream_port: int
) -> LevelResult:
    result = LevelResult(name, level)
    process, port = start_system(name, settings, workdir, upstream_port)
    generators: Generators | None = None
    try:
        warm_up(port)
        time.sleep(1.0)
        result.idle_rss_mb = rss_mb(process.pid)
        is_proxy = name != "aiohttp"
        before = scrape(port) if is_proxy else ""
        t0 = time.time() + 0.5
        start, end = settings.window(level)
        ramp = settings.ramp_for(level)
        generators = Generators(port, level, t0, ramp, settings.hold, (start, end))
        time.sleep(max(0.0, t0 + start - time.time()))
        ours = [upstream.pid, *generators.pids]
        sut_before, load_before = cpu_seconds(process.pid), sum(cpu_seconds(p) for p in ours) + own_cpu()
        busy_before, steal_before = machine_cpu()
        opened = time.perf_counter()
        rss_samples, open_samples, in_flight_samples, readiness = [], [], [], []
        while time.time() < t0 + end:
            time.sleep(0.5)
            rss_samples.append(rss_mb(process.pid))
            now_open, now_in_flight = generators.open_now()
            open_samples.append(now_open)
            in_flight_samples.append(now_in_flight)
            if is_proxy:
                readiness.append(readyz(port))
        result.window_s = time.perf_counter() - opened
        result.cpu_s = cpu_seconds(process.pid) - sut_before
        result.load_core_cpu_s = sum(cpu_seconds(p) for p in ours) + own_cpu() - load_before
        busy_after, steal_after = machine_cpu()
        result.foreign_cpu_s = max(0.0, busy_after - busy_before - result.cpu_s - result.load_core_cpu_s)
        result.steal_s = steal_after - steal_before
        result.rss_mb = statistics.median(rss_samples)
        result.open_streams = statistics.median(open_samples)
        result.in_flight = statistics.median(in_flight_samples)
        if readiness:
            answered = [count for _, count in readiness if count is not None]
            result.proxy_in_flight = statistics.median(answered) if answered else None
            result.not_ready_share = sum(1 for ready, _ in readiness if ready is False) / len(readiness)
            result.probe_timeout_share = sum(1 for ready, _ in readiness if ready is None) / len(readiness)
        generators.wait(timeout=ramp + settings.hold + 90)
        if is_proxy:
            after = scrape(port)
            result.loop_lag_p99_ms = lag_p99_ms(before, after)
            result.shed = total(after, "fallback_proxy_shed_total") - total(before, "fallback_proxy_shed_total")
            result.breaker_opened = total(after, "fallback_proxy_breaker_opened_total")
            result.unhealthy = unhealthy_providers(port)
        tally(result, generators)
    except Exception as exc:  # a failed level is a row with its error, not a failed run
        result.failure = f"{type(exc).__name__}: {exc}"
    finally:
        if generators is not None:
            for popen in generators.processes:
                with contextlib.suppress(OSError):
                    popen.kill()
        process.stop()
    return result


def tally(result: LevelResult, generators: Generators) -> None:
    results = generators.results
    result.completed = sum(r["completed"] for r in results)
    result.completed_in_window = sum(r["completed_in_window"] for r in results)
    result.refused = sum(r["refused"] for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    errors.update({problem.strip().splitlines()[-1][:80]: 1 for problem in generators.problems if problem.strip()})
    result.errors = dict(errors)
    result.peak_open = sum(r["peak_open"] for r in results)
    gaps, firsts = merged(results, "gaps"), merged(results, "first_event")
    result.gap_p50_ms, result.gap_p99_ms = percentile_of_bins(gaps, 50), percentile_of_bins(gaps, 99)
    result.first_event_p50_ms = percentile_of_bins(firsts, 50)
    result.first_event_p99_ms = percentile_of_bins(firsts, 99)


# --- the report ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def delay(gap: float | None) -> float | None:
    return None if gap is None else gap - INTERVAL_MS


def report(results: Sequence[LevelResult], settings: Settings, command: str) -> str:
    head = (
        "| level | system | completed (in window) | refused 503 server_overloaded | other errors "
        "| CPU ms/stream | RSS KB/stream (idle MB → MB; in flight, open) | inter-chunk delay p50 / p99 ms "
        "| added p99 ms vs pass-through | first event p50 / p99 ms | loop lag p99 ms | unhealthy providers |"
    )
    rows = [head, "|" + " --- |" * 12]
    by_level: dict[int, dict[str, LevelResult]] = {}
    for r in results:
        by_level.setdefault(r.level, {})[r.system] = r
    for r in results:
        if r.failure:
            rows.append(f"| {r.level:,} | {r.system} | failed: {r.failure[:120]} |" + " |" * 9)
            continue
        floor = by_level[r.level].get("aiohttp")
        added = None
        if floor is not None and floor is not r and r.gap_p99_ms is not None and floor.gap_p99_ms is not None:
            added = r.gap_p99_ms - floor.gap_p99_ms
        others = "; ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        rows.append(
            "| "
            + " | ".join(
                [
                    f"{r.level:,}",
                    r.system,
                    f"{r.completed:,} ({r.completed_in_window:,})",
                    f"{r.refused:,}",
                    others,
                    _f(r.cpu_ms_per_stream, 3),
                    f"{_f(r.rss_kb_per_stream)} ({r.idle_rss_mb:.0f} → {r.rss_mb:.0f}; "
                    f"{r.in_flight:,.0f}, {r.open_streams:,.0f})",
                    f"{_f(delay(r.gap_p50_ms))} / {_f(delay(r.gap_p99_ms))}",
                    _f(added),
                    f"{_f(r.first_event_p50_ms)} / {_f(r.first_event_p99_ms)}",
                    _f(r.loop_lag_p99_ms),
                    "—" if r.system == "aiohttp" else (", ".join(r.unhealthy) or "none"),
                ]
            )
            + " |"
        )
    noise = [
        "| level | system | window s | SUT CPU % | load core CPU % (upstream, generators) | foreign CPU % "
        "| steal % | sheds (proxy metric) | breakers opened | peak open streams | in flight at the proxy "
        "(median) | /readyz probes: 503 / no answer in 2 s |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        if r.failure or not r.window_s:
            continue
        pct = 100 / r.window_s
        noise.append(
            f"| {r.level:,} | {r.system} | {r.window_s:.1f} | {r.cpu_s * pct:.0f} | {r.load_core_cpu_s * pct:.0f} "
            f"| {r.foreign_cpu_s * pct:.0f} | {r.steal_s * pct:.1f} | {_f(r.shed, 0)} | {_f(r.breaker_opened, 0)} "
            f"| {r.peak_open:,} | {_f(r.proxy_in_flight, 0)} "
            f"| {_share(r.not_ready_share)} / {_share(r.probe_timeout_share)} |"
        )
    ramps = ", ".join(f"{settings.ramp_for(level):g} s at {level:,}" for level in settings.levels)
    parts = [
        f"Command: `{command}`",
        f"Machine: {machine()}; RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"Load: streams of {settings.chunks} chunks {INTERVAL_MS:g} ms apart; clients ramp up ({ramps}), hold {settings.hold:g} s "
        f"more; measured from {settings.settle:g} s after the ramp to the end of the hold; system under test on core "
        f"{SUT_CORE}, upstream + generators ({USERS_PER_GENERATOR:,} clients each) on core {LOAD_CORE}; "
        f"proxy server.max_in_flight: {settings.max_in_flight if settings.max_in_flight is not None else 'default'}.",
        "",
        *rows,
        "",
        "Inter-chunk delay: the gap between two reads that bring events, minus the upstream's 100 ms. "
        "CPU/stream: CPU in the window over the streams completed in it. RSS/stream: median RSS in the window "
        "above the idle (warmed-up) process, over the median requests in flight (sent, not ended).",
        "",
        *noise,
        "",
        *targets(by_level),
    ]
    return "\n".join(parts) + "\n"


def targets(by_level: dict[int, dict[str, LevelResult]]) -> list[str]:
    lines = ["Targets (issue 13):", ""]

    def verdict(ok: bool | None) -> str:
        return "N/A" if ok is None else ("PASS" if ok else "FAIL")

    for level, systems in sorted(by_level.items()):
        proxy, floor = systems.get("fallback-proxy"), systems.get("aiohttp")
        if proxy is None or proxy.failure:
            continue
        clean = proxy.other_errors == 0 and not proxy.unhealthy
        if level <= 3000:
            lines.append(f"- **{verdict(clean and proxy.refused == 0)}** {level:,}: 0 errors, no provider unhealthy")
        else:
            lines.append(
                f"- **{verdict(clean)}** {level:,}: only clean server_overloaded refusals "
                f"({proxy.refused:,}), no other error, no provider unhealthy"
            )
        if floor is not None and not floor.failure:
            cpu = (
                proxy.cpu_ms_per_stream / floor.cpu_ms_per_stream
                if proxy.cpu_ms_per_stream and floor.cpu_ms_per_stream
                else None
            )
            lines.append(
                f"- **{verdict(None if cpu is None else cpu <= 1.2)}** {level:,}: CPU/stream {_f(cpu, 2)}x the pass-through's (≤ 1.2x)"
            )
            if level == 1000 and proxy.gap_p99_ms is not None and floor.gap_p99_ms is not None:
                added = proxy.gap_p99_ms - floor.gap_p99_ms
                lines.append(f"- **{verdict(added <= 5)}** 1,000: added inter-chunk delay p99 {added:.1f} ms (≤ 5 ms)")
        per_stream = proxy.rss_kb_per_stream
        lines.append(
            f"- **{verdict(None if per_stream is None else per_stream <= 30)}** {level:,}: RSS per open stream "
            f"{_f(per_stream)} KB (≤ 30 KB)"
        )
    return lines


# --- main ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("slow streams (--slow-streams)")
    group.add_argument("--slow-streams", action="store_true", help="run the concurrent slow streams scenario instead")
    group.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent streams per level")
    group.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="seconds over which the clients start (default: 1 per 1,000, at least 3)",
    )
    group.add_argument("--hold", type=float, default=15.0, help="seconds the level is held after the ramp (default 15)")
    group.add_argument(
        "--max-in-flight", type=int, default=None, help="the proxy's server.max_in_flight (default: its own)"
    )
    group.add_argument("--systems", default="aiohttp,fallback-proxy", help="which systems, in this order")
    group.add_argument(
        "--chunks",
        type=int,
        default=CHUNKS,
        help=f"chunks per stream (default {CHUNKS}); two runs with different counts give the cost per chunk",
    )


def main(args: argparse.Namespace, command: str) -> int:
    settings = Settings(
        levels=tuple(int(x) for x in args.levels.split(",")),
        ramp=args.ramp,
        hold=args.hold,
        settle=args.chunks * INTERVAL_MS / 1000,
        max_in_flight=args.max_in_flight,
        systems=tuple(args.systems.split(",")),
        chunks=args.chunks,
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every process started here
    os.sched_setaffinity(0, {LOAD_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="fp-slow-"))
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    upstream_port = free_port()
    upstream = Process(
        [
            sys.executable,
            "-m",
            "tests.benchmarks.upstream",
            "--port",
            str(upstream_port),
            "--stream-chunks",
            str(settings.chunks),
            "--chunk-interval-ms",
            str(INTERVAL_MS),
        ],
        LOAD_CORE,
        workdir / "upstream.log",
    )
    results: list[LevelResult] = []
    try:
        wait_ready(upstream, upstream_port, timeout=30)
        for level in settings.levels:
            for name in settings.systems:
                say(f"{name}: {level:,} concurrent streams")
                result = run_level(name, level, settings, workdir, upstream, upstream_port)
                results.append(result)
                say(
                    f"  completed {result.completed:,} ({result.completed_in_window:,} in window), refused "
                    f"{result.refused:,}, errors {result.errors or 0}, CPU/stream {_f(result.cpu_ms_per_stream, 3)} ms, "
                    f"RSS/stream {_f(result.rss_kb_per_stream)} KB, gap p99 {_f(result.gap_p99_ms)} ms, "
                    f"lag p99 {_f(result.loop_lag_p99_ms)} ms{' FAILED: ' + result.failure if result.failure else ''}"
                )
    finally:
        upstream.stop()
    text = report(results, settings, command)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        raw = [
            {**r.__dict__, "cpu_ms_per_stream": r.cpu_ms_per_stream, "rss_kb_per_stream": r.rss_kb_per_stream}
            for r in results
        ]
        Path(args.json).write_text(json.dumps(raw, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"work directory kept: {workdir}")
    return 0
