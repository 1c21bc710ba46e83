"""Tests for proxy.config: interpolation, the two route forms, and every validation error."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from proxy.config import (
    CAPABILITIES,
    EDGE_KEYS,
    FAILURE_CLASSES,
    Config,
    ConfigError,
    Timeouts,
    interpolate,
    load_config,
    parse_config,
    redact_url,
)

PROVIDERS = """
providers:
  a: {model: openai/gpt-4o-2024-08-06}
  b: {model: anthropic/claude-sonnet-4-5-20250929}
  c: {model: ollama_chat/qwen2.5:7b, local: true}
"""


def load(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path, {} if environ is None else environ)


def problems(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return caught.value.problems


def with_routes(routes: str) -> str:
    return PROVIDERS + "routes:\n" + textwrap.indent(textwrap.dedent(routes), "  ")


# --- constants -------------------------------------------------------------------


def test_edge_keys_are_the_failure_classes_and_default() -> None:
    assert FAILURE_CLASSES | {"default"} == EDGE_KEYS
    assert "rate_limited" in FAILURE_CLASSES and "policy" in FAILURE_CLASSES
    assert {"vision", "tools", "json_schema"} == CAPABILITIES
    assert "misconfigured" in FAILURE_CLASSES


# --- interpolation -----------------------------------------------------------------


def test_interpolate_substitutes_set_variables() -> None:
    assert interpolate("Bearer ${KEY}!", {"KEY": "s3cret"}, "x") == "Bearer s3cret!"
    assert interpolate("${A}${B}", {"A": "1", "B": "2"}, "x") == "12"
    assert interpolate("no references", {}, "x") == "no references"


def test_interpolate_unset_variable_names_path_and_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        interpolate("${OPENAI_API_KEY}", {}, "providers.openai-4o.api_key")
    assert caught.value.problems == (
        "providers.openai-4o.api_key: environment variable OPENAI_API_KEY is not set "
        "(write ${OPENAI_API_KEY:-} to allow it empty)",
    )


def test_interpolate_collects_every_unset_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        interpolate("${A}:${B}", {}, "p")
    assert [problem.split(" is not set")[0] for problem in caught.value.problems] == [
        "p: environment variable A",
        "p: environment variable B",
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, "fallback"), ({"V": ""}, "fallback"), ({"V": "set"}, "set")],
)
def test_interpolate_default_when_unset_or_empty(environ: dict[str, str], expected: str) -> None:
    assert interpolate("${V:-fallback}", environ, "p") == expected


def test_interpolate_empty_default_and_set_but_empty() -> None:
    assert interpolate("${V:-}", {}, "p") == ""
    assert interpolate("${V}", {"V": ""}, "p") == ""


def test_interpolate_escape_is_a_literal_reference() -> None:
    assert interpolate("$${HOME} and ${X}", {"X": "y", "HOME": "/root"}, "p") == "${HOME} and y"
    assert interpolate("cost: $5 $$", {}, "p") == "cost: $5 $$"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${", "p: unterminated '${' (write '$${' for a literal '${')"),
        ("${1BAD}", "p: invalid reference '${1BAD}' (expected ${NAME} or ${NAME:-default})"),
        ("${A-b}", "p: invalid reference '${A-b}' (expected ${NAME} or ${NAME:-default})"),
        ("${A:-${B}}", "p: invalid reference '${A:-${B}' (expected ${NAME} or ${NAME:-default})"),
    ],
)
def test_interpolate_rejects_malformed_references(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        interpolate(value, {}, "p")
    assert caught.value.problems == (message,)


def test_unset_variable_in_file_names_the_key_path(tmp_path: Path) -> None:
    text = """
    providers:
      openai-4o: {model: openai/gpt-4o-2024-08-06, api_key: "${OPENAI_API_KEY}"}
    """
    assert problems(tmp_path, text) == (
        "providers.openai-4o.api_key: environment variable OPENAI_API_KEY is not set "
        "(write ${OPENAI_API_KEY:-} to allow it empty)",
    )


def test_interpolated_values_take_the_field_type(tmp_path: Path) -> None:
    text = """
    server: {port: "${PORT:-8080}", max_body_bytes: "${MAX}"}
    providers:
      a:
        model: openai/gpt-4o-2024-08-06
        local: ${LOCAL}
        api_base: http://localhost:8000/v1
        timeout: {total: "${TOTAL}"}
        context_window: ${CTX:-}
    """
    config = load(tmp_path, text, {"MAX": "1024", "LOCAL": "true", "TOTAL": "2.5"})
    assert config.server.port == 8080 and config.server.max_body_bytes == 1024
    provider = config.providers["a"]
    assert provider.local is True
    assert provider.timeout.total == 2.5
    assert provider.context_window is None  # empty after interpolation: not set
    assert load(tmp_path, text, {"PORT": "9000", "MAX": "1", "LOCAL": "false", "TOTAL": "9"}).server.port == 9000


def test_interpolated_value_of_the_wrong_type_is_an_error(tmp_path: Path) -> None:
    text = "server: {port: '${PORT}'}\n" + PROVIDERS
    assert problems(tmp_path, text, {"PORT": "eighty"}) == ("server.port: expected an integer, got 'eighty'",)


def test_empty_api_key_is_none_and_empty_auth_keys_are_dropped(tmp_path: Path) -> None:
    text = """
    auth: {keys: ["${PROXY_API_KEY:-}", "", "k1", "k1"]}
    providers:
      a: {model: gpt-4o-2024-08-06, api_key: ""}
      b: {model: gpt-4o-2024-08-06, api_key: "${KEY:-}"}
    """
    config = load(tmp_path, text)
    assert config.providers["a"].api_key is None and config.providers["b"].api_key is None
    assert config.auth_keys == ("k1",)
    open_text = 'auth: {keys: ["${PROXY_API_KEY:-}"]}\n' + PROVIDERS
    assert load(tmp_path, open_text).auth_keys == ()
    assert load(tmp_path, open_text, {"PROXY_API_KEY": "sk-proxy"}).auth_keys == ("sk-proxy",)


def test_environ_defaults_to_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALLBACK_PROXY_TEST_KEY", "from-env")
    path = tmp_path / "c.yaml"
    path.write_text("providers:\n  a: {model: gpt-4o-2024-08-06, api_key: '${FALLBACK_PROXY_TEST_KEY}'}\n")
    assert load_config(path).providers["a"].api_key == "from-env"
    assert load_config(str(path)).source == str(path)


# --- the whole file ----------------------------------------------------------------------


def test_full_config_and_defaults(tmp_path: Path) -> None:
    text = """
    redis: {url: "redis://:pw@redis:6379/0"}
    auth: {keys: [k1, k2]}
    server: {host: 0.0.0.0, port: 9000, max_body_bytes: 2048, admin_key: adm}
    providers:
      a:
        model: openai/gpt-4o-2024-08-06
        api_key: sk-a
        timeout: {connect: 2, first_token: 10, total: 120, idle: 15}
        quota: {requests_per_day: 5000, tokens_per_day: 2000000}
        context_window: 128000
        capabilities: [vision, tools]
        retries: 2
        probe: false
        headers: {X-Title: proxy}
      c:
        model: ollama_chat/qwen2.5:7b
        local: true
        warmup: true
        system_prompt: Be brief.
    """
    config = load(tmp_path, text)
    assert config.redis_url == "redis://:pw@redis:6379/0"
    assert config.auth_keys == ("k1", "k2")
    assert (config.server.host, config.server.port, config.server.max_body_bytes) == ("0.0.0.0", 9000, 2048)
    assert config.server.admin_key == "adm"
    a = config.providers["a"]
    assert a.timeout == Timeouts(connect=2, first_token=10, total=120, idle=15)
    assert (a.quota and a.quota.requests_per_day, a.quota and a.quota.tokens_per_day) == (5000, 2000000)
    assert a.context_window == 128000 and a.capabilities == {"vision", "tools"}
    assert (a.retries, a.probe, dict(a.headers), a.local, a.warmup) == (2, False, {"X-Title": "proxy"}, False, False)
    c = config.providers["c"]
    assert (c.local, c.warmup, c.system_prompt, c.quota, c.timeout) == (True, True, "Be brief.", None, Timeouts())
    assert list(config.providers) == ["a", "c"]
    assert config.routes == {} and config.warnings == ()


def test_minimal_config_has_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "providers:\n  a: {model: gpt-4o-2024-08-06}\n")
    assert config.redis_url is None and config.auth_keys == ()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.max_body_bytes == 10 * 1024 * 1024 and config.server.admin_key is None
    provider = config.providers["a"]
    assert (provider.retries, provider.probe, dict(provider.headers)) == (0, True, {})
    assert (provider.stream_upstream, provider.continue_with) == (True, "instruction")
    # Not declared, and litellm's model map knows of nothing it lacks: no restriction.
    assert provider.capabilities is None


def test_setting_only_total_caps_the_other_timeouts(tmp_path: Path) -> None:
    config = load(tmp_path, "providers:\n  a: {model: gpt-4o-2024-08-06, timeout: {total: 20}}\n")
    assert config.providers["a"].timeout == Timeouts(connect=5, first_token=20, total=20, idle=20)


def test_parse_config_accepts_data_from_yaml_safe_load() -> None:
    data = yaml.safe_load(with_routes("g: {first: a, on: {a: {default: b}}}"))
    assert True in data["routes"]["g"]  # YAML 1.1 reads the key `on` as True
    config = parse_config(data, {}, source="inline")
    assert dict(config.routes["g"].edges["a"]) == {"default": "b"} and config.source == "inline"


def test_only_true_and_false_are_booleans(tmp_path: Path) -> None:
    config = load(tmp_path, "providers:\n  'on': {model: gpt-4o-2024-08-06}\n  yes: {model: gpt-4o-2024-08-06}\n")
    assert list(config.providers) == ["on", "yes"]


# --- routes ------------------------------------------------------------------------------------


def test_chain_form_is_shorthand_for_default_edges(tmp_path: Path) -> None:
    route = load(tmp_path, with_routes("default: [a, b, c]")).routes["default"]
    assert (route.name, route.first, route.form) == ("default", "a", "chain")
    assert {node: dict(out) for node, out in route.edges.items()} == {"a": {"default": "b"}, "b": {"default": "c"}}
    assert (route.local_only, route.continuation, route.hedge_after_ms, route.budget) == (False, True, None, None)


def test_chain_mapping_form_with_options(tmp_path: Path) -> None:
    text = with_routes(
        """
        private:
          chain: [c]
          local_only: true
          continuation: false
          hedge_after_ms: 1500
          budget: 45.5
        """
    )
    route = load(tmp_path, text).routes["private"]
    assert (route.first, dict(route.edges), route.form) == ("c", {}, "chain")
    assert (route.local_only, route.continuation, route.hedge_after_ms, route.budget) == (True, False, 1500, 45.5)


def test_graph_form_keeps_edges_in_config_order(tmp_path: Path) -> None:
    text = with_routes(
        """
        coding:
          first: a
          on:
            a: {rate_limited: b, context_window_exceeded: b, default: c}
            b: {default: c}
        """
    )
    route = load(tmp_path, text).routes["coding"]
    assert (route.first, route.form) == ("a", "graph")
    assert list(route.edges["a"].items()) == [("rate_limited", "b"), ("context_window_exceeded", "b"), ("default", "c")]
    assert dict(route.edges["b"]) == {"default": "c"}


def test_graph_form_without_edges_is_one_node(tmp_path: Path) -> None:
    route = load(tmp_path, with_routes("solo: {first: b}")).routes["solo"]
    assert (route.first, dict(route.edges), route.form) == ("b", {}, "graph")


def test_chain_entries_are_interpolated(tmp_path: Path) -> None:
    route = load(tmp_path, with_routes("default: ['${FIRST:-a}', b]")).routes["default"]
    assert route.first == "a" and dict(route.edges["a"]) == {"default": "b"}


def test_route_for(tmp_path: Path) -> None:
    config = load(tmp_path, with_routes("default: [a, b]"))
    assert config.route_for("default") is config.routes["default"]
    single = config.route_for("b")
    assert single is not None
    assert (single.name, single.first, dict(single.edges), single.form) == ("b", "b", {}, "provider")
    assert config.route_for("nope") is None


# --- route validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ("default: [a, b, olama]", ["routes.default[2]: unknown provider 'olama' (expected one of: a, b, c)"]),
        ("default: [a, b, a]", ["routes.default[2]: 'a' appears twice (a request visits each provider at most once)"]),
        ("default: []", ["routes.default: chain is empty"]),
        ("default: {chain: []}", ["routes.default.chain: chain is empty"]),
        ("default: {chain: [a, x]}", ["routes.default.chain[1]: unknown provider 'x' (expected one of: a, b, c)"]),
        ("default: {chain: a}", ["routes.default.chain: expected a list of providers, got a string"]),
        ("default: [a, 3]", ["routes.default[1]: expected a string, got a number"]),
        ("default: [a, '']", ["routes.default[1]: expected a provider name"]),
        (
            "default: a",
            ["routes.default: expected a list of providers (a chain), or a mapping with chain: or first:/on:"],
        ),
        ("default: {chain: [a], first: a}", ["routes.default: use either chain: or first:/on:, not both"]),
        ("default: {local_only: true}", ["routes.default: needs chain: [...] or first: with on: {...}"]),
        ("a: [b]", ["routes.a: a provider has the same name, so the model 'a' would be ambiguous"]),
        ("one: [a]\ntwo: [one, b]", ["routes.two[0]: 'one' is a route; a route's nodes must be providers"]),
        (
            "bad name: [a]",
            ["routes.bad name: names use letters, digits, '.', '_' and '-', and start with a letter or digit"],
        ),
        ("g: {first: x}", ["routes.g.first: unknown provider 'x' (expected one of: a, b, c)"]),
        (
            "g: {first: a, on: {a: {rate_limit: b}}}",
            ["routes.g.on.a: unknown failure class 'rate_limit' (did you mean 'rate_limited'?)"],
        ),
        ("g: {first: a, on: {a: {timeout: bb}}}", ["routes.g.on.a.timeout: unknown provider 'bb' (did you mean 'b'?)"]),
        ("g: {first: a, on: {zz: {default: b}}}", ["routes.g.on: unknown provider 'zz' (expected one of: a, b, c)"]),
        ("g: {first: a, on: {a: [b]}}", ["routes.g.on.a: expected a mapping, got a list"]),
        ("g: {first: a, on: {b: {default: c}}}", ["routes.g.on.b: not reachable from first 'a'; no edge leads here"]),
        ("g: {first: a, on: {a: {default: b}, b: {timeout: a}}}", ["routes.g: cycle a -> b -> a"]),
        ("g: {first: a, on: {a: {default: a}}}", ["routes.g: cycle a -> a"]),
        ("g: {first: a, budget: 0}", ["routes.g.budget: must be a positive number, got 0"]),
        ("g: {first: a, hedge_after_ms: -5}", ["routes.g.hedge_after_ms: must be a positive integer, got -5"]),
        ("g: {first: a, local-only: true}", ["routes.g: unknown key 'local-only' (did you mean 'local_only'?)"]),
        ("p: {local_only: true, chain: [c, b]}", ["routes.p: local_only route reaches non-local provider 'b'"]),
        (
            "p: {local_only: true, first: c, on: {c: {rate_limited: a, default: b}}}",
            [
                "routes.p: local_only route reaches non-local provider 'b'",
                "routes.p: local_only route reaches non-local provider 'a'",
            ],
        ),
    ],
)
def test_route_errors_name_the_key(tmp_path: Path, routes: str, expected: list[str]) -> None:
    assert list(problems(tmp_path, with_routes(routes))) == expected


def test_a_local_only_route_of_local_providers_is_fine(tmp_path: Path) -> None:
    text = PROVIDERS + "  d: {model: openai/qwen2.5:7b, api_base: 'http://10.0.0.5:8000/v1', local: true}\n"
    text += "routes:\n  p: {local_only: true, chain: [c, d]}\n"
    assert load(tmp_path, text).routes["p"].local_only


def test_routes_may_be_empty_but_providers_may_not(tmp_path: Path) -> None:
    assert load(tmp_path, PROVIDERS + "routes: {}\n").routes == {}
    assert problems(tmp_path, "routes: {}\n") == ("providers: at least one provider is required",)
    assert problems(tmp_path, "providers: {}\n") == ("providers: at least one provider is required",)
    assert problems(tmp_path, "") == ("providers: at least one provider is required",)


# --- provider validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ("{api_key: k}", "providers.p: missing required key 'model'"),
        ("{model: ''}", "providers.p.model: must not be empty"),
        ("{model: 42}", "providers.p.model: expected a string, got a number"),
        ("{model: openai/}", "providers.p.model: expected 'provider/model', e.g. openai/gpt-4o-2024-08-06"),
        (
            "{model: gpt-4o-2024-08-06, api_base: 'ftp://x'}",
            "providers.p.api_base: expected an http:// or https:// URL, got 'ftp://x'",
        ),
        (
            "{model: gpt-4o-2024-08-06, timeout: {total: 0}}",
            "providers.p.timeout.total: must be a positive number, got 0",
        ),
        (
            "{model: gpt-4o-2024-08-06, timeout: {idle: fast}}",
            "providers.p.timeout.idle: expected a number, got 'fast'",
        ),
        (
            "{model: gpt-4o-2024-08-06, timeout: {first_token: 60, total: 30}}",
            "providers.p.timeout.first_token: 60s must not exceed total (30s)",
        ),
        (
            "{model: gpt-4o-2024-08-06, timeout: {connect: 400}}",
            "providers.p.timeout.connect: 400s must not exceed total (300s)",
        ),
        (
            "{model: gpt-4o-2024-08-06, timeout: {conect: 1}}",
            "providers.p.timeout: unknown key 'conect' (did you mean 'connect'?)",
        ),
        ("{model: gpt-4o-2024-08-06, timeout: 5}", "providers.p.timeout: expected a mapping, got a number"),
        (
            "{model: gpt-4o-2024-08-06, quota: {requests_per_day: 0}}",
            "providers.p.quota.requests_per_day: must be a positive integer, got 0",
        ),
        (
            "{model: gpt-4o-2024-08-06, quota: {tokens_per_day: 1.5}}",
            "providers.p.quota.tokens_per_day: expected an integer, got 1.5",
        ),
        (
            "{model: gpt-4o-2024-08-06, quota: {daily: 1}}",
            "providers.p.quota: unknown key 'daily' (expected one of: requests_per_day, tokens_per_day)",
        ),
        (
            "{model: gpt-4o-2024-08-06, context_window: -1}",
            "providers.p.context_window: must be a positive integer, got -1",
        ),
        (
            "{model: gpt-4o-2024-08-06, context_window: true}",
            "providers.p.context_window: expected an integer, got True",
        ),
        (
            "{model: gpt-4o-2024-08-06, capabilities: [vison]}",
            "providers.p.capabilities[0]: unknown capability 'vison' (did you mean 'vision'?)",
        ),
        ("{model: gpt-4o-2024-08-06, capabilities: vision}", "providers.p.capabilities: expected a list, got a string"),
        ("{model: gpt-4o-2024-08-06, local: maybe}", "providers.p.local: expected true or false, got 'maybe'"),
        ("{model: gpt-4o-2024-08-06, warmup: 1}", "providers.p.warmup: expected true or false, got 1"),
        ("{model: gpt-4o-2024-08-06, retries: 6}", "providers.p.retries: must be between 0 and 5, got 6"),
        ("{model: gpt-4o-2024-08-06, system_prompt: [a]}", "providers.p.system_prompt: expected a string, got a list"),
        ("{model: gpt-4o-2024-08-06, headers: {X-Id: 5}}", "providers.p.headers.X-Id: expected a string, got a number"),
        (
            "{model: gpt-4o-2024-08-06, headers: {'Bad Header': x}}",
            "providers.p.headers: 'Bad Header' is not a valid header name",
        ),
        (
            "{model: gpt-4o-2024-08-06, tmeout: {total: 5}}",
            "providers.p: unknown key 'tmeout' (did you mean 'timeout'?)",
        ),
        (
            "{model: hosted_vllm/llama-3.1-8b}",
            "providers.p.api_base: required for hosted_vllm models (the address of your server)",
        ),
        (
            "{model: llamafile/mistral-7b}",
            "providers.p.api_base: required for llamafile models (the address of your server)",
        ),
        (
            "{model: openai/qwen2.5:7b, local: true}",
            "providers.p.api_base: required for a local provider (the address of the server on your hardware)",
        ),
        ("[model]", "providers.p: expected a mapping, got a list"),
    ],
)
def test_provider_errors_name_the_key(tmp_path: Path, provider: str, expected: str) -> None:
    assert problems(tmp_path, f"providers:\n  p: {provider}\n") == (expected,)


def test_provider_names_are_checked(tmp_path: Path) -> None:
    assert problems(tmp_path, "providers:\n  -bad: {model: gpt-4o-2024-08-06}\n") == (
        "providers.-bad: names use letters, digits, '.', '_' and '-', and start with a letter or digit",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("provders: {}", "config: unknown key 'provders' (did you mean 'providers'?)"),
        ("redis: {uri: x}", "redis: unknown key 'uri' (did you mean 'url'?)"),
        ("auth: {key: [a]}", "auth: unknown key 'key' (did you mean 'keys'?)"),
        ("auth: {keys: a}", "auth.keys: expected a list, got a string"),
        ("server: {prot: 1}", "server: unknown key 'prot' (did you mean 'port'?)"),
        ("server: {port: 70000}", "server.port: must be between 0 and 65535, got 70000"),
        ("server: {max_body_bytes: 0}", "server.max_body_bytes: must be a positive integer, got 0"),
        (
            "redis: {url: 'http://u:hunter2@h'}",
            "redis.url: expected a redis://, rediss://, unix:// or redis+sentinel:// URL, got 'http://u:***@h'",
        ),
        ("redis: [url]", "redis: expected a mapping, got a list"),
        ("redis: {max_connections: 0}", "redis.max_connections: must be between 1 and 10000, got 0"),
        ("redis: {breaker_timeouts: 0}", "redis.breaker_timeouts: must be between 1 and 1000, got 0"),
        ("server: {workers: 0}", "server.workers: must be between 1 and 512, got 0"),
    ],
)
def test_top_level_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert problems(tmp_path, text + "\n" + PROVIDERS) == (expected,)


def test_config_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- a\n- b\n") == ("config: expected a mapping, got a list",)


def test_every_problem_is_collected_at_once(tmp_path: Path) -> None:
    text = """
    server: {port: http}
    providers:
      a: {model: openai/gpt-4o-2024-08-06, api_key: "${OPENAI_API_KEY}", tmeout: {}}
      b: {model: anthropic/claude-sonnet-4-5-20250929, retries: 9}
    routes:
      default: [a, olama]
      coding: {first: a, on: {a: {default: b}, b: {timeout: a}}}
    """
    found = problems(tmp_path, text)
    assert found == (
        "server.port: expected an integer, got 'http'",
        "providers.a: unknown key 'tmeout' (did you mean 'timeout'?)",
        "providers.a.api_key: environment variable OPENAI_API_KEY is not set (write ${OPENAI_API_KEY:-} to allow it empty)",
        "providers.b.retries: must be between 0 and 5, got 9",
        "routes.default[1]: unknown provider 'olama' (expected one of: a, b)",
        "routes.coding: cycle a -> b -> a",
    )


def test_config_error_message_lists_problems() -> None:
    assert str(ConfigError(["x: bad"])) == "invalid config:\n  x: bad"
    assert str(ConfigError(["x: bad", "y: worse"])) == "invalid config (2 problems):\n  x: bad\n  y: worse"


# --- reading the file ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, {})
    assert caught.value.problems == (f"{missing}: file not found",)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    found = problems(tmp_path, "providers:\n  a: {model: x\n  b: [\n")
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'config.yaml'}: invalid YAML at line ")
    assert ", column " in found[0]


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    found = problems(tmp_path, "providers:\n  a: {model: gpt-4o-2024-08-06}\n  a: {model: gpt-4o-mini-2024-07-18}\n")
    assert found == (
        f"{tmp_path / 'config.yaml'}: invalid YAML at line 3, column 3: "
        "while constructing a mapping found duplicate key 'a'",
    )


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = """
    providers:
      a: &common {model: gpt-4o-2024-08-06, timeout: {total: 60}, retries: 1}
      b: {<<: *common, retries: 2}
    """
    b = load(tmp_path, text).providers["b"]
    assert (b.model, b.timeout.total, b.retries) == ("gpt-4o-2024-08-06", 60, 2)


# --- frozen objects and secrets -----------------------------------------------------------------------


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, with_routes("default: [a, b]").replace("a: {", "a: {headers: {X-A: '1'}, "))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.providers["a"].model = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes["default"].first = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.providers["z"] = config.providers["a"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.routes["default"].edges["a"]["default"] = "c"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.providers["a"].headers["X-A"] = "2"  # type: ignore[index]


def test_secrets_are_not_in_repr(tmp_path: Path) -> None:
    text = """
    redis: {url: "redis://:redispass@redis:6379/0"}
    auth: {keys: [clientkey]}
    server: {admin_key: adminkey}
    providers:
      a: {model: gpt-4o-2024-08-06, api_key: "${OPENAI_API_KEY}"}
    """
    config = load(tmp_path, text, {"OPENAI_API_KEY": "sk-providerkey"})
    assert config.providers["a"].api_key == "sk-providerkey"
    shown = repr(config)
    for secret in ("redispass", "clientkey", "adminkey", "sk-providerkey"):
        assert secret not in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@host", "rediss://user:***@host"),
        ("redis://host:6379?password=pw&db=1", "redis://host:6379?password=***&db=1"),
        ("redis://host:6379", "redis://host:6379"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --- model strings: wire format, api_base, pinning ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider", "upstream", "compatible", "api_base"),
    [
        ("openai/gpt-4o-2024-08-06", "openai", "gpt-4o-2024-08-06", True, "https://api.openai.com/v1"),
        ("gpt-4o-2024-08-06", "openai", "gpt-4o-2024-08-06", True, "https://api.openai.com/v1"),
        (
            "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "together_ai",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            True,
            "https://api.together.xyz/v1",
        ),
        ("groq/llama-3.3-70b-versatile", "groq", "llama-3.3-70b-versatile", True, "https://api.groq.com/openai/v1"),
        ("deepseek/deepseek-chat", "deepseek", "deepseek-chat", True, "https://api.deepseek.com/v1"),
        ("mistral/mistral-large-2411", "mistral", "mistral-large-2411", True, "https://api.mistral.ai/v1"),
        (
            "fireworks_ai/accounts/fireworks/models/llama-v3p1-8b-instruct",
            "fireworks_ai",
            "accounts/fireworks/models/llama-v3p1-8b-instruct",
            True,
            "https://api.fireworks.ai/inference/v1",
        ),
        (
            "openrouter/anthropic/claude-3.5-sonnet",
            "openrouter",
            "anthropic/claude-3.5-sonnet",
            True,
            "https://openrouter.ai/api/v1",
        ),
        ("xai/grok-2-1212", "xai", "grok-2-1212", True, "https://api.x.ai/v1"),
        ("lm_studio/qwen2.5-7b-instruct", "lm_studio", "qwen2.5-7b-instruct", True, "http://localhost:1234/v1"),
        ("anthropic/claude-sonnet-4-5-20250929", "anthropic", "claude-sonnet-4-5-20250929", False, None),
        ("gemini/gemini-2.0-flash-001", "gemini", "gemini-2.0-flash-001", False, None),
        ("ollama_chat/qwen2.5:7b", "ollama_chat", "qwen2.5:7b", False, "http://localhost:11434"),
        ("ollama/qwen2.5:7b", "ollama", "qwen2.5:7b", False, "http://localhost:11434"),
    ],
)
def test_model_string_resolution(
    tmp_path: Path, model: str, provider: str, upstream: str, compatible: bool, api_base: str | None
) -> None:
    config = load(tmp_path, f"providers:\n  p: {{model: '{model}'}}\n")
    p = config.providers["p"]
    assert (p.model, p.litellm_provider, p.upstream_model) == (model, provider, upstream)
    assert (p.openai_compatible, p.api_base) == (compatible, api_base)


def test_given_api_base_wins_and_loses_its_trailing_slash(tmp_path: Path) -> None:
    text = """
    providers:
      v: {model: hosted_vllm/llama-3.1-8b, api_base: 'http://gpu-box:8000/v1/'}
      o: {model: ollama_chat/qwen2.5:7b, api_base: 'http://ollama:11434', local: true}
    """
    config = load(tmp_path, text)
    assert (config.providers["v"].api_base, config.providers["v"].openai_compatible) == ("http://gpu-box:8000/v1", True)
    assert config.providers["o"].api_base == "http://ollama:11434"


@pytest.mark.parametrize(
    ("model", "warning"),
    [
        (
            "ollama_chat/qwen2.5",
            "providers.p.model: tag not pinned ('qwen2.5' resolves to :latest, which changes under you); write e.g. qwen2.5:7b",
        ),
        (
            "ollama/llama3.2:latest",
            "providers.p.model: tag not pinned ('llama3.2:latest' resolves to :latest, which changes under you); write e.g. llama3.2:7b",
        ),
        (
            "anthropic/claude-3-5-sonnet-latest",
            "providers.p.model: 'claude-3-5-sonnet-latest' is an alias that moves to new snapshots; pin a dated one",
        ),
    ],
)
def test_unpinned_models_warn(tmp_path: Path, model: str, warning: str) -> None:
    assert load(tmp_path, f"providers:\n  p: {{model: '{model}'}}\n").warnings == (warning,)


@pytest.mark.parametrize(
    "model",
    [
        "ollama_chat/qwen2.5:7b",
        "ollama_chat/hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        "openai/gpt-4o-2024-08-06",
        "bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0",
    ],
)
def test_pinned_models_do_not_warn(tmp_path: Path, model: str) -> None:
    assert load(tmp_path, f"providers:\n  p: {{model: '{model}'}}\n").warnings == ()


def test_an_unknown_provider_prefix_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "providers:\n  p: {model: 'anthropc/claude-sonnet-4-5-20250929'}\n")
    assert caught.value.problems == (
        "providers.p.model: unknown provider prefix 'anthropc' (did you mean 'anthropic'?)",
    )


def test_the_prefix_list_is_litellms() -> None:
    from proxy.config.litellm_providers import LITELLM_PROVIDERS
    from proxy.litellm_import import load_litellm

    assert {provider.value for provider in load_litellm().LlmProviders} == LITELLM_PROVIDERS


def test_the_model_limits_are_litellms_model_map() -> None:
    """`model_limits.LACKING` is what the installed litellm's map says models lack."""
    import importlib.util
    import os

    import orjson

    from proxy.config.model_info import CAPABILITY_FLAGS
    from proxy.config.model_limits import LACKING

    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None
    path = os.path.join(os.path.dirname(spec.origin), "model_prices_and_context_window_backup.json")
    with open(path, "rb") as file:
        models = orjson.loads(file.read())
    expected = {}
    for name, info in sorted(models.items()):
        if isinstance(info, dict):
            lacking = tuple(sorted(c for c, flag in CAPABILITY_FLAGS.items() if info.get(flag) is False))
            if lacking:
                expected[name] = lacking
    table = "\n".join(f"    {name!r}: {lacking!r}," for name, lacking in expected.items())
    assert dict(LACKING) == expected, f"litellm's map changed; the new table:\n{table}"


def test_capabilities_declared_win_over_the_model_map(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "providers:\n"
        "  a: {model: openai/gpt-4o-2024-08-06, capabilities: [tools]}\n"
        "  b: {model: openai/my-own-model, api_base: 'http://127.0.0.1:9/v1'}\n"
        "  c: {model: groq/llama-3.3-70b-versatile}\n",
    )
    assert config.providers["a"].capabilities == {"tools"}
    assert config.providers["b"].capabilities is None  # unknown to the map: nothing restricted
    assert config.providers["c"].capabilities == {"vision", "tools"}  # the map: no structured outputs


def test_continuation_forms(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "providers:\n"
        "  a: {model: anthropic/claude-sonnet-4-5-20250929}\n"
        "  b: {model: hosted_vllm/qwen, api_base: 'http://127.0.0.1:9/v1', continue_with: vllm}\n",
    )
    assert (config.providers["a"].continue_with, config.providers["b"].continue_with) == ("prefill", "vllm")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "providers:\n  a: {model: openai/gpt-4o-2024-08-06, continue_with: prefil}\n")
    assert caught.value.problems == ("providers.a.continue_with: unknown form 'prefil' (did you mean 'prefill'?)",)


def test_a_context_window_too_small_to_be_useful_is_flagged(tmp_path: Path) -> None:
    config = load(tmp_path, "providers:\n  p: {model: 'ollama_chat/qwen2.5:0.5b', context_window: 300}\n")
    assert config.warnings == (
        "providers.p.context_window: 300 tokens leave little room for a prompt and an answer "
        "(a request without max_tokens reserves a quarter of the window, 75 tokens, for the answer)",
    )


def test_open_proxy_on_a_public_interface_warns(tmp_path: Path) -> None:
    config = load(tmp_path, "server: {host: 0.0.0.0}\n" + PROVIDERS)
    assert config.warnings == (
        "auth: no keys and server.host '0.0.0.0' is not loopback: "
        "anyone who can reach port 8080 can spend your provider quotas",
    )
    assert load(tmp_path, "server: {host: '::1'}\n" + PROVIDERS).warnings == ()
    assert load(tmp_path, "server: {host: 0.0.0.0}\nauth: {keys: [k]}\n" + PROVIDERS).warnings == ()


def test_redis_pool_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "redis: {url: 'redis://r:6379/0', max_connections: 16, pool_wait_ms: 250, breaker_timeouts: 5}\n" + PROVIDERS
    )
    redis = load_config(path, environ={}).redis
    assert (redis.max_connections, redis.pool_wait, redis.breaker_timeouts) == (16, 0.25, 5)
    path.write_text("redis: {url: 'redis://r:6379/0'}\n" + PROVIDERS)
    redis = load_config(path, environ={}).redis
    assert (redis.max_connections, redis.pool_wait, redis.breaker_timeouts) == (64, 0.5, 3)  # documented defaults


def test_load_settings_and_their_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, PROVIDERS)
    assert (config.server.max_in_flight, config.limits.upstream_max_connections) == (4000, 0)
    assert config.health.loop_lag_seconds == 0.25
    assert all(p.max_connections == 0 and p.timeout.pool == 1.0 for p in config.providers.values())
    text = """
    server: {max_in_flight: 0}
    limits: {upstream_max_connections: 200}
    health: {loop_lag_seconds: 1.5}
    providers:
      a: {model: openai/gpt-4o-2024-08-06, max_connections: 4, timeout: {pool: 3}}
      b: {model: openai/gpt-4o-mini-2024-07-18}
      c: {model: openai/gpt-4o-mini-2024-07-18, max_connections: 0, timeout: {first_token: 1}}
    """
    config = load(tmp_path, text)
    assert (config.server.max_in_flight, config.health.loop_lag_seconds) == (0, 1.5)
    a, b, c = (config.providers[name] for name in "abc")
    assert (a.max_connections, a.timeout.pool) == (4, 3)
    assert (b.max_connections, b.timeout.pool) == (200, 1.0)  # the limits default
    assert (c.max_connections, c.timeout.pool) == (0, 0.5)  # unset pool: at most half the first-token deadline


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "providers:\n  p: {model: gpt-4o-2024-08-06, timeout: {pool: 30}}\n",
            "providers.p.timeout.pool: 30s must be shorter than first_token (30s)",
        ),
        (
            "providers:\n  p: {model: gpt-4o-2024-08-06, max_connections: -1}\n",
            "providers.p.max_connections: must be between 0 and 1000000, got -1",
        ),
        ("server: {max_in_flight: -5}\n" + PROVIDERS, "server.max_in_flight: expected a whole number >= 0, got -5"),
        (
            "limits: {upstream_max_connections: 1.5}\n" + PROVIDERS,
            "limits.upstream_max_connections: expected an integer, got 1.5",
        ),
        ("health: {loop_lag_seconds: 0}\n" + PROVIDERS, "health.loop_lag_seconds: must be a positive number, got 0"),
    ],
)
def test_bad_load_settings_name_their_key(tmp_path: Path, text: str, problem: str) -> None:
    assert problems(tmp_path, text) == (problem,)


def test_a_graph_may_route_the_proxys_own_saturation(tmp_path: Path) -> None:
    config = load(tmp_path, with_routes("g: {first: a, on: {a: {proxy_saturated: b, default: c}}}"))
    assert config.routes["g"].edges["a"]["proxy_saturated"] == "b"
