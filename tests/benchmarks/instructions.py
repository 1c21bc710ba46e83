"""Instructions per request of `fallback-proxy serve`, counted by valgrind (callgrind).

    python -m tests.benchmarks.instructions                   # non-stream, OpenAI path
    python -m tests.benchmarks.instructions --stream
    python -m tests.benchmarks.instructions --plain-upstream  # the provider with `stream_upstream: false`
    python -m tests.benchmarks.instructions --anthropic       # the translated path
    python -m tests.benchmarks.instructions --system passthrough [--assemble]  # the floors
    python -m tests.benchmarks.instructions --chunk-interval-ms 10 --requests 10,40  # a paced upstream

Requests per second move with whatever else the machine is doing; instructions do
not: the same code, inputs and build count the same on a loaded box (within ~0.1%).
So this is the number to compare before and after a change to the hot path when the
machine is shared. The proxy runs under `valgrind --tool=callgrind` twice, answering
N1 then N2 sequential requests (one keep-alive connection) from the fast fake
upstream (`tests.benchmarks.upstream`); the difference over N2 - N1 is the cost of
one request, without start-up. `--system passthrough` counts the aiohttp
pass-through instead (`tests.benchmarks.passthrough`; `--assemble`: non-stream
requests streamed upstream and assembled, the floor of the default design), so a
ratio to the floor can be had on a shared machine too. Needs valgrind (`apt-get install -y valgrind`); takes
a few minutes (Python runs ~50x slower under valgrind).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.run import free_port


def _ready(port: int, timeout: float, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", path)
            answer = connection.getresponse()
            answer.read()
            if answer.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the proxy did not become ready in {timeout:g}s")


def _config(path: Path, port: int, upstream: int, args: argparse.Namespace) -> None:
    model, base = (
        ("anthropic/bench", f"http://127.0.0.1:{upstream}")
        if args.anthropic
        else ("openai/bench", f"http://127.0.0.1:{upstream}/v1")
    )
    streamed = "false" if args.plain_upstream else "true"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"providers:\n  bench: {{model: {model}, api_base: '{base}', api_key: sk-bench, stream_upstream: {streamed}}}\n"
        "routes:\n  default: [bench]\n"
    )


def count(requests: int, upstream: int, args: argparse.Namespace, workdir: Path) -> int:
    """Instructions of one `serve` run (start-up, `requests` requests, shutdown)."""
    port = free_port()
    out = workdir / f"callgrind-{requests}.out"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if args.system == "passthrough":
        command += [sys.executable, "-m", "tests.benchmarks.passthrough", "--upstream", f"http://127.0.0.1:{upstream}"]
        command += ["--port", str(port), *(["--assemble"] if args.assemble else [])]
        ready_path = "/v1/models"
    else:
        config = workdir / f"proxy-{requests}.yaml"
        _config(config, port, upstream, args)
        proxy = str(Path(sys.executable).parent / "fallback-proxy")
        command += [proxy, "serve", "--config", str(config), "--log-level", "warning"]
        ready_path = "/readyz"
    with open(workdir / f"proxy-{requests}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        _ready(port, timeout=600, path=ready_path)
        model = "default" if args.system == "proxy" else "bench"
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": args.stream})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(requests):
            connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            answer = connection.getresponse()
            data = answer.read()
            if answer.status != 200:
                raise SystemExit(f"the proxy answered {answer.status}: {data[:300]!r}")
        connection.close()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=600)
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit(f"no total in {out}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stream", action="store_true", help="streamed requests (default: non-stream)")
    parser.add_argument("--plain-upstream", action="store_true", help="the provider keeps plain calls")
    parser.add_argument("--anthropic", action="store_true", help="an Anthropic-format provider (translated)")
    parser.add_argument("--system", choices=["proxy", "passthrough"], default="proxy", help="what runs under callgrind")
    parser.add_argument("--assemble", action="store_true", help="passthrough: non-stream requests streamed upstream")
    parser.add_argument(
        "--chunk-interval-ms",
        type=int,
        default=0,
        help="a paced upstream: its streams send one content chunk every M ms (30 chunks; 0: as fast as it can)",
    )
    parser.add_argument("--requests", default="30,130", help="N1,N2: requests in the two runs (default 30,130)")
    args = parser.parse_args()
    first, second = (int(n) for n in args.requests.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="fp-instructions-"))
    pacing = (
        ["--chunk-interval-ms", str(args.chunk_interval_ms), "--stream-chunks", "30"] if args.chunk_interval_ms else []
    )
    upstream_port = free_port()
    with open(workdir / "upstream.log", "w") as log:
        upstream = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.upstream", "--port", str(upstream_port), *pacing],
            stdout=log,
            stderr=log,
            cwd=os.getcwd(),
        )
    try:
        time.sleep(1)
        low, high = count(first, upstream_port, args, workdir), count(second, upstream_port, args, workdir)
    finally:
        upstream.kill()
    kind = ("stream" if args.stream else "non-stream") + (", stream_upstream: false" if args.plain_upstream else "")
    kind += ", Anthropic" if args.anthropic else ", OpenAI"
    if args.chunk_interval_ms:
        kind += f", upstream paced (30 chunks {args.chunk_interval_ms} ms apart)"
    if args.system == "passthrough":
        kind = "aiohttp pass-through" + (", streamed upstream and assembled" if args.assemble else "") + ", " + kind
    print(
        f"{kind}: {(high - low) / (second - first):,.0f} instructions per request ({low:,} at {first}, {high:,} at {second})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
