"""``fallback-proxy healthcheck``: checks the running server where it really listens.

The image's HEALTHCHECK runs this in a fresh process. It must follow the port
`serve` was given (``serve --port 9000``) or took from its config
(``${PROXY_PORT}``), not a number written into the Dockerfile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.config import parse_config
from proxy.healthcheck import check, find_serve, listen_address, probe_url, serve_arguments
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]


# --- the pure pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/fallback-proxy", "serve", "--port", "9000"], ("--port", "9000")),
        (["fallback-proxy", "serve"], ()),
        (["python3", "-m", "proxy.cli", "serve", "--host", "::"], ("--host", "::")),
        (["/opt/venv/bin/python", "/opt/venv/bin/fallback-proxy", "healthcheck"], None),
        (["python", "-m", "proxy.fakes", "ollama"], None),
        (["redis-server", "--port", "6379"], None),
        ([], None),
    ],
)
def test_serve_arguments(cmdline: list[str], expected: tuple[str, ...] | None) -> None:
    assert serve_arguments(cmdline) == expected


def test_listen_address_follows_serve_flags_first_then_the_config() -> None:
    data = {
        "providers": {"a": {"model": "openai/gpt-test", "api_base": "http://127.0.0.1:9/v1"}},
        "routes": {"r": ["a"]},
        "server": {"host": "${PROXY_HOST:-127.0.0.1}", "port": "${PROXY_PORT:-8080}"},
    }
    config = parse_config(data, environ={"PROXY_PORT": "8181"})
    assert listen_address(None, None, config) == ("127.0.0.1", 8181)
    assert listen_address("0.0.0.0", 9000, config) == ("0.0.0.0", 9000)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:9000/healthz"),
        ("::", "http://[::1]:9000/healthz"),
        ("127.0.0.2", "http://127.0.0.2:9000/healthz"),
        ("::1", "http://[::1]:9000/healthz"),
        ("proxy.internal", "http://proxy.internal:9000/healthz"),
    ],
)
def test_probe_url_reaches_a_wildcard_bind_on_loopback(host: str, url: str) -> None:
    assert probe_url(host, 9000, "/healthz") == url


def test_find_serve_reads_the_oldest_serve_process_and_its_environment(tmp_path: Path) -> None:
    def process(pid: int, argv: list[str], environ: dict[str, str] | None) -> None:
        folder = tmp_path / str(pid)
        folder.mkdir()
        (folder / "cmdline").write_bytes(b"".join(word.encode() + b"\0" for word in argv))
        if environ is not None:
            (folder / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))

    process(7, ["python", "/opt/venv/bin/fallback-proxy", "healthcheck"], {})
    process(12, ["python", "/opt/venv/bin/fallback-proxy", "serve", "--port", "9000"], {"PROXY_PORT": "1"})
    process(30, ["python", "/opt/venv/bin/fallback-proxy", "serve", "--port", "9100"], None)
    (tmp_path / "self").mkdir()

    found = find_serve(proc=tmp_path)
    assert found is not None and (found.pid, found.arguments) == (12, ("--port", "9000"))
    assert found.environ == {"PROXY_PORT": "1"}
    chosen = find_serve(30, proc=tmp_path)
    assert chosen is not None and chosen.arguments == ("--port", "9100")
    assert chosen.environ == dict(os.environ)  # unreadable: the checker's own
    assert find_serve(7, proc=tmp_path) is None
    assert find_serve(99, proc=tmp_path) is None


# --- against a real server --------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`fallback-proxy serve --port P` with a config whose own port is another: the flag must win."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "providers: {a: {model: openai/gpt-test, api_base: 'http://127.0.0.1:9/v1'}}\n"
        "routes: {r: [a]}\n"
        "health: {probe_interval_seconds: 0}\n"
        "server: {port: '${PROXY_PORT:-8080}', shutdown_grace_seconds: 1}\n",
        encoding="utf-8",
    )
    port = free_port()
    env = {**os.environ, "FALLBACK_PROXY_CONFIG": str(config), "PROXY_PORT": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.05)
        yield server, port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_healthcheck_checks_the_port_serve_was_started_with(
    served: tuple[subprocess.Popen[bytes], int],
) -> None:
    server, port = served
    alive = healthcheck("--pid", str(server.pid))
    assert alive.returncode == 0, alive.stderr
    assert alive.stdout.strip() == f"healthy: http://127.0.0.1:{port}/healthz"
    ready = healthcheck("--pid", str(server.pid), "--ready")
    assert ready.returncode == 0 and ready.stdout.strip().endswith(f":{port}/readyz")


def test_healthcheck_fails_when_nothing_answers() -> None:
    port = free_port()
    refused = healthcheck("--url", f"http://127.0.0.1:{port}/healthz", "--timeout", "1")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"unhealthy: http://127.0.0.1:{port}/healthz: ")
    gone = healthcheck("--pid", "999999999")
    assert gone.returncode == 1 and "no `fallback-proxy serve` process found" in gone.stderr


def test_check_reports_a_non_200_answer(served: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = served
    assert check(f"http://127.0.0.1:{port}/healthz", 5) is None
    assert check(f"http://127.0.0.1:{port}/no-such-path", 5) == f"http://127.0.0.1:{port}/no-such-path answered 404"
