"""`fallback-proxy serve` arguments: how many workers, from the flag or the environment."""

from __future__ import annotations

import pytest

from proxy import cli


def workers(argv: list[str]) -> int:
    return cli._workers(cli.build_parser().parse_args(["serve", *argv]))


def test_one_worker_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.WORKERS_VARIABLE, raising=False)
    assert workers([]) == 1


def test_the_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.WORKERS_VARIABLE, "4")
    assert workers([]) == 4
    assert workers(["--workers", "2"]) == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_worker_count_in_the_environment_is_a_usage_error(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.WORKERS_VARIABLE, value)
    assert cli.main(["serve", "--config", "unused.yaml"]) == cli.EXIT_CONFIG
    assert f"error: ${cli.WORKERS_VARIABLE}: expected a whole number of at least 1, got {value!r}" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_worker_flag_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--workers", value])
    assert exit_.value.code == 2
    assert f"--workers: expected a whole number of at least 1, got {value!r}" in capsys.readouterr().err
