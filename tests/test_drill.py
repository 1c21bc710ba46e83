"""Tests for `fallback-proxy drill`: in-process and against a running proxy, over real fakes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy import drill
from proxy.cli import main
from proxy.drill import DrillAttempt, Plan, Report, Result
from proxy.fakes import FakeOllama, FakeOpenAI
from tests.conftest import ServedApp

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOllama]]:
    """Shared by the module's tests (stopping a fake takes a while); each test sees them fresh."""
    with FakeOpenAI("cloud", api_key="sk-upstream") as cloud, FakeOllama("local") as local:
        yield cloud, local


@pytest.fixture
def cloud(fakes: tuple[FakeOpenAI, FakeOllama]) -> FakeOpenAI:
    fakes[0].reset()
    return fakes[0]


@pytest.fixture
def local(fakes: tuple[FakeOpenAI, FakeOllama]) -> FakeOllama:
    fakes[1].reset()
    return fakes[1]


def config_data(cloud: FakeOpenAI, local: FakeOllama, **extra: Any) -> dict[str, Any]:
    return {
        "auth": {"keys": ["team-key"]},
        "providers": {
            "cloud": {"model": "openai/gpt-test", "api_key": "sk-upstream", "api_base": cloud.url + "/v1"},
            "local": {"model": "openai/qwen2.5:7b", "api_base": local.url + "/v1", "local": True},
        },
        "routes": {"default": ["cloud", "local"], "private": {"local_only": True, "chain": ["local"]}},
        "health": {"probe_interval_seconds": 0},
        **extra,
    }


@pytest.fixture
def config_file(tmp_path: Path, cloud: FakeOpenAI, local: FakeOllama) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(cloud, local)), encoding="utf-8")
    return str(path)


def drill_json(capsys: pytest.CaptureFixture[str], argv: Sequence[str], expected_exit: int) -> dict[str, Any]:
    assert main(["drill", *argv, "--json"]) == expected_exit
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


# --- in-process -------------------------------------------------------------------------


def test_in_process_drill_falls_back_to_local(
    config_file: str, cloud: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["drill", "--config", config_file, "--disable", "cloud", "--route", "default"]) == 0
    out, err = capsys.readouterr()
    assert "REAL providers" in err
    rows = [line.split() for line in out.splitlines() if line.startswith("default ")]
    assert len(rows) == 3 and all(row[4] == "local" for row in rows)
    assert "cloud=unhealthy, local=ok" in out
    assert "default: answered 3/3 by local" in out and "drill PASSED" in out
    assert cloud.request_count == 0


def test_switching_every_provider_off_gives_503s(config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["drill", "--config", config_file, "--disable", "cloud", "--disable", "local", "--no-stream"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "all_providers_failed" in out and "drill FAILED: 0/6 requests answered within the SLA" in out
    assert "default: answered 0/3 by nobody" in out and "503 expected" in out
    assert "private: answered 0/3 by nobody" in out


def test_a_missed_sla_fails_the_drill(config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    document = drill_json(capsys, ["--config", config_file, "--sla-ms", "1", "--requests", "1"], 1)
    assert all(r["status"] == 200 and r["answered"] and not r["sla_held"] for r in document["requests"])
    assert document["passed"] is False


def test_json_report_has_every_field(config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", config_file, "--disable", "cloud", "--requests", "2"]
    document = drill_json(capsys, argv, 0)
    assert document["mode"] == "in-process" and document["disabled"] == ["cloud"] and document["passed"]
    assert [r["route"] for r in document["requests"]] == ["default", "default", "private", "private"]
    first = document["requests"][0]
    assert first["stream"] is True and first["status"] == 200 and first["provider"] == "local"
    assert first["attempts"] == [{"provider": "cloud", "outcome": "unhealthy"}, {"provider": "local", "outcome": "ok"}]
    assert 0 < first["first_byte_ms"] <= first["total_ms"] and 0 < first["first_token_ms"] <= first["total_ms"]
    assert first["sla_held"] is True and first["error"] is None and first["request_id"]
    summary = document["routes"][0]
    assert summary["route"] == "default" and summary["answered"] == 2 and summary["providers"] == ["local"]
    assert summary["sla_held"] == 2 and summary["p50_ms"] <= summary["max_ms"]
    assert document["leaks"] == []


def test_plain_answers_are_drilled_too(config_file: str, cloud: FakeOpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    document = drill_json(capsys, ["--config", config_file, "--no-stream", "--requests", "1"], 0)
    assert [r["provider"] for r in document["requests"]] == ["cloud", "local"]
    assert all(r["stream"] is False and r["first_token_ms"] is None for r in document["requests"])
    assert cloud.request_count == 1


def test_unknown_names_and_bad_configs_exit_2(
    config_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["drill", "--config", config_file, "--disable", "clowd"]) == 2
    assert "no provider named 'clowd'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: {default: [nobody]}\n", encoding="utf-8")
    assert main(["drill", "--config", str(bad)]) == 2
    assert "nobody" in capsys.readouterr().err


def test_the_command_runs_as_a_process(config_file: str) -> None:
    argv = [
        sys.executable,
        "-m",
        "proxy.cli",
        "drill",
        "--config",
        config_file,
        "--disable",
        "cloud",
        "--requests",
        "1",
        "--no-stream",
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cloud=unhealthy, local=ok" in done.stdout and "drill PASSED" in done.stdout


# --- against a running proxy ---------------------------------------------------------------


@pytest.fixture
def proxy(serve: Callable[..., ServedApp], cloud: FakeOpenAI, local: FakeOllama) -> ServedApp:
    return serve(config_data(cloud, local, server={"admin_key": "admin-secret"}))


def remote_argv(proxy: ServedApp, *extra: str) -> list[str]:
    return ["--url", proxy.url, "--admin-key", "admin-secret", "--api-key", "team-key", *extra]


def cloud_disabled(proxy: ServedApp) -> bool:
    status = httpx.get(proxy.url + "/admin/status", headers=ADMIN).json()
    disabled: bool = status["providers"]["cloud"]["disabled"]
    return disabled


def test_remote_drill_switches_off_and_back_on(
    proxy: ServedApp, cloud: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    document = drill_json(capsys, remote_argv(proxy, "--disable", "cloud"), 0)
    assert document["mode"] == "remote" and document["passed"]
    assert [r["route"] for r in document["requests"]] == ["default"] * 3 + ["private"] * 3  # from /v1/models
    assert {r["provider"] for r in document["requests"]} == {"local"}
    assert document["requests"][0]["attempts"][0] == {"provider": "cloud", "outcome": "unhealthy"}
    assert "switched back on: cloud" in document["notes"]
    assert cloud.request_count == 0
    assert not cloud_disabled(proxy)


def test_remote_drill_switches_back_on_after_ctrl_c(
    proxy: ServedApp, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[bool] = []

    async def interrupted(*args: object) -> tuple[Result, ...]:
        seen.append(await asyncio.to_thread(cloud_disabled, proxy))
        signal.raise_signal(signal.SIGINT)
        await asyncio.sleep(10)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(drill.runner, "run_requests", interrupted)
    assert main(["drill", *remote_argv(proxy, "--disable", "cloud")]) == 130
    assert seen == [True] and not cloud_disabled(proxy)
    assert "interrupted" in capsys.readouterr().err


def test_remote_drill_leaves_an_operator_switch_alone(proxy: ServedApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert httpx.post(proxy.url + "/admin/providers/cloud/disable", headers=ADMIN).status_code == 200
    document = drill_json(capsys, remote_argv(proxy, "--disable", "cloud", "--route", "default", "--requests", "1"), 0)
    assert any("already switched off" in note for note in document["notes"])
    assert cloud_disabled(proxy)


def test_remote_drill_with_admin_off_exits_2(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, local: FakeOllama, capsys: pytest.CaptureFixture[str]
) -> None:
    running = serve(config_data(cloud, local))
    assert main(["drill", "--url", running.url, "--admin-key", "admin-secret", "--disable", "cloud"]) == 2
    assert "the proxy's admin endpoints are off: set server.admin_key" in capsys.readouterr().err
    assert cloud.request_count == 0 and local.request_count == 0


# --- the pure parts ---------------------------------------------------------------------------


def result(provider: str, attempts: Sequence[DrillAttempt], total_ms: float = 5.0) -> Result:
    return Result("default", 1, True, 200, provider, tuple(attempts), 1.0, 2.0, total_ms)


def test_fallback_headers_are_parsed() -> None:
    assert drill.parse_fallbacks(None) == ()
    assert drill.parse_fallbacks("a=timeout, b=unhealthy,c") == (
        DrillAttempt("a", "timeout"),
        DrillAttempt("b", "unhealthy"),
        DrillAttempt("c", "?"),
    )
    headers = {"x-proxy-provider": "c", "x-proxy-fallbacks": "a=rate_limited"}
    assert drill.attempts_of(headers, answered=True) == (DrillAttempt("a", "rate_limited"), DrillAttempt("c", "ok"))


def test_a_switched_off_provider_that_answers_fails_loudly() -> None:
    plan = Plan(disabled=("cloud",))
    leaked = result("cloud", [DrillAttempt("cloud", "ok")])
    called = result("local", [DrillAttempt("cloud", "timeout"), DrillAttempt("local", "ok")])
    report = Report("in-process", "c.yaml", "http://x", plan, (leaked, called))
    assert drill.exit_code(report) == 1
    text = drill.render_text(report)
    assert "SWITCHED-OFF PROVIDER 'cloud' ANSWERED" in text and "WAS CALLED (timeout)" in text
    clean = Report("in-process", "c.yaml", "http://x", plan, (result("local", [DrillAttempt("cloud", "unhealthy")]),))
    assert drill.exit_code(clean) == 0
    assert drill.exit_code(Report("remote", "u", "u", plan, ())) == 1  # nothing drilled proves nothing
