"""What the command line shows a person: `--version`, and log lines as readable
text at a terminal (JSON otherwise, or as `--log-format` / the environment say)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from proxy import cli
from proxy.adapters import Usage
from proxy.fakes import FakeOpenAI
from proxy.logtext import TextLogHandler
from proxy.metrics import Metrics
from proxy.observe import JsonLogHandler, Observer, RequestRecord, configure_logging, event
from tests.conftest import openai_provider
from tests.redis_server import free_port

TEXT_HEAD = r"\d\d:\d\d:\d\d\.\d{3} "


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"fallback-proxy {importlib.metadata.version('fallback-proxy')}\n"


def test_version_from_the_installed_command() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and re.fullmatch(r"fallback-proxy \d+\.\d+\.\d+\S*\n", done.stdout)


@pytest.mark.parametrize(
    ("flag", "environment", "terminal", "expected"),
    [
        (None, None, True, "text"),
        (None, None, False, "json"),
        (None, "", False, "json"),
        (None, "json", True, "json"),
        (None, " TEXT ", False, "text"),
        ("json", "text", True, "json"),
        ("text", None, False, "text"),
    ],
)
def test_the_log_format_flag_then_the_environment_then_the_terminal(
    flag: str | None, environment: str | None, terminal: bool, expected: str
) -> None:
    assert cli.log_format(flag, environment, terminal) == expected


def test_a_bad_log_format_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv(cli.LOG_FORMAT_VARIABLE, "xml")
    assert cli.main(["check-config", str(tmp_path / "none.yaml")]) == cli.EXIT_CONFIG
    assert "FALLBACK_PROXY_LOG_FORMAT" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--log-format", "text", "serve"], ["serve", "--log-format", "text"]])
def test_the_flag_goes_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).log_format == "text"


@pytest.fixture
def root_logging() -> Iterator[io.StringIO]:
    """`configure_logging` on the root logger, writing into a buffer; put back after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream
    root.handlers[:], root.level = saved


def _point_at(stream: io.StringIO) -> None:
    for handler in logging.getLogger().handlers:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)


def a_request() -> RequestRecord:
    record = RequestRecord("9f2c4e1a77aa", "default", stream=True)
    record.attempt("openai-4o", "timeout", 10003.2, "no first token within 10s")
    record.attempt(
        "claude",
        "connection_error",
        12.0,
        "the provider's connection broke mid-answer",
        "ClientPayloadError: Response payload is not completed",
    )
    record.attempt("local-qwen", "ok", 212.5)
    record.provider, record.model, record.ttft_ms, record.usage = "local-qwen", "qwen2.5:7b", 10215.9, Usage(12, 85)
    return record


def test_text_lines_are_readable_one_liners(root_logging: io.StringIO) -> None:
    configure_logging("info", "text")
    assert [type(h) for h in logging.getLogger().handlers] == [TextLogHandler]
    _point_at(root_logging)
    Observer(Metrics(CollectorRegistry())).finish(a_request())
    event(
        "breaker_open", logging.WARNING, provider="openai-4o", reason="timeout: 3 consecutive failures", retry_in_s=30
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("fallback_proxy").exception("unexpected error on %s", "POST /x")
    lines = root_logging.getvalue().splitlines()
    request, breaker, error = lines[0], lines[1], lines[2]
    assert re.match(
        TEXT_HEAD + r"INFO    request 9f2c4e1a default stream 200 ok by local-qwen \(qwen2\.5:7b\): ", request
    )
    assert (
        'openai-4o timeout 10003ms "no first token within 10s" -> claude connection_error 12ms '
        '"the provider\'s connection broke mid-answer" [ClientPayloadError: Response payload is not completed] '
        "-> local-qwen ok 212ms; ttft 10216ms, total "
    ) in request
    assert request.endswith("tokens 12+85") and "{" not in request
    assert re.fullmatch(
        TEXT_HEAD + r'WARNING breaker_open provider=openai-4o reason="timeout: 3 consecutive failures" retry_in_s=30',
        breaker,
    )
    assert re.fullmatch(TEXT_HEAD + r"ERROR   fallback_proxy: unexpected error on POST /x", error)
    assert "Traceback (most recent call last)" in lines[3] and lines[-1] == "ValueError: boom"


def test_json_stays_the_machine_format(root_logging: io.StringIO) -> None:
    configure_logging("info", "json")
    assert [type(h) for h in logging.getLogger().handlers] == [JsonLogHandler]
    _point_at(root_logging)
    Observer(Metrics(CollectorRegistry())).finish(a_request())
    line = json.loads(root_logging.getvalue())
    assert line["attempts"][1] == {
        "provider": "claude",
        "outcome": "connection_error",
        "ms": 12.0,
        "detail": "the provider's connection broke mid-answer",
        "cause": "ClientPayloadError: Response payload is not completed",
    }


def _read_until(fd: int, pattern: str, seconds: float = 60) -> str:
    """What the process wrote to its terminal, up to a line matching `pattern`."""
    seen = ""
    deadline = time.monotonic() + seconds
    while not re.search(pattern, seen, re.MULTILINE):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in: {seen[-2000:]}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536).decode("utf-8", "replace")
            except OSError:  # the process is gone
                break
    return seen


@pytest.mark.slow
def test_serve_at_a_terminal_logs_text(tmp_path: Path, cloud: FakeOpenAI) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    data = {
        "server": {"port": port},
        "providers": {"cloud": openai_provider(cloud.url)},
        "routes": {"default": ["cloud"]},
        "health": {"probe_interval_seconds": 0},
    }
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != cli.LOG_FORMAT_VARIABLE}
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    try:
        started = _read_until(leader, r"fallback_proxy: ready: 1 providers")
        assert re.search(TEXT_HEAD + r"INFO    fallback_proxy: ready: 1 providers, 1 routes, memory state", started)
        body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30).status_code == 200
        logged = _read_until(leader, r"INFO    request ")
        assert re.search(
            TEXT_HEAD + r"INFO    request \w{8} default plain 200 ok by cloud \(gpt-test\): cloud ok ", logged
        )
        assert '{"event"' not in logged
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        os.close(leader)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_serve_cleanly_without_a_traceback(tmp_path: Path, workers: int) -> None:
    """Ctrl-C in a terminal (SIGINT) is how a user stops `serve`: it shuts down
    as SIGTERM does, exit status 0, and says nothing about a KeyboardInterrupt."""
    port = free_port()
    config = tmp_path / "proxy.yaml"
    data = {
        "server": {"host": "127.0.0.1", "port": port},
        "providers": {"cloud": openai_provider("http://127.0.0.1:9/v1")},
        "routes": {"default": ["cloud"]},
        "health": {"probe_interval_seconds": 0},
    }
    config.write_text(yaml.safe_dump(data))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--workers", str(workers)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("serve did not become ready")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert process.returncode == 0, err
