"""Tests for `fallback-proxy check-config`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.cli import build_parser, main

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "example.yaml"
EXAMPLE_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY", "OPENROUTER_API_KEY")

GOOD = """
redis: {url: "redis://:redis-secret@redis:6379/0"}
auth: {keys: ["${PROXY_API_KEY}"]}
providers:
  openai-4o:
    model: openai/gpt-4o-2024-08-06
    api_key: ${OPENAI_API_KEY}
    quota: {requests_per_day: 5000, tokens_per_day: 2000000}
    capabilities: [vision, tools]
  claude:
    model: anthropic/claude-sonnet-4-5-20250929
    api_key: sk-ant-literal-secret
  local-qwen:
    model: ollama_chat/qwen2.5
    local: true
routes:
  default: [openai-4o, claude, local-qwen]
  private: {local_only: true, chain: [local-qwen]}
  coding:
    first: openai-4o
    on:
      openai-4o: {rate_limited: claude, context_window_exceeded: claude, default: local-qwen}
      claude: {default: local-qwen}
"""

BAD = """
providers:
  openai-4o: {model: openai/gpt-4o-2024-08-06, tmeout: {total: 5}}
routes:
  default: [openai-4o, olama]
  loop: {first: openai-4o, on: {openai-4o: {default: openai-4o}}}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def set_example_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EXAMPLE_KEYS:
        monkeypatch.setenv(name, f"dummy-{name.lower()}")
    monkeypatch.setenv("OLLAMA_URL", "http://127.0.0.1:11434")  # the example's local providers need it


def test_good_config_prints_a_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROXY_API_KEY", "proxy-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    path = write(tmp_path, GOOD)

    assert main(["check-config", path]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"{path}: OK\n")
    assert "  openai-4o: openai/gpt-4o-2024-08-06\n    cloud, openai-compatible, https://api.openai.com/v1\n" in out
    assert "quota: 5,000 requests/day, 2,000,000 tokens/day; capabilities: tools, vision" in out
    assert "  claude: anthropic/claude-sonnet-4-5-20250929\n    cloud, litellm," in out
    assert "  local-qwen: ollama_chat/qwen2.5\n    local, litellm, http://localhost:11434\n" in out
    assert "  default: openai-4o -> claude -> local-qwen\n    chain\n" in out
    assert "  private: local-qwen\n    chain, local_only\n" in out
    assert (
        "  coding: openai-4o -> local-qwen  "
        "(rate_limited: openai-4o -> claude; context_window_exceeded: openai-4o -> claude)\n    graph\n"
    ) in out
    assert "redis: redis://:***@redis:6379/0\n" in out
    assert "auth: 1 key\n" in out
    assert "warnings (1):\n  warning: providers.local-qwen.model: tag not pinned" in out
    for secret in ("proxy-secret", "sk-openai-secret", "sk-ant-literal-secret", "redis-secret"):
        assert secret not in out


def test_bad_config_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD)

    assert main(["check-config", path]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "error: providers.openai-4o: unknown key 'tmeout' (did you mean 'timeout'?)",
        "error: routes.default[1]: unknown provider 'olama' (expected one of: openai-4o)",
        "error: routes.loop: cycle openai-4o -> openai-4o",
        f"{path}: 3 problems",
    ]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["check-config", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: {missing}: file not found"


def test_example_config_passes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    set_example_keys(monkeypatch)
    for name in ("REDIS_URL", "PROXY_API_KEY", "PROXY_HOST", "PROXY_PORT", "PROXY_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)

    assert main(["check-config", str(EXAMPLE)]) == 0

    out = capsys.readouterr().out
    assert "routes (5):" in out and "  private: local-qwen -> local-qwen-openai\n    chain, local_only\n" in out
    assert "redis: in-process (single instance)" in out
    assert "warnings: none" in out
    assert "dummy-" not in out


def test_example_config_disables_the_providers_whose_key_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example's cloud providers `needs: [api_key]`: it runs with the keys at hand."""
    for name in EXAMPLE_KEYS:
        monkeypatch.delenv(name, raising=False)

    assert main(["check-config", str(EXAMPLE)]) == 0

    out = capsys.readouterr().out
    for name in EXAMPLE_KEYS:
        assert f": disabled: {name} not set (needs: [api_key]; set it to use this provider)" in out


def test_parser_has_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["check-config", "x.yaml"])
    assert (args.command, args.file) == ("check-config", "x.yaml")
    with pytest.raises(SystemExit) as caught:
        parser.parse_args([])
    assert caught.value.code == 2


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("fallback-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


@pytest.mark.parametrize("command", [_console_script(), [sys.executable, "-m", "proxy.cli"]], ids=["script", "module"])
def test_runs_as_a_program(command: list[str]) -> None:
    env = {**os.environ, **{name: "dummy" for name in EXAMPLE_KEYS}}
    done = subprocess.run(
        [*command, "check-config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=EXAMPLE.parents[1],
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "coding: openai-4o -> local-qwen  (rate_limited: openai-4o -> claude;" in done.stdout


def test_a_typo_in_a_provider_prefix_fails_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "providers:\n"
        "  claude: {model: anthropc/claude-sonnet-4-5-20250929, api_key: k}\n"
        "  local: {model: ollama_chat/qwen2.5:7b, local: true}\n"
        "routes:\n  default: [claude, local]\n",
    )
    assert main(["check-config", path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: providers.claude.model: unknown provider prefix 'anthropc' (did you mean 'anthropic'?)"
