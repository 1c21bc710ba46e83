"""`fallback-proxy serve` arguments: how many workers, from the flag, the environment or the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.config import ConfigError
from tests.conftest import build_config

PROVIDERS: dict[str, Any] = {
    "providers": {"cloud": {"model": "openai/gpt-test", "api_base": "http://127.0.0.1:9/v1"}},
    "routes": {"default": ["cloud"]},
}


def workers(argv: list[str], server: dict[str, Any] | None = None) -> int:
    config = build_config({**PROVIDERS, "server": server or {}})
    return cli.worker_count(cli.build_parser().parse_args(["serve", *argv]), config)


def test_one_worker_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.WORKERS_VARIABLE, raising=False)
    assert workers([]) == 1


def test_the_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.WORKERS_VARIABLE, "4")
    assert workers([]) == 4
    assert workers(["--workers", "2"]) == 2


def test_the_config_sets_workers_unless_the_flag_or_the_environment_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.WORKERS_VARIABLE, raising=False)
    assert workers([], {"workers": 3}) == 3
    assert workers(["--workers", "2"], {"workers": 3}) == 2
    monkeypatch.setenv(cli.WORKERS_VARIABLE, "4")
    assert workers([], {"workers": 3}) == 4


@pytest.mark.parametrize("value", [0, -2, "two", 1.5])
def test_a_bad_worker_count_in_the_config_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({**PROVIDERS, "server": {"workers": value}})
    assert any(problem.startswith("server.workers") for problem in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_worker_count_in_the_environment_is_a_usage_error(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(PROVIDERS))
    monkeypatch.setenv(cli.WORKERS_VARIABLE, value)
    assert cli.main(["serve", "--config", str(config)]) == cli.EXIT_CONFIG
    assert f"error: ${cli.WORKERS_VARIABLE}: expected a whole number of at least 1, got {value!r}" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_worker_flag_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--workers", value])
    assert exit_.value.code == 2
    assert f"--workers: expected a whole number of at least 1, got {value!r}" in capsys.readouterr().err


def test_serve_raises_its_open_files_limit_to_the_hard_one() -> None:
    """Each stream holds two sockets: a soft limit of 1,024 would cap a worker near 500."""
    script = (
        "import resource\n"
        "from proxy.server import raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "print(raise_open_files_limit() == (hard, hard) == resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "True", done.stderr
