"""What one request costs Redis: commands, round trips, bytes and Redis CPU, with
and without provider quotas and per-client limits, at the rate one proxy worker
serves (for docs/scaling.md).

    python -m tests.benchmarks.redis_cost                 # 5 s of wrk -c32 streams per variant
    python -m tests.benchmarks.redis_cost --seconds 10 --plain

A Redis of its own (`redis-server` on a free port), the fast fake upstream and
`fallback-proxy serve` with `redis.url` set, pinned as in `run.py` (the proxy on
core 0, the rest on core 1). Per variant: the requests wrk completed, Redis's
`INFO commandstats` (every command, those run inside Lua scripts included),
`total_net_input_bytes`/`total_net_output_bytes` and Redis's own CPU, each per
request; then, in a short run of its own under MONITOR, the commands the proxy
itself sends (without the scripts' own; a MULTI/EXEC transaction is not shown); and how many requests per second one Redis core would carry at that
cost (its CPU only: the network and the proxies are assumed not to be the limit).
"""

from __future__ import annotations

import argparse
import collections
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmarks.run import SUT_CORE, Process, System, free_port, start_upstream, wait_ready, wrk
from tests.redis_server import RedisServer

VARIANTS = ("no quota, no client limits", "provider quota", "client limits", "quota + client limits")
# Limits far above the load: every request is counted, none refused.
LIMITS = "limits: {requests_per_minute: 1000000000, concurrent_streams: 1000000}\n"
QUOTA = "    quota: {requests_per_day: 1000000000, tokens_per_day: 1000000000000}\n"


def config(port: int, upstream: int, redis: str, variant: str) -> str:
    quota = QUOTA if variant in ("provider quota", "quota + client limits") else ""
    limits = LIMITS if variant in ("client limits", "quota + client limits") else ""
    return (
        f"server: {{host: 127.0.0.1, port: {port}}}\nredis: {{url: '{redis}'}}\n{limits}"
        "providers:\n  bench:\n    model: openai/gpt-4o-mini\n    api_key: sk-bench\n"
        f"    api_base: http://127.0.0.1:{upstream}/v1\n{quota}"
        "routes:\n  default: [bench]\n"
    )


def info(port: int, section: str) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"INFO {section}\r\n".encode())
        data = b""
        while True:
            data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    found = {}
    for line in rest.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            found[key] = value
    return found


def snapshot(port: int) -> tuple[collections.Counter[str], dict[str, str], dict[str, str]]:
    return command_calls(port), info(port, "stats"), info(port, "cpu")


def command_calls(port: int) -> collections.Counter[str]:
    calls: collections.Counter[str] = collections.Counter()
    for key, value in info(port, "commandstats").items():
        match = re.search(r"calls=(\d+)", value)
        if key.startswith("cmdstat_") and match:
            calls[key.removeprefix("cmdstat_")] = int(match[1])
    return calls


class Monitor:
    """The commands clients send (MONITOR), without those Lua scripts run: the round trips."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.sent: collections.Counter[str] = collections.Counter()
        self.counting = False
        self._buffer = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            *lines, self._buffer = (self._buffer + chunk).split(b"\r\n")
            if not self.counting:
                continue
            for line in lines:
                if b"lua]" in line or not line.startswith(b"+"):
                    continue
                parts = line.split(b'"')
                if len(parts) > 1:
                    self.sent[parts[1].decode().lower()] += 1

    def close(self) -> None:
        self.sock.close()


@dataclass
class Cost:
    variant: str
    requests: int = 0
    seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    round_trips: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    redis_cpu: float = 0.0

    def per(self, value: float) -> float:
        return value / self.requests if self.requests else 0.0


def measure(variant: str, seconds: float, stream: bool, workdir: Path, upstream: int, redis: RedisServer) -> Cost:
    port = free_port()
    path = workdir / "proxy.yaml"
    path.write_text(config(port, upstream, redis.url, variant))
    proxy = Process(
        [str(Path(sys.executable).parent / "fallback-proxy"), "serve", "--config", str(path), "--log-level", "warning"],
        SUT_CORE,
        workdir / "proxy.log",
    )
    system = System("fp", "fallback-proxy", "openai", "default")
    cost = Cost(variant)
    monitor: Monitor | None = None
    try:
        wait_ready(proxy, port, timeout=60)
        wrk(system, port, stream, 1.0, workdir)  # warm up (pools, scripts loaded)
        time.sleep(0.5)
        # Counts, bytes and Redis CPU without MONITOR (it would add its own output and CPU)...
        calls_before, stats_before, cpu_before = snapshot(redis.port)
        result = wrk(system, port, stream, seconds, workdir)
        time.sleep(0.5)  # settlements after the last answers
        calls_after, stats_after, cpu_after = snapshot(redis.port)
        cost.requests = int(result["requests"]) - int(result["status_errors"])
        cost.seconds = result["duration_us"] / 1e6
        cost.calls = {k: v - calls_before.get(k, 0) for k, v in calls_after.items() if v > calls_before.get(k, 0)}
        cost.calls.pop("info", None)
        for key, attr in (("total_net_input_bytes", "bytes_in"), ("total_net_output_bytes", "bytes_out")):
            setattr(cost, attr, int(stats_after[key]) - int(stats_before[key]))
        cost.redis_cpu = sum(float(cpu_after[k]) - float(cpu_before[k]) for k in ("used_cpu_sys", "used_cpu_user"))
        # ...then, in a run of its own, what the proxy itself sends (per request of that run).
        monitor = Monitor(redis.port)
        time.sleep(0.2)
        monitor.counting = True
        sample = wrk(system, port, stream, 1.0, workdir)
        time.sleep(0.5)
        monitor.counting = False
        sampled = int(sample["requests"]) - int(sample["status_errors"])
        cost.round_trips = {
            k: round(v * cost.requests / sampled) for k, v in monitor.sent.items() if k not in ("info", "monitor")
        }
    finally:
        if monitor is not None:
            monitor.close()
        proxy.stop()
    return cost


def report(costs: list[Cost], stream: bool, command: str) -> str:
    rows = [
        f"Command: `{command}` ({'streams' if stream else 'non-stream requests'}, wrk -c32, one proxy worker)",
        "",
        "| variant | req/s | Redis commands / request, Lua's included (by command) | sent by the proxy / request "
        "| bytes in + out / request | Redis CPU µs / request | Redis commands/s at this rate "
        "| req/s one Redis core carries |",
        "|" + " --- |" * 8,
    ]
    for c in costs:
        rate = c.requests / c.seconds if c.seconds else 0.0
        commands = ", ".join(f"{k} {c.per(v):.2f}" for k, v in sorted(c.calls.items())) or "0"
        sent = ", ".join(f"{k} {c.per(v):.2f}" for k, v in sorted(c.round_trips.items())) or "0"
        cpu_us = c.per(c.redis_cpu) * 1e6
        ops = sum(c.calls.values()) / c.seconds if c.seconds else 0.0
        capacity = f"{1e6 / cpu_us:,.0f}" if cpu_us > 0.5 else "—"
        rows.append(
            f"| {c.variant} | {rate:,.0f} | {commands} | {sent} | {c.per(c.bytes_in):.0f} + "
            f"{c.per(c.bytes_out):.0f} | {cpu_us:.1f} | {ops:,.0f} | {capacity} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.redis_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--plain", action="store_true", help="non-stream requests instead of streams")
    args = parser.parse_args(argv)
    command = "python -m tests.benchmarks.redis_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="fp-redis-cost-"))
    upstream = start_upstream(workdir)
    redis = RedisServer().start()
    costs = []
    try:
        for variant in VARIANTS:
            print(f"measuring: {variant}", file=sys.stderr, flush=True)
            costs.append(measure(variant, args.seconds, not args.plain, workdir, upstream.port, redis))
    finally:
        redis.stop()
        upstream.process.stop()
    print(report(costs, not args.plain, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
