"""Profile fallback-proxy's hot path under load with py-spy (sampling; the proxy runs unmodified).

    python -m tests.benchmarks.profile_proxy                 # OpenAI path, non-stream then stream
    python -m tests.benchmarks.profile_proxy --kind anthropic --seconds 10 --out /tmp/prof

Starts the fast fake upstream (core 1) and `fallback-proxy serve` (core 0), loads it
with wrk at 32 connections and records it with `py-spy record --function -f raw`.
Prints the top functions by own time and by inclusive time; the raw collapsed stacks
(for flamegraph.pl or speedscope) stay in --out. Needs py-spy: `pip install py-spy`
(any venv; pass --py-spy PATH), and ptrace rights over the proxy (root, or
kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.benchmarks.run import (
    LOAD_CORE,
    System,
    check_answers,
    cpu_seconds,
    start,
    start_upstream,
    wrk,
)

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{match['func']}"


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.profile_proxy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kind", choices=["openai", "openai-plain", "anthropic"], default="openai")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy-venv/bin/py-spy")
    parser.add_argument("--out", default=None, help="directory for the raw stacks (default: a temp dir)")
    parser.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native)")
    args = parser.parse_args()
    if not Path(args.py_spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy, then pass --py-spy PATH")
    os.sched_setaffinity(0, {LOAD_CORE})
    out = Path(args.out or tempfile.mkdtemp(prefix="fp-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    upstream = start_upstream(out)
    proxy = str(Path(sys.executable).parent / "fallback-proxy")
    system = System(
        f"fp-{args.kind}",
        f"fallback-proxy ({args.kind})",
        args.kind,
        "default",
        command=[proxy, "serve", "--config", str(out / f"fallback-proxy-{args.kind}.yaml"), "--port", "{port}"],
    )
    try:
        process, port, _ = start(system, out, upstream.port)
        try:
            check_answers(system, port)
            for stream in (False, True):
                wrk(system, port, stream, 2, out)
            for stream in (False, True):
                name = f"{args.kind}-{'stream' if stream else 'plain'}"
                raw = out / f"{name}.txt"
                load = threading.Thread(target=wrk, args=(system, port, stream, args.seconds + 2, out))
                before = cpu_seconds(process.pid)
                load.start()
                command = [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(process.pid),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.seconds),
                    "--function",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ]
                if args.native:
                    command.append("--native")
                subprocess.run(command, check=True, capture_output=True)
                load.join()
                used = cpu_seconds(process.pid) - before
                print(f"== {name}: proxy CPU {used:.2f}s over the load; stacks in {raw}\n")
                print(summarize(raw, args.top), "\n")
        finally:
            process.stop()
    finally:
        upstream.process.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
