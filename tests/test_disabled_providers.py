"""Providers without their key (``needs: [api_key]``): disabled, reported, never called, never probed.

config/example.yaml names five cloud providers and a local Ollama; whoever
runs it has some of their keys, or none. A provider that ``needs`` a field
(``api_key``, ``api_base``) whose variables are unset is disabled with the
reason ("OPENAI_API_KEY not set"): check-config and the start-up log say so,
every walk passes over it without a network call (class ``policy``), probes and
warm-ups leave it alone, and /readyz and /admin/status show it as ``disabled``.
A missing or misspelt key of the file is still an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import ConfigError, parse_config
from proxy.fakes import FakeOpenAI
from tests.conftest import ServedApp, openai_provider

ROOT = Path(__file__).resolve().parents[1]
CLOUD_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY", "OPENROUTER_API_KEY")


def keyed(url: str, variable: str = "FP_TEST_KEY") -> dict[str, Any]:
    """A provider at `url` that needs the key in ``$variable``."""
    return {**openai_provider(url), "api_key": f"${{{variable}}}", "needs": ["api_key"]}


def config_of(providers: dict[str, Any], routes: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    return parse_config(
        {"providers": providers, "routes": routes, "health": {"probe_interval_seconds": 0}}, environ=environ or {}
    )


# --- the config ------------------------------------------------------------------------------


def test_an_empty_key_disables_the_provider_with_the_variable_named() -> None:
    config = config_of(
        {"a": keyed("http://127.0.0.1:9"), "b": openai_provider("http://127.0.0.1:9")}, {"r": ["a", "b"]}
    )
    assert config.providers["a"].disabled_reason == "FP_TEST_KEY not set"
    assert config.providers["b"].disabled_reason is None
    assert config.warnings == (
        "providers.a: disabled: FP_TEST_KEY not set (needs: [api_key]; set it to use this provider)",
    )


def test_a_set_key_enables_it() -> None:
    config = config_of({"a": keyed("http://127.0.0.1:9")}, {"r": ["a"]}, {"FP_TEST_KEY": "sk-test"})
    assert config.providers["a"].disabled_reason is None and config.providers["a"].api_key == "sk-test"
    assert config.warnings == ()


def test_the_default_form_and_an_empty_value_disable_it_too() -> None:
    """Every variable a needed field refers to must be set: a default does not stand in for a key."""
    defaulted = {**openai_provider("http://127.0.0.1:9"), "api_key": "${FP_TEST_KEY:-sk-test}", "needs": ["api_key"]}
    literal = {**openai_provider("http://127.0.0.1:9"), "api_key": "", "needs": ["api_key"]}
    config = config_of({"a": defaulted, "b": literal}, {"r": ["a", "b"]}, {"FP_TEST_KEY": ""})
    assert config.providers["a"].disabled_reason == "FP_TEST_KEY not set"
    assert config.providers["b"].disabled_reason == "api_key is empty"


def test_a_local_provider_without_its_server_address_is_disabled_not_pointed_at_localhost() -> None:
    local = {"model": "openai/qwen2.5:7b", "api_base": "${FP_OLLAMA}/v1", "local": True, "needs": ["api_base"]}
    config = config_of({"local": local}, {"private": {"local_only": True, "chain": ["local"]}})
    assert config.providers["local"].disabled_reason == "FP_OLLAMA not set"
    assert config.providers["local"].api_base is None
    served = config_of({"local": local}, {"r": ["local"]}, {"FP_OLLAMA": "http://10.0.0.7:11434"})
    assert served.providers["local"].api_base == "http://10.0.0.7:11434/v1"
    assert served.providers["local"].disabled_reason is None


def test_without_needs_an_empty_key_is_sent_as_none() -> None:
    provider = {**openai_provider("http://127.0.0.1:9"), "api_key": "${FP_TEST_KEY:-}"}
    config = config_of({"a": provider}, {"r": ["a"]})
    assert config.providers["a"].disabled_reason is None and config.providers["a"].api_key is None


@pytest.mark.parametrize(
    ("provider", "problem"),
    [
        # Needing a field the provider does not have: the file is wrong, not the environment.
        ({"model": "openai/gpt-test", "needs": ["api_key"]}, "providers.a: needs api_key, but has none"),
        # A field it does not need still requires its variables.
        (
            {"model": "openai/gpt-test", "api_key": "${FP_TEST_KEY}", "api_base": "${FP_BASE}", "needs": ["api_key"]},
            "providers.a.api_base: environment variable FP_BASE is not set",
        ),
        # Misspellings are unknown keys or fields, with the suggestion.
        ({"model": "openai/gpt-test", "api_key": "${FP_TEST_KEY}", "need": ["api_key"]}, "did you mean 'needs'?"),
        ({"model": "openai/gpt-test", "api_key": "x", "needs": ["api_keys"]}, "did you mean 'api_key'?"),
        ({"model": "openai/gpt-test", "api_key": "x", "needs": "api_key"}, "providers.a.needs: expected a list"),
    ],
)
def test_mistakes_in_the_file_are_still_errors(provider: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_of({"a": provider}, {"r": ["a"]})
    assert any(problem in line for line in caught.value.problems), caught.value.problems


def test_a_route_with_every_provider_disabled_is_warned_about() -> None:
    config = config_of(
        {"a": keyed("http://127.0.0.1:9"), "b": keyed("http://127.0.0.1:9", "FP_OTHER")}, {"r": ["a", "b"]}
    )
    assert (
        "routes.r: every provider it reaches is disabled: it answers 503 until one of them is set up" in config.warnings
    )


def test_an_alert_webhook_whose_url_is_empty_is_off_and_a_missing_url_is_an_error() -> None:
    base = {"providers": {"a": openai_provider("http://127.0.0.1:9")}, "routes": {"r": ["a"]}}
    config = parse_config({**base, "alerts": {"webhooks": [{"url": "${ALERT_WEBHOOK_URL:-}"}]}}, environ={})
    assert config.alerts.webhooks == ()
    with pytest.raises(ConfigError, match="missing required key 'url'"):
        parse_config({**base, "alerts": {"webhooks": [{"format": "json"}]}}, environ={})


def test_example_yaml_passes_check_config_with_no_key_exported() -> None:
    environ = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    environ.pop("ALERT_WEBHOOK_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(ROOT / "config" / "example.yaml")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for key in (*CLOUD_KEYS, "OLLAMA_URL"):
        assert f"disabled: {key} not set" in done.stdout
    # Ten providers disabled, so are the five routes; nothing else in the file needs the environment.
    assert "warnings (15):" in done.stdout


# --- the proxy: skipped without a call, never probed, shown as disabled ----------------------


def test_a_walk_passes_over_a_disabled_provider_without_calling_it(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = serve(
        config_of({"keyless": keyed(cloud.url), "backup": openai_provider(backup.url)}, {"r": ["keyless", "backup"]})
    )
    answer = http.post(
        f"{proxy.url}/v1/chat/completions", json={"model": "r", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from backup."
    assert answer.headers["x-proxy-fallbacks"] == "keyless=policy"
    assert cloud.request_count == 0

    alone = http.post(
        f"{proxy.url}/v1/chat/completions", json={"model": "keyless", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert alone.status_code == 503
    assert "keyless: policy (disabled: FP_TEST_KEY not set; not called)" in alone.json()["error"]["message"]
    assert cloud.request_count == 0


def test_a_disabled_provider_is_never_probed_and_shows_as_disabled(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, http: httpx.Client
) -> None:
    data = {
        "providers": {"keyless": keyed(cloud.url), "backup": openai_provider(backup.url)},
        "routes": {"r": ["keyless", "backup"]},
        "health": {"probe_interval_seconds": 0.05},
        "server": {"admin_key": "admin-secret"},
    }
    proxy = serve(parse_config(data, environ={}))
    deadline = time.monotonic() + 30
    while sum(r.path == "/v1/models" for r in backup.requests) < 3:  # several probe rounds have run
        assert time.monotonic() < deadline, "the enabled provider was never probed"
        time.sleep(0.05)
    assert cloud.request_count == 0

    ready = http.get(f"{proxy.url}/readyz").json()
    assert ready["health"]["keyless"] == {"state": "disabled", "breaker": "closed", "reason": "FP_TEST_KEY not set"}
    assert ready["health"]["backup"]["state"] == "healthy"
    status = http.get(f"{proxy.url}/admin/status", headers={"authorization": "Bearer admin-secret"}).json()
    keyless = status["providers"]["keyless"]
    assert (keyless["state"], keyless["disabled"], keyless["reason"]) == ("disabled", True, "FP_TEST_KEY not set")
    assert status["providers"]["backup"]["state"] == "healthy" and not status["providers"]["backup"]["disabled"]
    # The operator's switch cannot enable what the config leaves out: the answer says it stays off.
    enabled = http.post(f"{proxy.url}/admin/providers/keyless/enable", headers={"authorization": "Bearer admin-secret"})
    assert enabled.json() == {"provider": "keyless", "disabled": True, "reason": "FP_TEST_KEY not set"}
    assert cloud.request_count == 0
