"""Benchmark fallback-proxy against the upstream itself, a bare aiohttp
pass-through and (when installed) the LiteLLM proxy, side by side, in one run.

    python -m tests.benchmarks.run            # ~5 min
    python -m tests.benchmarks.run --quick    # ~1.5 min, noisier
    tests/benchmarks/setup_litellm_venv.sh    # once, to add the LiteLLM rows

Layout on a 2-core machine: the system under test is pinned to core 0; the fake
upstream, wrk and this script to core 1. The one exception is the 2-worker row
(`serve --workers 2`): the proxy may use both cores, so its second worker shares
core 1 with the upstream and wrk; a scaling ratio 2 workers / 1 worker is printed. Every system is started first (idle
ones wait), then measured in turn, for --rounds rounds, so a burst of noise
from elsewhere on the machine is spread over all of them. Every system gets the
same upstream, the same request bodies and the same measurements:

* throughput: wrk, 32 connections, non-stream and stream (a stream counts once
  it is complete);
* latency at concurrency 1 (one keep-alive connection, a blocking socket
  client): p50/p99 of the whole answer, and for streams the time to the first
  body byte (the first SSE event);
* CPU ms per request and per stream: utime+stime of the system's processes
  (/proc/<pid>/stat) over the wrk run, divided by the requests wrk completed;
* RSS: VmRSS of the system's processes after the run;
* start-to-ready: spawn to the first 200 on GET /v1/models.

The row "tracing on" is the OpenAI path with OpenTelemetry traces exported to
the upstream's OTLP/HTTP sink, every request sampled: its CPU ms per request
against the plain OpenAI row is what traces cost.

Only ratios measured in one run mean anything: the machine is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LUA = HERE / "post.lua"
DEFAULT_LITELLM_VENV = Path("/tmp/litellm-proxy-venv")
SUT_CORE = 0
LOAD_CORE = 1
BOTH_CORES = f"{SUT_CORE},{LOAD_CORE}"
CONNECTIONS = 32
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NPROC = len(os.sched_getaffinity(0))  # read before this process pins itself to the load core
PAGE = "/v1/models"
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
EXPECTED_TEXT = ("word " * 20).strip()
# litellm fetches these from GitHub at start unless told to stay local; offline, it retries for ~8 s.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
}


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int  # the systems are measured in turn, this many times; each figure sums its rounds
    load_seconds: float  # each wrk measurement, per round
    warmup_seconds: float  # wrk warm-up before the measurements of a system
    latency_seconds: float  # each concurrency-1 measurement, per round
    ready_repeats: int  # spawns for start-to-ready (fast-starting systems)
    litellm_venv: Path | None
    fallback_rows: bool  # the 2-provider chain and LiteLLM's fallback list
    workers_row: bool = True  # `serve --workers 2` on both cores

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        venv: Path | None = None if args.no_litellm else Path(args.litellm_venv)
        if venv is not None and not (venv / "bin" / "litellm").exists():
            print(
                f"note: no LiteLLM proxy at {venv}/bin/litellm (tests/benchmarks/setup_litellm_venv.sh); "
                "its rows are skipped",
                file=sys.stderr,
            )
            venv = None
        workers_row = not args.no_workers
        if args.quick:
            return cls(1, 2.0, 0.0, 1.0, 1, venv, fallback_rows=False, workers_row=workers_row)
        return cls(
            args.rounds, args.duration, 1.0, args.latency_duration, 3, venv, fallback_rows=True, workers_row=workers_row
        )


# --- the systems under test ---------------------------------------------------------------


@dataclass
class System:
    key: str
    label: str
    wire: str  # "openai" or "anthropic": the client-side body, and which direct row is the baseline
    model: str  # the request's `model`
    path: str = "/v1/chat/completions"
    command: list[str] | None = None  # None: the upstream itself (direct)
    env: dict[str, str] = field(default_factory=dict)
    litellm_inside: bool = False  # the system imports litellm
    ready_repeats: int = 1
    cores: str = str(SUT_CORE)  # taskset's list of the cores the system may run on


def body(system: System, stream: bool) -> bytes:
    if system.path == "/v1/responses":
        return json.dumps(
            {"model": system.model, "input": "Say 'word' twenty times.", "max_output_tokens": 64, "stream": stream}
        ).encode()
    data: dict[str, Any] = {
        "model": system.model,
        "messages": [{"role": "user", "content": "Say 'word' twenty times."}],
        "max_tokens": 64,
    }
    if stream:
        data["stream"] = True
        if system.path != "/v1/messages":
            data["stream_options"] = {"include_usage": True}
    return json.dumps(data).encode()


def fallback_proxy_config(port: int, upstream: int, kind: str) -> str:
    if kind == "anthropic":
        providers = (
            f"  claude:\n    model: anthropic/{ANTHROPIC_MODEL}\n    api_key: sk-ant-bench\n"
            f"    api_base: http://127.0.0.1:{upstream}\n"
        )
        route = "[claude]"
    else:
        # "openai-plain": non-stream requests sent upstream as they came (no first-token or
        # idle deadline for them), the way every version before the stream rewrite sent them.
        plain = "    stream_upstream: false\n" if kind == "openai-plain" else ""
        providers = "".join(
            f"  {name}:\n    model: openai/{OPENAI_MODEL}\n    api_key: sk-bench\n"
            f"    api_base: http://127.0.0.1:{upstream}/v1\n{plain}"
            for name in ("bench", "bench-b")
        )
        route = "[bench, bench-b]" if kind == "chain" else "[bench]"
    # Traces on: every request sampled (the default sampler), exported to the upstream's OTLP sink.
    telemetry = f"telemetry:\n  endpoint: http://127.0.0.1:{upstream}\n" if kind == "openai-otel" else ""
    return (
        f"server:\n  host: 127.0.0.1\n  port: {port}\nproviders:\n{providers}routes:\n  default: {route}\n" + telemetry
    )


def litellm_config(upstream: int, kind: str) -> str:
    if kind == "anthropic":
        return (
            "model_list:\n  - model_name: claude\n    litellm_params:\n"
            f"      model: anthropic/{ANTHROPIC_MODEL}\n      api_key: sk-ant-bench\n"
            f"      api_base: http://127.0.0.1:{upstream}\n"
        )
    models = "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: openai/{OPENAI_MODEL}\n"
        f"      api_key: sk-bench\n      api_base: http://127.0.0.1:{upstream}/v1\n"
        for name in ("bench", "bench-b")
    )
    fallbacks = 'router_settings:\n  fallbacks: [{"bench": ["bench-b"]}]\n' if kind == "fallback" else ""
    return "model_list:\n" + models + fallbacks


def build_systems(settings: Settings, workdir: Path, upstream: int) -> list[System]:
    python = sys.executable
    proxy = str(Path(python).parent / "fallback-proxy")
    passthrough = [python, "-m", "tests.benchmarks.passthrough", "--upstream", f"http://127.0.0.1:{upstream}"]
    passthrough += ["--port", "{port}"]
    systems = [
        System("direct", "direct to upstream (OpenAI)", "openai", OPENAI_MODEL),
        System("direct-anthropic", "direct to upstream (Anthropic)", "anthropic", ANTHROPIC_MODEL, path="/v1/messages"),
        System(
            "aiohttp",
            "aiohttp pass-through (floor)",
            "openai",
            OPENAI_MODEL,
            command=passthrough,
            ready_repeats=settings.ready_repeats,
        ),
        System(
            "aiohttp-assemble",
            "aiohttp pass-through, non-stream streamed upstream and assembled (floor of the default design)",
            "openai",
            OPENAI_MODEL,
            command=[*passthrough, "--assemble"],
        ),
    ]
    kinds = [
        ("openai", "fallback-proxy (OpenAI path)"),
        ("openai-plain", "fallback-proxy (OpenAI path, stream_upstream: false)"),
        ("openai-otel", "fallback-proxy (OpenAI path, tracing on)"),
    ]
    if settings.fallback_rows:
        kinds.append(("chain", "fallback-proxy (OpenAI, 2-provider chain)"))
    kinds.append(("anthropic", "fallback-proxy (Anthropic, translated)"))
    kinds.append(("responses", "fallback-proxy (Responses API over the OpenAI path)"))
    for kind, label in kinds:
        config = workdir / f"fallback-proxy-{kind}.yaml"
        systems.append(
            System(
                f"fp-{kind}",
                label,
                "anthropic" if kind == "anthropic" else "openai",
                "default",
                path="/v1/responses" if kind == "responses" else "/v1/chat/completions",
                command=[proxy, "serve", "--config", str(config), "--port", "{port}"],
                litellm_inside=kind == "anthropic",
                # the start-to-ready target is for configs without litellm providers; one spawn is enough here
                ready_repeats=1 if kind in ("anthropic", "openai-otel", "openai-plain") else settings.ready_repeats,
            )
        )
    if settings.workers_row:
        config = workdir / "fallback-proxy-openai-2w.yaml"
        systems.append(
            System(
                "fp-openai-2w",
                f"fallback-proxy (OpenAI path, 2 workers, cores {BOTH_CORES})",
                "openai",
                "default",
                command=[proxy, "serve", "--config", str(config), "--port", "{port}", "--workers", "2"],
                cores=BOTH_CORES,
            )
        )
    if settings.litellm_venv is not None:
        rows = [("openai", "LiteLLM proxy (OpenAI)", "bench")]
        if settings.fallback_rows:
            rows.append(("fallback", "LiteLLM proxy (OpenAI, fallback list)", "bench"))
        rows.append(("anthropic", "LiteLLM proxy (Anthropic)", "claude"))
        for kind, label, model in rows:
            config = workdir / f"litellm-{kind}.yaml"
            config.write_text(litellm_config(upstream, kind))
            systems.append(
                System(
                    f"litellm-{kind}",
                    label,
                    "anthropic" if kind == "anthropic" else "openai",
                    model,
                    command=[
                        str(settings.litellm_venv / "bin" / "litellm"),
                        "--config",
                        str(config),
                        "--port",
                        "{port}",
                    ],
                    env=LITELLM_ENV,
                    litellm_inside=True,
                )
            )
    return systems


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """A child pinned to one core, in its own process group, logging to a file."""

    def __init__(self, command: Sequence[str], core: int | str, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.started = time.perf_counter()
        self.popen = subprocess.Popen(
            ["taskset", "-c", str(core), *command],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def process_tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                queue.extend(int(child) for child in (task / "children").read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants."""
    total = 0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    total_kb = 0
    for each in process_tree(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def wait_ready(process: Process, port: int, timeout: float) -> float:
    """Seconds from spawn to the first 200 on GET /v1/models."""
    request = f"GET {PAGE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    deadline = process.started + timeout
    while time.perf_counter() < deadline:
        if not process.alive():
            raise RuntimeError(f"exited with {process.popen.returncode}:\n{process.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(request)
                head = sock.recv(64)
            if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"):
                return time.perf_counter() - process.started
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"not ready within {timeout:g}s:\n{process.tail()}")


# --- the concurrency-1 client -------------------------------------------------------------


class Exchange:
    """One HTTP/1.1 response read with httptools, with timings."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.first_body_ns = 0
        self.now_ns = 0
        self.complete = False

    def on_body(self, data: bytes) -> None:
        if not self.first_body_ns:
            self.first_body_ns = self.now_ns
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    """A keep-alive connection with a blocking socket: the least client overhead."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def request(self, raw: bytes) -> tuple[int, int, int, bytes]:
        """(status, ns to the first body byte, ns to the end, body)."""
        exchange = Exchange()
        started = time.perf_counter_ns()
        self.sock.sendall(raw)
        while not exchange.complete:
            data = self.sock.recv(262144)
            exchange.now_ns = time.perf_counter_ns()
            if not data:
                raise ConnectionError("the server closed the connection")
            exchange.parser.feed_data(data)
        ended = time.perf_counter_ns()
        return (
            exchange.parser.get_status_code(),
            exchange.first_body_ns - started,
            ended - started,
            b"".join(exchange.body),
        )


def raw_request(system: System, port: int, payload: bytes) -> bytes:
    return (
        f"POST {system.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def answer_text(system: System, payload: bytes, stream: bool) -> str:
    """The answer's text, from whatever wire format the system speaks."""
    if system.path == "/v1/responses":
        return responses_text(payload, stream)
    if not stream:
        data = json.loads(payload)
        if system.path == "/v1/messages":
            return "".join(part.get("text", "") for part in data["content"])
        return str(data["choices"][0]["message"]["content"])
    text = []
    for line in payload.decode().splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        if system.path == "/v1/messages":
            text.append(event.get("delta", {}).get("text", "") if event.get("type") == "content_block_delta" else "")
        else:
            for choice in event.get("choices") or []:
                text.append(choice.get("delta", {}).get("content") or "")
    if system.path != "/v1/messages" and "data: [DONE]" not in payload.decode():
        raise AssertionError("the stream did not end with [DONE]")
    return "".join(text)


def responses_text(payload: bytes, stream: bool) -> str:
    """The text of a `Response`, or of a Responses event stream (which must end with response.completed)."""
    if not stream:
        data = json.loads(payload)
        return "".join(part["text"] for item in data["output"] for part in item.get("content", ()))
    events = [json.loads(line[5:]) for line in payload.decode().splitlines() if line.startswith("data:")]
    if not events or events[-1]["type"] != "response.completed":
        raise AssertionError("the Responses stream did not end with response.completed")
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def check_answers(system: System, port: int) -> None:
    """One request of each kind must answer 200 with the upstream's text."""
    conn = Connection(port)
    try:
        for stream in (False, True):
            status, _, _, payload = conn.request(raw_request(system, port, body(system, stream)))
            if status != 200:
                raise AssertionError(f"{'stream' if stream else 'request'}: HTTP {status}: {payload[:300]!r}")
            text = answer_text(system, payload, stream).strip()
            if text != EXPECTED_TEXT:
                raise AssertionError(f"unexpected answer {text[:80]!r} in {payload[:300]!r}")
    finally:
        conn.close()


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    first_byte_p50_ms: float
    first_byte_p99_ms: float
    samples: int


@dataclass
class LatencySamples:
    totals: list[float] = field(default_factory=list)  # ms to the end of the answer
    firsts: list[float] = field(default_factory=list)  # ms to the first body byte

    def summary(self) -> Latency | None:
        if not self.totals:
            return None
        return Latency(
            percentile(self.totals, 50),
            percentile(self.totals, 99),
            percentile(self.firsts, 50),
            percentile(self.firsts, 99),
            len(self.totals),
        )


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure_latency(system: System, port: int, stream: bool, seconds: float, into: LatencySamples) -> None:
    raw = raw_request(system, port, body(system, stream))
    conn = Connection(port)
    try:
        for _ in range(20):  # warm the connection and the server's caches
            conn.request(raw)
        gc.collect()
        gc.disable()
        end = time.perf_counter() + seconds
        taken = 0
        while time.perf_counter() < end and taken < 50_000:
            status, first_ns, total_ns, payload = conn.request(raw)
            if status != 200:
                raise AssertionError(f"HTTP {status}: {payload[:200]!r}")
            into.totals.append(total_ns / 1e6)
            into.firsts.append(first_ns / 1e6)
            taken += 1
    finally:
        gc.enable()
        conn.close()


# --- throughput with wrk ------------------------------------------------------------------


def wrk(system: System, port: int, stream: bool, seconds: float, workdir: Path) -> dict[str, Any]:
    body_file = workdir / f"body-{system.key}-{'stream' if stream else 'plain'}.json"
    body_file.write_bytes(body(system, stream))
    command = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        "-H",
        "anthropic-version: 2023-06-01",
        f"http://127.0.0.1:{port}{system.path}",
    ]
    done = subprocess.run(
        command,
        env={**os.environ, "WRK_BODY_FILE": str(body_file)},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            return result
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores. Busy is process time
    (user, nice, system): interrupt time, loopback networking included, is nobody's."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system) / CLOCK_TICKS, steal / CLOCK_TICKS


def own_cpu() -> float:
    """CPU seconds of this script and its reaped children (wrk)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Load:
    """wrk runs of one kind against one system, summed over the rounds."""

    requests: int = 0  # completed responses
    good: int = 0  # of which 2xx
    errors: int = 0
    seconds: float = 0.0  # wrk's measured duration
    wall: float = 0.0
    sut_cpu: float | None = None
    upstream_cpu: float = 0.0
    foreign_cpu: float = 0.0  # busy CPU on the machine that is none of ours (other processes, idle systems)
    steal: float = 0.0
    rounds_rps: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.good / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float | None:
        return None if self.sut_cpu is None or self.good <= 0 else 1000 * self.sut_cpu / self.good

    def pct(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.wall else 100 * cpu / self.wall


def measure_load(
    system: System,
    port: int,
    stream: bool,
    seconds: float,
    workdir: Path,
    sut: Process | None,
    upstream: Process,
    into: Load,
) -> None:
    sut_before = cpu_seconds(sut.pid) if sut else 0.0
    upstream_before = cpu_seconds(upstream.pid)
    busy_before, steal_before = machine_cpu()
    own_before = own_cpu()
    started = time.perf_counter()
    result = wrk(system, port, stream, seconds, workdir)
    wall = time.perf_counter() - started
    sut_cpu = cpu_seconds(sut.pid) - sut_before if sut else None
    upstream_cpu = cpu_seconds(upstream.pid) - upstream_before
    busy_after, steal_after = machine_cpu()
    ours = (sut_cpu or 0.0) + upstream_cpu + own_cpu() - own_before
    requests = int(result["requests"])
    good = requests - int(result["status_errors"])
    duration = result["duration_us"] / 1e6
    into.requests += requests
    into.good += good
    into.errors += sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeout_errors")
    )
    into.seconds += duration
    into.wall += wall
    if sut_cpu is not None:
        into.sut_cpu = (into.sut_cpu or 0.0) + sut_cpu
    into.upstream_cpu += upstream_cpu
    into.foreign_cpu += max(0.0, busy_after - busy_before - ours)
    into.steal += steal_after - steal_before
    into.rounds_rps.append(good / duration if duration else 0.0)


# --- the systems, started and measured in rounds ---------------------------------------------


@dataclass
class Result:
    key: str
    label: str
    wire: str
    litellm_inside: bool
    plain: Load = field(default_factory=Load)
    streams: Load = field(default_factory=Load)
    latency_samples: LatencySamples = field(default_factory=LatencySamples, repr=False)
    stream_samples: LatencySamples = field(default_factory=LatencySamples, repr=False)
    latency: Latency | None = None
    stream_latency: Latency | None = None
    rss_mb: float | None = None
    ready_s: float | None = None
    ready_all_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Running:
    system: System
    result: Result
    process: Process | None  # None: the upstream itself
    port: int


def start(system: System, workdir: Path, upstream_port: int) -> tuple[Process, int, float]:
    assert system.command is not None
    port = free_port()
    if system.key.startswith("fp-"):
        kind = system.key.removeprefix("fp-")
        config_kind = kind.removesuffix("-2w")
        (workdir / f"fallback-proxy-{kind}.yaml").write_text(fallback_proxy_config(port, upstream_port, config_kind))
    command = [part.replace("{port}", str(port)) for part in system.command]
    log = workdir / f"{system.key}.log"
    process = Process(command, system.cores, log, system.env)
    try:
        ready = wait_ready(process, port, timeout=120)
    except BaseException:
        process.stop()
        raise
    return process, port, ready


def launch(
    system: System, settings: Settings, workdir: Path, upstream_port: int, say: Callable[[str], None]
) -> Running:
    """Start a system (after the extra start-to-ready spawns), check its answers, warm it up."""
    result = Result(system.key, system.label, system.wire, system.litellm_inside)
    running = Running(system, result, None, upstream_port)
    try:
        if system.command is not None:
            for _ in range(system.ready_repeats - 1):
                process, _, ready = start(system, workdir, upstream_port)
                process.stop()
                result.ready_all_s.append(ready)
            running.process, running.port, ready = start(system, workdir, upstream_port)
            result.ready_all_s.append(ready)
            result.ready_s = statistics.median(result.ready_all_s)
            say(f"  ready in {', '.join(f'{s:.2f}' for s in result.ready_all_s)} s")
        check_answers(system, running.port)
        if settings.warmup_seconds:  # lazy imports, caches, pools (--quick: the latency warm-up only)
            for stream in (False, True):
                wrk(system, running.port, stream, settings.warmup_seconds, workdir)
    except Exception as exc:  # a broken system is a row with its error, not a broken run
        fail(running, exc, say)
    return running


def fail(running: Running, exc: Exception, say: Callable[[str], None]) -> None:
    running.result.error = f"{type(exc).__name__}: {exc}"
    say(f"  FAILED: {running.result.error}")
    if running.process is not None:
        running.process.stop()


def measure_round(
    running: Sequence[Running], settings: Settings, workdir: Path, upstream: Process, say: Callable[[str], None]
) -> None:
    """One round, in phases: every system's concurrency-1 latency, then every system's
    non-stream load, then every system's stream load. A ratio compares measurements
    taken seconds apart, not a whole round apart: this kind of shared VM drifts by
    ±20 % over tens of seconds (the pass-through alone: 3,300-5,000 req/s in 1 s
    slices over 40 s), which a round-apart ratio takes in whole."""

    def each(measure: Callable[[Running], None]) -> None:
        for one in running:
            if one.result.error is None:
                try:
                    measure(one)
                except Exception as exc:
                    fail(one, exc, say)

    def latency(one: Running) -> None:
        measure_latency(one.system, one.port, False, settings.latency_seconds, one.result.latency_samples)
        measure_latency(one.system, one.port, True, settings.latency_seconds, one.result.stream_samples)

    def load(stream: bool) -> Callable[[Running], None]:
        def measure(one: Running) -> None:
            into = one.result.streams if stream else one.result.plain
            measure_load(one.system, one.port, stream, settings.load_seconds, workdir, one.process, upstream, into)

        return measure

    each(latency)
    each(load(False))
    each(load(True))
    for one in running:
        result = one.result
        if result.error is None:
            say(
                f"  {one.system.label}: {result.plain.rounds_rps[-1]:,.0f} req/s, "
                f"{result.streams.rounds_rps[-1]:,.0f} streams/s; c=1 p50 "
                f"{percentile(result.latency_samples.totals, 50):.3f} ms"
            )


def finish(running: Running) -> Result:
    result = running.result
    result.latency = result.latency_samples.summary()
    result.stream_latency = result.stream_samples.summary()
    if running.process is not None and result.error is None:
        result.rss_mb = rss_mb(running.process.pid)
    if running.process is not None:
        running.process.stop()
    return result


# --- the report ---------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def baselines(results: Sequence[Result]) -> dict[str, Result]:
    found = {r.key: r for r in results}
    return {"openai": found.get("direct"), "anthropic": found.get("direct-anthropic")}  # type: ignore[dict-item]


def added(result: Result, base: Result | None, attr: str, pick: str) -> float | None:
    mine, theirs = getattr(result, attr), getattr(base, attr, None) if base else None
    if mine is None or theirs is None or result is base:
        return None
    return float(getattr(mine, pick) - getattr(theirs, pick))


def table(results: Sequence[Result]) -> str:
    base = baselines(results)
    head = (
        "| system | req/s (c=32) | streams/s (c=32) | p50 ms (c=1) | p99 ms (c=1) | added p50 ms | added p99 ms "
        "| stream TTFB p50 ms | stream p50 ms | CPU ms/req | CPU ms/stream | RSS MB | start-to-ready s |"
    )
    rows = [head, "|" + " --- |" * 13]
    for r in results:
        if r.error:
            rows.append(f"| {r.label} | failed: {r.error.splitlines()[0][:100]} |" + " |" * 11)
            continue
        b = base.get(r.wire)
        rows.append(
            "| "
            + " | ".join(
                [
                    r.label,
                    _fmt(r.plain.rps if r.plain.good else None, 0),
                    _fmt(r.streams.rps if r.streams.good else None, 0),
                    _fmt(r.latency.p50_ms if r.latency else None, 3),
                    _fmt(r.latency.p99_ms if r.latency else None, 3),
                    _fmt(added(r, b, "latency", "p50_ms"), 3),
                    _fmt(added(r, b, "latency", "p99_ms"), 3),
                    _fmt(r.stream_latency.first_byte_p50_ms if r.stream_latency else None, 3),
                    _fmt(r.stream_latency.p50_ms if r.stream_latency else None, 3),
                    _fmt(r.plain.cpu_ms_per_request, 3),
                    _fmt(r.streams.cpu_ms_per_request, 3),
                    _fmt(r.rss_mb, 1),
                    _fmt(r.ready_s, 2),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def diagnostics(results: Sequence[Result]) -> str:
    rows = [
        "| system | SUT CPU % (plain / stream) | upstream CPU % | foreign CPU % | steal % "
        "| req/s per round | streams/s per round | wrk errors | c=1 samples | stream TTFB p99 ms "
        "| stream p99 ms | start-to-ready runs s |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        if r.error or r.latency is None or r.stream_latency is None:
            continue
        p, s = r.plain, r.streams
        rows.append(
            "| "
            + " | ".join(
                [
                    r.label,
                    f"{_fmt(p.pct(p.sut_cpu), 0)} / {_fmt(s.pct(s.sut_cpu), 0)}",
                    f"{_fmt(p.pct(p.upstream_cpu), 0)} / {_fmt(s.pct(s.upstream_cpu), 0)}",
                    f"{_fmt(p.pct(p.foreign_cpu), 0)} / {_fmt(s.pct(s.foreign_cpu), 0)}",
                    f"{_fmt(p.pct(p.steal), 1)} / {_fmt(s.pct(s.steal), 1)}",
                    ", ".join(f"{x:,.0f}" for x in p.rounds_rps),
                    ", ".join(f"{x:,.0f}" for x in s.rounds_rps),
                    f"{p.errors} / {s.errors}",
                    f"{r.latency.samples:,} / {r.stream_latency.samples:,}",
                    _fmt(r.stream_latency.first_byte_p99_ms, 3),
                    _fmt(r.stream_latency.p99_ms, 3),
                    ", ".join(f"{x:.2f}" for x in r.ready_all_s) or "—",
                ]
            )
            + " |"
        )
    return "\n".join(rows)


@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    at_least: bool  # True: value >= limit passes
    unit: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "N/A"
        ok = self.value >= self.limit if self.at_least else self.value <= self.limit
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        sign = "≥" if self.at_least else "≤"
        value = "not measured" if self.value is None else f"{self.value:.3g}{self.unit}"
        return f"- **{self.verdict}** {self.name}: {value} (target {sign} {self.limit:g}{self.unit})"


def targets(results: Sequence[Result]) -> list[Target]:
    found = {r.key: r for r in results if r.error is None}

    def ratio(a: str, b: str, kind: str) -> float | None:
        x, y = found.get(a), found.get(b)
        lx = getattr(x, kind, None) if x else None
        ly = getattr(y, kind, None) if y else None
        return lx.rps / ly.rps if lx and ly and ly.rps > 0 else None

    def attr(key: str, path: Callable[[Result], float | None]) -> float | None:
        r = found.get(key)
        try:
            return path(r) if r else None
        except AttributeError:
            return None

    def cpu_ratio(a: str, b: str, kind: str) -> float | None:
        x, y = found.get(a), found.get(b)
        cx = getattr(x, kind).cpu_ms_per_request if x else None
        cy = getattr(y, kind).cpu_ms_per_request if y else None
        return cx / cy if cx is not None and cy else None

    base = baselines(results)

    def added_ms(key: str, pick: str) -> float | None:
        r = found.get(key)
        return added(r, base.get(r.wire), "latency", pick) if r else None

    out = [
        Target(
            "throughput vs LiteLLM proxy, OpenAI path, non-stream",
            ratio("fp-openai", "litellm-openai", "plain"),
            20,
            True,
            "×",
        ),
        Target(
            "throughput vs LiteLLM proxy, OpenAI path, stream",
            ratio("fp-openai", "litellm-openai", "streams"),
            20,
            True,
            "×",
        ),
        Target(
            "throughput vs LiteLLM proxy, with fallbacks (chain vs fallback list), non-stream",
            ratio("fp-chain", "litellm-fallback", "plain"),
            20,
            True,
            "×",
        ),
        Target(
            "throughput vs LiteLLM proxy, with fallbacks (chain vs fallback list), stream",
            ratio("fp-chain", "litellm-fallback", "streams"),
            20,
            True,
            "×",
        ),
        Target(
            "throughput vs LiteLLM proxy, Anthropic path, non-stream",
            ratio("fp-anthropic", "litellm-anthropic", "plain"),
            5,
            True,
            "×",
        ),
        Target(
            "throughput vs LiteLLM proxy, Anthropic path, stream",
            ratio("fp-anthropic", "litellm-anthropic", "streams"),
            5,
            True,
            "×",
        ),
        # issue 5's floor, set when a non-stream request was one plain call upstream: like for like,
        # that is `stream_upstream: false` (the default design against the plain pass-through is in
        # the context lines: its own floor, the assembling pass-through, is far below the plain one)
        Target(
            "throughput vs aiohttp pass-through, non-stream (plain calls)",
            ratio("fp-openai-plain", "aiohttp", "plain"),
            0.5,
            True,
            "×",
        ),
        Target("throughput vs aiohttp pass-through, stream", ratio("fp-openai", "aiohttp", "streams"), 0.6, True, "×"),
        # issue 13's floor: 0.75x the pass-through, like for like (a non-stream request streamed
        # upstream, the default, against the pass-through that does the same exchange)
        Target(
            "throughput vs aiohttp pass-through, non-stream, stream_upstream: false (both plain calls)",
            ratio("fp-openai-plain", "aiohttp", "plain"),
            0.75,
            True,
            "×",
        ),
        Target(
            "throughput vs aiohttp pass-through, non-stream streamed upstream (both: the default design)",
            ratio("fp-openai", "aiohttp-assemble", "plain"),
            0.75,
            True,
            "×",
        ),
        Target(
            "throughput vs aiohttp pass-through, stream (issue 13's floor)",
            ratio("fp-openai", "aiohttp", "streams"),
            0.75,
            True,
            "×",
        ),
        Target(
            "translated (Anthropic) path vs OpenAI path, non-stream",
            ratio("fp-anthropic", "fp-openai", "plain"),
            0.5,
            True,
            "×",
        ),
        Target(
            "translated (Anthropic) path vs OpenAI path, stream",
            ratio("fp-anthropic", "fp-openai", "streams"),
            0.5,
            True,
            "×",
        ),
        Target(
            "CPU per non-stream request (OpenAI path)",
            attr("fp-openai", lambda r: r.plain.cpu_ms_per_request),
            1.0,
            False,
            " ms",
        ),
        Target(
            "CPU per 22-chunk stream (OpenAI path)",
            attr("fp-openai", lambda r: r.streams.cpu_ms_per_request),
            1.5,
            False,
            " ms",
        ),
        Target(
            "added latency over direct at c=1, p50 (OpenAI path)", added_ms("fp-openai", "p50_ms"), 1.0, False, " ms"
        ),
        Target(
            "added latency over direct at c=1, p99 (OpenAI path)", added_ms("fp-openai", "p99_ms"), 3.0, False, " ms"
        ),
        Target(
            "CPU per Responses call / CPU per chat call it wraps (non-stream)",
            cpu_ratio("fp-responses", "fp-openai", "plain"),
            1.5,
            False,
            "×",
        ),
        Target("RSS without litellm providers", attr("fp-openai", lambda r: r.rss_mb), 100, False, " MB"),
        Target("RSS with litellm providers (Anthropic)", attr("fp-anthropic", lambda r: r.rss_mb), 250, False, " MB"),
        Target("start-to-ready without litellm providers", attr("fp-openai", lambda r: r.ready_s), 1.5, False, " s"),
    ]
    return out


def scaling(results: Sequence[Result]) -> tuple[float | None, float | None]:
    """Throughput of `serve --workers 2` (both cores) over one worker (one core): (req/s, streams/s)."""
    found = {r.key: r for r in results if r.error is None}
    one, two = found.get("fp-openai"), found.get("fp-openai-2w")
    if one is None or two is None:
        return None, None
    return (
        two.plain.rps / one.plain.rps if one.plain.rps else None,
        two.streams.rps / one.streams.rps if one.streams.rps else None,
    )


def _cores(load: Load) -> str:
    share = load.pct(load.sut_cpu)
    return "—" if share is None else f"{share / 100:.2f}"


def _per_core(load: Load) -> str:
    share = load.pct(load.sut_cpu)
    return "—" if not share else f"{load.rps / (share / 100):,.0f}"


def info_lines(results: Sequence[Result]) -> list[str]:
    """Figures without a target, for context."""
    found = {r.key: r for r in results if r.error is None}
    lines = []
    plain_x, stream_x = scaling(results)
    if plain_x is not None or stream_x is not None:
        one, two = found["fp-openai"], found["fp-openai-2w"]
        lines.append(
            f"- scaling, 2 workers on cores {BOTH_CORES} / 1 worker on core {SUT_CORE} (OpenAI path): "
            f"{_fmt(plain_x)}× req/s, {_fmt(stream_x)}× streams/s; cores the proxy got (plain / stream): "
            f"1 worker {_cores(one.plain)} / {_cores(one.streams)}, 2 workers {_cores(two.plain)} / "
            f"{_cores(two.streams)}; req/s per core got: 1 worker {_per_core(one.plain)}, 2 workers "
            f"{_per_core(two.plain)} (the second worker shares core {LOAD_CORE} with the upstream and wrk, "
            "and with whatever else runs on the machine: see foreign CPU)"
        )
    floors = found.get("aiohttp"), found.get("aiohttp-assemble")
    default, plain = found.get("fp-openai"), found.get("fp-openai-plain")
    if floors[0] and floors[1] and default:
        lines.append(
            "- the default design (non-stream requests streamed upstream and assembled) against the plain "
            f"pass-through: {_fmt(_ratio(default.plain.rps, floors[0].plain.rps), 3)}× req/s; its own floor, the "
            f"assembling pass-through, makes {_fmt(_ratio(floors[1].plain.rps, floors[0].plain.rps), 3)}× the plain "
            "one's"
        )
    cpu_pairs = (
        ("`stream_upstream: false` / pass-through", plain, floors[0], "plain"),
        ("default / assembling pass-through", default, floors[1], "plain"),
        ("stream / pass-through", default, floors[0], "streams"),
    )
    shown = [
        f"{name} {_fmt(_ratio(getattr(a, kind).cpu_ms_per_request, getattr(b, kind).cpu_ms_per_request), 3)}×"
        for name, a, b, kind in cpu_pairs
        if a and b
    ]
    if shown:
        lines.append(
            "- CPU per request against the floor's (the same run; the floor's own cost moves 2× between "
            f"machines, the ratio much less): {'; '.join(shown)}"
        )
    fp_a = found.get("fp-anthropic")
    if fp_a and fp_a.plain and fp_a.streams:
        lines.append(
            f"- Anthropic path CPU: {_fmt(fp_a.plain.cpu_ms_per_request, 3)} ms/request, "
            f"{_fmt(fp_a.streams.cpu_ms_per_request, 3)} ms/stream; start-to-ready {_fmt(fp_a.ready_s)} s"
        )
    off, on = found.get("fp-openai"), found.get("fp-openai-otel")
    if off and on:
        lines.append(
            f"- tracing on (every request sampled, exported over OTLP/HTTP), CPU per request: "
            f"{_fmt(on.plain.cpu_ms_per_request, 3)} ms vs {_fmt(off.plain.cpu_ms_per_request, 3)} ms off; per "
            f"stream {_fmt(on.streams.cpu_ms_per_request, 3)} ms vs {_fmt(off.streams.cpu_ms_per_request, 3)} ms off"
        )
    base = baselines(results)
    if fp_a:
        lines.append(
            f"- Anthropic path added latency at c=1: p50 {_fmt(added(fp_a, base['anthropic'], 'latency', 'p50_ms'), 3)}"
            f" ms, p99 {_fmt(added(fp_a, base['anthropic'], 'latency', 'p99_ms'), 3)} ms"
        )
    for key in ("fp-openai", "fp-anthropic"):
        r = found.get(key)
        b = base.get(r.wire) if r else None
        if r and b:
            lines.append(
                f"- {r.label}: added stream TTFB p50 "
                f"{_fmt(added(r, b, 'stream_latency', 'first_byte_p50_ms'), 3)} ms, added full-stream p50 "
                f"{_fmt(added(r, b, 'stream_latency', 'p50_ms'), 3)} ms"
            )
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc {NPROC}, {cpu}, Linux {platform.release()}, Python {platform.python_version()}"


def report(results: Sequence[Result], settings: Settings, command: str, litellm_version: str | None) -> str:
    verdicts = targets(results)
    parts = [
        f"Command: `{command}`",
        f"Machine: {machine()}",
        f"Load: wrk -t1 -c{CONNECTIONS}, {settings.rounds} round(s) of {settings.load_seconds:g} s per measurement "
        f"(after {settings.warmup_seconds:g} s warm-up); concurrency-1 latency {settings.rounds} round(s) of "
        f"{settings.latency_seconds:g} s; each round in phases (every system's latency, then every system's non-stream load, then every system's stream load); system under test on core {SUT_CORE} "
        f"(the 2-worker row: cores {BOTH_CORES}, its second worker sharing core {LOAD_CORE} with the load), "
        f"upstream + load generator + this script on core {LOAD_CORE}.",
        f"LiteLLM proxy: {litellm_version or 'not installed (rows skipped)'}",
        "",
        table(results),
        "",
        "Targets (fallback-proxy):",
        "",
        *[t.line() for t in verdicts],
        "",
        "Context:",
        "",
        *info_lines(results),
        "",
        "Diagnostics:",
        "",
        diagnostics(results),
    ]
    return "\n".join(parts) + "\n"


# --- main -----------------------------------------------------------------------------------


def litellm_version(venv: Path | None) -> str | None:
    if venv is None:
        return None
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"litellm[proxy] {done.stdout.strip()} ({venv})" if done.returncode == 0 else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="~1.5 minutes: one short round, no warm-up, no fallback rows"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="measure every system this many times, in phases (see measure_round), and sum (default 4)",
    )
    parser.add_argument(
        "--duration", type=float, default=2.0, help="seconds per wrk measurement per round (whole seconds; default 2)"
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=1.5,
        help="seconds per concurrency-1 measurement per round (default 1.5)",
    )
    parser.add_argument(
        "--litellm-venv",
        default=str(DEFAULT_LITELLM_VENV),
        help=f"venv with the LiteLLM proxy (default {DEFAULT_LITELLM_VENV})",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy rows")
    parser.add_argument(
        "--no-workers", action="store_true", help="skip the `serve --workers 2` row (both cores) and its scaling ratio"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated system keys (direct, direct-anthropic, aiohttp, aiohttp-assemble, fp-openai, fp-openai-plain, fp-openai-otel, "
        "fp-openai-2w, fp-chain, fp-anthropic, fp-responses, litellm-openai, litellm-fallback, litellm-anthropic)",
    )
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    from tests.benchmarks import slow_streams

    slow_streams.add_arguments(parser)
    from tests.benchmarks import pairs

    pairs.add_arguments(parser)
    return parser.parse_args(argv)


def preflight() -> None:
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install -y wrk util-linux)")
    if NPROC < 2:
        raise SystemExit("needs at least 2 cores: the system under test on one, the load on another")


@dataclass
class Upstream:
    process: Process
    port: int


def start_upstream(workdir: Path) -> Upstream:
    port = free_port()
    process = Process(
        [sys.executable, "-m", "tests.benchmarks.upstream", "--port", str(port)], LOAD_CORE, workdir / "upstream.log"
    )
    try:
        wait_ready(process, port, timeout=30)
    except BaseException:
        process.stop()
        raise
    return Upstream(process, port)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.slow_streams:
        from tests.benchmarks import slow_streams

        command = "python -m tests.benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
        return slow_streams.main(args, command)
    if args.pairs:
        from tests.benchmarks import pairs

        preflight()
        command = "python -m tests.benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
        return pairs.main(args, command)
    preflight()
    settings = Settings.from_args(args)
    os.sched_setaffinity(0, {LOAD_CORE})
    command = "python -m tests.benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    workdir = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    upstream = start_upstream(workdir)
    running: list[Running] = []
    try:
        systems = build_systems(settings, workdir, upstream.port)
        if args.only:
            wanted = set(args.only.split(","))
            systems = [s for s in systems if s.key in wanted]
        for system in systems:  # all started first (idle ones wait on core 0), then measured in turn
            say(f"start: {system.label}")
            running.append(launch(system, settings, workdir, upstream.port, say))
        for round_ in range(settings.rounds):
            say(f"round {round_ + 1} of {settings.rounds}")
            measure_round(running, settings, workdir, upstream.process, say)
    finally:
        results = [finish(each) for each in running]
        upstream.process.stop()
    text = report(results, settings, command, litellm_version(settings.litellm_venv))
    say(f"done ({workdir if args.keep else 'work directory removed'})")
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        raw = [{k: v for k, v in dataclasses.asdict(r).items() if not k.endswith("_samples")} for r in results]
        Path(args.json).write_text(json.dumps(raw, indent=2))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
