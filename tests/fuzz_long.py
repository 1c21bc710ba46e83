"""The long fuzz run: at least 10,000 malformed and edge-case requests against a
real proxy process (`fallback-proxy serve`, two fake OpenAI providers behind it).

    python -m tests.fuzz_long                      # 10,500 requests, about 5 minutes (from the repo root)
    python -m tests.fuzz_long --requests 50000     # longer

Phases: schemathesis against the served `/openapi.json` (positive and negative
cases, every operation, keys right, wrong and missing); hypothesis-made chat
bodies sent as raw bytes (invalid UTF-8, NaN, duplicate keys, deep nesting,
huge strings, wrong content types); the hand-written cases of
`tests/test_fuzz.py`. It prints the totals by status, every 5xx by kind, the
tracebacks in the proxy's log, and whether the process stayed up; the exit
status is 0 only when nothing broke the contract. The 500s of known bugs (see
`KNOWN_BUGS` in tests/test_fuzz.py) are counted apart; `--allow-known-bugs`
lets them pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxy.fakes import FakeOpenAI
from tests.test_fuzz import (
    ADMIN_KEY,
    KNOWN_BUGS,
    PROVIDERS,
    ServerLog,
    Target,
    fuzz_config,
    known_bug_in_body,
    known_bug_requests,
    known_exception_line,
    post_chat,
    raw_cases,
    raw_http,
    raw_socket_cases,
    response_problems,
    run_body_fuzz,
    run_schemathesis,
)

DEFAULT_REQUESTS = 10_500
SCHEMATHESIS_SHARE = 0.3  # schemathesis cases cost ~0.2 s to generate for chat; raw bodies ~10 ms


@dataclass
class Proxy:
    """`fallback-proxy serve` in a child process, its stderr in a file."""

    process: subprocess.Popen[bytes]
    url: str
    stderr: Path

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running_proxy(config: dict[str, Any], workdir: Path) -> Iterator[Proxy]:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    stderr = workdir / "proxy.stderr"
    command = [
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with stderr.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink)
    proxy = Proxy(process, f"http://127.0.0.1:{port}", stderr)
    try:
        wait_until_up(proxy)
        yield proxy
    finally:
        if proxy.alive():
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_up(proxy: Proxy, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proxy.alive():
            raise RuntimeError(f"the proxy exited:\n{proxy.stderr.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(proxy.url + "/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the proxy did not answer /healthz in time")


def hand_written(target: Target) -> int:
    """The hand-written cases of the CI suite, and the known-bug probes."""
    sent = 0
    cases = raw_cases() + [(str(case.id), case.values[0], {}) for case in known_bug_requests()]
    for name, body, headers in cases:
        with httpx.Client(timeout=60) as client:
            try:
                status, answer_headers, content = post_chat(client, target.url, body, headers=headers)
            except httpx.TransportError as exc:
                target.record(0, [f"{name}: no answer ({exc!r})"])
                continue
        sent += 1
        known = known_bug_in_body(body)
        problems = response_problems("POST", "/v1/chat/completions", status, answer_headers, content, known=known)
        target.record(status, [f"{name}: {p}" for p in problems], known)
    client_gone(target.url)
    sent += 1
    for name, request in raw_socket_cases():
        answer = raw_http(target.url, request)
        sent += 1
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        headers = {
            k.strip().decode("latin-1").lower(): v.strip().decode("latin-1")
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        authorized = b"Bearer fuzz-key" in request
        problems = response_problems("POST", "/v1/chat/completions", status, headers, body, authorized=authorized)
        target.record(status, [f"{name}: {p}" for p in problems])
    return sent


def client_gone(url: str) -> None:
    """A client that sends half its body and hangs up (the known bug `client-disconnect`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fuzz-key\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":'
        )
        time.sleep(0.2)


def enable_all(url: str) -> None:
    """Undo what the admin fuzzing switched off, so the next phase reaches providers."""
    for name in PROVIDERS:
        httpx.post(f"{url}/admin/providers/{name}/enable", headers={"authorization": f"Bearer {ADMIN_KEY}"})


def tracebacks(stderr: Path) -> Counter[str]:
    """Tracebacks in the proxy's JSON log, by their exception line (known bugs by name)."""
    found: Counter[str] = Counter()
    for line in stderr.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.startswith("Traceback"):
                found["(unstructured traceback)"] += 1
            continue
        exc = record.get("exc") if isinstance(record, dict) else None
        if not exc:
            continue
        last = exc.strip().splitlines()[-1]
        bug = known_exception_line(last)
        found[f"known bug {bug}" if bug else last[:160]] += 1
    return found


def report(
    target: Target,
    sent: int,
    wanted: int,
    seconds: float,
    proxy: Proxy,
    healthz: int | None,
    logged: Counter[str],
    *,
    allow_known: bool,
) -> bool:
    """Print the totals; True when the run kept the contract."""
    server_errors = {status: n for status, n in target.statuses.items() if status >= 500}
    known_500 = sum(target.known.values())
    unexpected_500 = sum(n for status, n in server_errors.items() if status != 503) - known_500
    unknown_tracebacks = sum(n for text, n in logged.items() if not text.startswith("known bug"))
    print(f"requests sent: {sent:,} in {seconds:.0f} s ({sent / seconds:.0f}/s)")
    print("by status:", ", ".join(f"{status}: {n:,}" for status, n in sorted(target.statuses.items())))
    print(
        f"5xx: {sum(server_errors.values()):,} — documented 503 (all_providers_failed): "
        f"{server_errors.get(503, 0):,}; 500 from known bugs: {known_500:,} {dict(target.known)}; "
        f"other 5xx: {unexpected_500:,}"
    )
    print(
        f"tracebacks in the proxy's log: {sum(logged.values()):,} — "
        + (", ".join(f"{text}: {n}" for text, n in logged.most_common()) or "none")
    )
    print(f"process stayed up: {proxy.alive()}; /healthz after the run: {healthz}")
    print(f"contract violations: {len(target.problems):,}")
    for problem in target.problems[:25]:
        print("  -", problem[:400])
    for bug in target.known:
        print(f"known bug {bug}: {KNOWN_BUGS[bug]}")
    healthy = not target.problems and unexpected_500 == 0 and unknown_tracebacks == 0 and proxy.alive()
    return healthy and healthz == 200 and sent >= wanted and (allow_known or known_500 == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="at least this many requests")
    parser.add_argument(
        "--allow-known-bugs",
        action="store_true",
        help="exit 0 even if the known bugs (KNOWN_BUGS in tests/test_fuzz.py) answered 500",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        fakes = {name: stack.enter_context(FakeOpenAI(name)) for name in PROVIDERS}
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-long-")))
        proxy = stack.enter_context(running_proxy(fuzz_config({n: f.url for n, f in fakes.items()}), workdir))
        target = Target(proxy.url, fakes, ServerLog(), proxy.alive)
        sent = run_schemathesis(target, int(args.requests * SCHEMATHESIS_SHARE), raise_on_problem=False)
        print(f"schemathesis: {sent:,} requests", flush=True)
        enable_all(proxy.url)
        sent += hand_written(target)
        while sent < args.requests and proxy.alive():
            sent += run_body_fuzz(target, args.requests - sent, raise_on_problem=False)
            print(f"+ hypothesis bodies: {sent:,} requests so far", flush=True)
        healthz: int | None = None
        with contextlib.suppress(httpx.TransportError):
            healthz = httpx.get(proxy.url + "/healthz", timeout=10).status_code
        ok = report(
            target,
            sent,
            args.requests,
            time.monotonic() - started,
            proxy,
            healthz,
            tracebacks(proxy.stderr),
            allow_known=args.allow_known_bugs,
        )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
