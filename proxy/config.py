"""Load, interpolate and validate the YAML config into frozen, typed objects.

Two phases, as uvicorn does: the whole file is parsed and checked up front,
every problem is collected with the path of the key it is about
(``routes.default[2]: unknown provider 'olama'``), and only a config without
problems becomes a :class:`Config`. Nothing else in the proxy reads the
environment: ``${VAR}`` references are resolved here, against the ``environ``
mapping passed in (``os.environ`` by default).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import zoneinfo
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import yaml

from proxy.routing import find_cycle, reachable

FAILURE_CLASSES: Final[frozenset[str]] = frozenset(
    {
        "timeout", "connection_error", "rate_limited", "server_error", "auth_error",
        "context_window_exceeded", "content_filtered", "unhealthy", "quota_exhausted",
        "unsupported", "policy",
    }
)
EDGE_KEYS: Final[frozenset[str]] = FAILURE_CLASSES | {"default"}
CAPABILITIES: Final[frozenset[str]] = frozenset({"vision", "tools"})


class ConfigError(Exception):
    """Raised with every problem found; each names the key path it is about."""

    problems: tuple[str, ...]

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = "invalid config" if count == 1 else f"invalid config ({count} problems)"
        super().__init__("\n  ".join((head + ":", *self.problems)))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-attempt deadlines, in seconds."""

    connect: float = 5.0
    first_token: float = 30.0
    total: float = 300.0
    idle: float = 30.0  # max gap between stream chunks after the first token


@dataclass(frozen=True, slots=True)
class Quota:
    requests_per_day: int | None = None
    tokens_per_day: int | None = None


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    model: str  # the litellm model string as written
    litellm_provider: str  # the prefix before the first "/", "openai" when there is none
    upstream_model: str  # the part after the prefix, sent to the upstream
    openai_compatible: bool  # the OpenAI wire format can be relayed as is
    api_base: str | None  # as given, else the known default, else None
    api_key: str | None = field(default=None, repr=False)
    timeout: Timeouts = Timeouts()
    quota: Quota | None = None
    context_window: int | None = None
    capabilities: frozenset[str] | None = None  # None: not declared, every request may try it
    local: bool = False
    warmup: bool = False
    system_prompt: str | None = None
    retries: int = 0
    headers: Mapping[str, str] = field(default_factory=_no_headers)
    probe: bool = True  # active health probes allowed


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    first: str
    edges: Mapping[str, Mapping[str, str]]  # node -> {failure class or "default" -> next node}
    local_only: bool = False
    form: str = "chain"  # "chain" | "graph" | "provider"
    continuation: bool = True
    hedge_after_ms: int | None = None
    budget: float | None = None  # seconds for the whole walk


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    admin_key: str | None = field(default=None, repr=False)
    shutdown_grace_seconds: float = 30.0  # in-flight streams may finish this long after SIGTERM
    reload_check_seconds: float = 2.0  # how often the config file is checked for changes; 0 = never


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where shared state lives; ``url`` None means in-process state (one instance)."""

    url: str | None = field(default=None, repr=False)  # may hold a password
    prefix: str = "fp"
    timeout: float = 0.1  # seconds per Redis call before it counts as failed
    breaker_seconds: float = 2.0  # after a failure, Redis is not asked for this long


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """What one client may ask of the proxy; 0 turns a per-client limit off."""

    requests_per_minute: int = 0  # per client key, shared by replicas through the store
    concurrent_streams: int = 0  # per client key, shared by replicas through the store
    max_messages: int = 2000
    max_header_bytes: int = 32768
    client_write_timeout_seconds: float = 30.0  # a client that reads a stream slower than this is dropped
    max_upstream_bytes: int = 32 * 1024 * 1024  # a provider's answer larger than this is a failure


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Thresholds of the per-provider health state machine."""

    failure_threshold: int = 3  # consecutive failures that open a provider's breaker
    cooldown_seconds: float = 30.0  # how long an open breaker skips the provider before a trial
    probe_interval_seconds: float = 10.0  # active probes (free endpoints), 0 = off
    probe_timeout_seconds: float = 3.0
    slow_ttft_seconds: float = 10.0  # a provider whose time to first token averages above this is SLOW


ALERT_KINDS: Final[frozenset[str]] = frozenset({
    "failover", "breaker_open", "recovered", "quota_exhausted", "quota_fail_closed",
    "store_down", "store_up", "config_reload_failed",
})
ALERT_FORMATS: Final[frozenset[str]] = frozenset({"json", "slack", "telegram"})


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str = field(repr=False)  # may carry a token (Slack, Telegram)
    format: str = "json"
    events: frozenset[str] = ALERT_KINDS
    chat_id: str | None = None  # telegram
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Operator alerts: each event kind de-duplicated per provider within the window."""

    webhooks: tuple[WebhookSettings, ...] = ()
    dedupe_seconds: float = 300.0


_NO_EDGES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    routes: Mapping[str, Route]
    redis: RedisSettings = RedisSettings()
    auth_keys: tuple[str, ...] = field(default=(), repr=False)
    server: ServerConfig = ServerConfig()
    health: HealthSettings = HealthSettings()
    quota_timezone: str = "UTC"  # the day of daily quotas starts at midnight here
    alerts: AlertSettings = AlertSettings()
    limits: LimitSettings = LimitSettings()
    source: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def redis_url(self) -> str | None:
        return self.redis.url

    def route_for(self, model: str) -> Route | None:
        """The route named ``model``, a single-provider route, or None."""
        route = self.routes.get(model)
        if route is not None or model not in self.providers:
            return route
        return Route(name=model, first=model, edges=_NO_EDGES, form="provider")


# --- the public entry points ------------------------------------------------

CONFIG_PATH_VARIABLE: Final = "FALLBACK_PROXY_CONFIG"


def default_config_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The config file named by ``$FALLBACK_PROXY_CONFIG``, if any."""
    return (os.environ if environ is None else environ).get(CONFIG_PATH_VARIABLE) or None



def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate the YAML file at ``path``; raise ConfigError."""
    source = os.fspath(path)
    return parse_config(_read_yaml(source), environ, source=source)


def parse_config(
    data: object, environ: Mapping[str, str] | None = None, source: str | None = None
) -> Config:
    """Validate already-parsed YAML ``data``; raise ConfigError with every problem."""
    ctx = _Context(os.environ if environ is None else environ)
    top = _section(data, "", ctx, _TOP_KEYS)
    if top is None:
        raise ConfigError(ctx.errors)
    redis = _parse_redis(top.get("redis"), ctx)
    health = _parse_health(top.get("health"), ctx)
    quota_timezone = _parse_quotas(top.get("quotas"), ctx)
    alerts = _parse_alerts(top.get("alerts"), ctx)
    limits = _parse_limits(top.get("limits"), ctx)
    auth_keys = _parse_auth(top.get("auth"), ctx)
    server = _parse_server(top.get("server"), ctx)
    providers, scope = _parse_providers(top.get("providers"), top.get("routes"), ctx)
    routes = _parse_routes(top.get("routes"), providers, scope, ctx)
    _warn_if_open(auth_keys, server, ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return Config(
        providers=MappingProxyType(providers),
        routes=MappingProxyType(routes),
        redis=redis,
        health=health,
        quota_timezone=quota_timezone,
        alerts=alerts,
        limits=limits,
        auth_keys=auth_keys,
        server=server,
        source=source,
        warnings=tuple(ctx.warnings),
    )


def interpolate(value: str, environ: Mapping[str, str], path: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in ``value``; ``$${`` is a literal ``${``.

    Raises ConfigError naming ``path`` for each unset variable or bad reference.
    As in the shell, ``:-`` uses the default when the variable is unset or empty.
    """
    pieces: list[str] = []
    problems: list[str] = []
    end = 0
    for match in _REFERENCE.finditer(value):
        pieces.append(value[end : match.start()])
        end = match.end()
        text, problem = _substitute(match, environ)
        pieces.append(text)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    if problems:
        raise ConfigError(problems)
    pieces.append(value[end:])
    return "".join(pieces)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print or log."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


_REFERENCE: Final = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)\}|\$\{")
_REFERENCE_BODY: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_QUERY_PASSWORD: Final = re.compile(r"((?:^|&)password=)[^&]*")


def _substitute(match: re.Match[str], environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The text for one reference, and the problem with it if there is one."""
    if match.group(0) == "$${":
        return "${", None
    body = match.group("body")
    if body is None:
        return "", "unterminated '${' (write '$${' for a literal '${')"
    ref = _REFERENCE_BODY.fullmatch(body)
    if ref is None or "${" in (ref.group(2) or ""):
        return "", f"invalid reference '${{{body}}}' (expected ${{NAME}} or ${{NAME:-default}})"
    name, default = ref.group(1), ref.group(2)
    value = environ.get(name)
    if default is not None:
        return (value or default), None
    if value is None:
        return "", f"environment variable {name} is not set (write ${{{name}:-}} to allow it empty)"
    return value, None


# --- reading YAML -------------------------------------------------------------

_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_YAML_1_2_BOOL: Final = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _yaml_1_2_booleans(
    resolvers: Mapping[Any, list[tuple[str, re.Pattern[str]]]],
) -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    return {
        first: [(tag, _YAML_1_2_BOOL if tag == _BOOL_TAG else regexp) for tag, regexp in entries]
        for first, entries in resolvers.items()
    }


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys and reads only true/false as booleans.

    PyYAML lets a repeated key silently win, and (YAML 1.1) reads ``on``, ``yes``
    and ``off`` as booleans, which would turn a route's ``on:`` into ``True:``.
    """

    yaml_implicit_resolvers = _yaml_1_2_booleans(yaml.SafeLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _read_yaml(source: str) -> object:
    try:
        with open(source, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(source, exc)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from exc


def _yaml_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    return f"{source}: invalid YAML{where}: {what}"


# --- the validation toolkit -----------------------------------------------------

T = TypeVar("T")


@dataclass(slots=True)
class _Context:
    """Problems and warnings collected during one parse."""

    environ: Mapping[str, str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or 'config'}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")


class _BadValue(ValueError):
    """A value of the wrong type or out of range; the message says what was expected."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping" if isinstance(value, Mapping) else type(value).__name__


def _unknown(kind: str, name: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    if close:
        return f"unknown {kind} {name!r} (did you mean {close[0]!r}?)"
    if choices and len(choices) <= 12:
        return f"unknown {kind} {name!r} (expected one of: {', '.join(sorted(choices))})"
    return f"unknown {kind} {name!r}"


def _section(
    node: object, path: str, ctx: _Context, allowed: Collection[str] | None
) -> dict[str, object] | None:
    """``node`` as a mapping with string keys (null reads as empty), or None after an error.

    With ``allowed``, other keys are reported with a suggestion and left out.
    """
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        ctx.error(path, f"expected a mapping, got {_kind(node)}")
        return None
    out: dict[str, object] = {}
    for key, value in node.items():
        if key is True and allowed is not None and "on" in allowed:
            key = "on"  # data from yaml.safe_load, which reads the key `on` as True
        if not isinstance(key, str):
            ctx.error(path, f"key {key!r} must be a string")
        elif allowed is not None and key not in allowed:
            ctx.error(path, _unknown("key", key, allowed))
        else:
            out[key] = value
    return out


def _items(node: object, path: str, ctx: _Context) -> list[tuple[str, object]]:
    """``node``'s items, each with its path; null reads as empty."""
    if node is None:
        return []
    if not isinstance(node, list):
        ctx.error(path, f"expected a list, got {_kind(node)}")
        return []
    return [(f"{path}[{index}]", item) for index, item in enumerate(node)]


def _expand(raw: object, path: str, ctx: _Context) -> object | None:
    """``raw`` with strings interpolated; None after an error."""
    if not isinstance(raw, str):
        return raw
    try:
        return interpolate(raw, ctx.environ, path)
    except ConfigError as exc:
        ctx.errors.extend(exc.problems)
        return None


def _convert(raw: object, path: str, ctx: _Context, convert: Callable[[object], T]) -> T | None:
    """``raw`` interpolated and converted; None when null, empty, or invalid (recorded)."""
    value = _expand(raw, path, ctx)
    if value is None or value == "":
        return None
    try:
        return convert(value)
    except _BadValue as exc:
        ctx.error(path, str(exc))
        return None


def _opt(
    m: Mapping[str, object], key: str, path: str, ctx: _Context, convert: Callable[[object], T]
) -> T | None:
    return _convert(m.get(key), _join(path, key), ctx, convert)


def _get(
    m: Mapping[str, object],
    key: str,
    path: str,
    ctx: _Context,
    convert: Callable[[object], T],
    default: T,
) -> T:
    value = _opt(m, key, path, ctx, convert)
    return default if value is None else value


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _BadValue(f"expected a string, got {_kind(value)}")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _BadValue(f"expected true or false, got {value!r}")


_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


def _integer(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _BadValue(f"expected an integer, got {value!r}")


def _number(value: object) -> float:
    result: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            pass
    if result is None or not math.isfinite(result):
        raise _BadValue(f"expected a number, got {value!r}")
    return result


def _positive_int(value: object) -> int:
    result = _integer(value)
    if result <= 0:
        raise _BadValue(f"must be a positive integer, got {result}")
    return result


def _positive_number(value: object) -> float:
    result = _number(value)
    if result <= 0:
        raise _BadValue(f"must be a positive number, got {result:g}")
    return result


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        result = _integer(value)
        if not low <= result <= high:
            raise _BadValue(f"must be between {low} and {high}, got {result}")
        return result

    return convert


def _required_text(m: Mapping[str, object], key: str, path: str, ctx: _Context) -> str | None:
    if m.get(key) is None:
        ctx.error(path, f"missing required key {key!r}")
        return None
    errors = len(ctx.errors)
    value = _opt(m, key, path, ctx, _text)
    if value is None and len(ctx.errors) == errors:
        ctx.error(_join(path, key), "must not be empty")
    return value


def _http_url(value: object) -> str:
    url = _text(value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _BadValue(f"expected an http:// or https:// URL, got {url!r}")
    return url


def _redis_url(value: object) -> str:
    url = _text(value)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix", "redis+sentinel"):
        raise _BadValue(
            f"expected a redis://, rediss://, unix:// or redis+sentinel:// URL, got {redact_url(url)!r}"
        )
    return url


# --- the sections ----------------------------------------------------------------

_TOP_KEYS: Final = frozenset(
    {"redis", "auth", "server", "limits", "health", "quotas", "alerts", "providers", "routes"}
)
_SERVER_KEYS: Final = frozenset(
    {"host", "port", "max_body_bytes", "admin_key", "shutdown_grace_seconds", "reload_check_seconds"}
)
_DEFAULT_SERVER: Final = ServerConfig()


_REDIS_KEYS: Final = ("url", "prefix", "timeout_ms", "breaker_seconds")
_HEALTH_KEYS: Final = (
    "failure_threshold", "cooldown_seconds", "probe_interval_seconds", "probe_timeout_seconds", "slow_ttft_seconds",
)


def _parse_redis(node: object, ctx: _Context) -> RedisSettings:
    section = _section(node, "redis", ctx, _REDIS_KEYS)
    default = RedisSettings()
    if section is None:
        return default
    timeout_ms = _opt(section, "timeout_ms", "redis", ctx, _positive_number)
    return RedisSettings(
        url=_opt(section, "url", "redis", ctx, _redis_url),
        prefix=_get(section, "prefix", "redis", ctx, _text, default.prefix),
        timeout=default.timeout if timeout_ms is None else timeout_ms / 1000,
        breaker_seconds=_get(section, "breaker_seconds", "redis", ctx, _positive_number, default.breaker_seconds),
    )


def _parse_health(node: object, ctx: _Context) -> HealthSettings:
    section = _section(node, "health", ctx, _HEALTH_KEYS)
    default = HealthSettings()
    if section is None:
        return default
    return HealthSettings(
        failure_threshold=_get(
            section, "failure_threshold", "health", ctx, _positive_int, default.failure_threshold
        ),
        cooldown_seconds=_get(section, "cooldown_seconds", "health", ctx, _positive_number, default.cooldown_seconds),
        probe_interval_seconds=_get(
            section, "probe_interval_seconds", "health", ctx, _non_negative_number, default.probe_interval_seconds
        ),
        probe_timeout_seconds=_get(
            section, "probe_timeout_seconds", "health", ctx, _positive_number, default.probe_timeout_seconds
        ),
        slow_ttft_seconds=_get(
            section, "slow_ttft_seconds", "health", ctx, _positive_number, default.slow_ttft_seconds
        ),
    )


def _parse_quotas(node: object, ctx: _Context) -> str:
    section = _section(node, "quotas", ctx, ("timezone",))
    if section is None:
        return "UTC"
    return _get(section, "timezone", "quotas", ctx, _timezone, "UTC")


_LIMIT_KEYS: Final = (
    "requests_per_minute", "concurrent_streams", "max_messages", "max_header_bytes",
    "client_write_timeout_seconds", "max_upstream_bytes",
)


def _non_negative_int(value: object) -> int:
    number = _integer(value)
    if number < 0:
        raise _BadValue(f"expected a whole number >= 0, got {number}")
    return number


def _parse_limits(node: object, ctx: _Context) -> LimitSettings:
    section = _section(node, "limits", ctx, _LIMIT_KEYS)
    d = LimitSettings()
    if section is None:
        return d
    return LimitSettings(
        requests_per_minute=_get(section, "requests_per_minute", "limits", ctx, _non_negative_int,
                                 d.requests_per_minute),
        concurrent_streams=_get(section, "concurrent_streams", "limits", ctx, _non_negative_int,
                                d.concurrent_streams),
        max_messages=_get(section, "max_messages", "limits", ctx, _positive_int, d.max_messages),
        max_header_bytes=_get(section, "max_header_bytes", "limits", ctx, _positive_int, d.max_header_bytes),
        client_write_timeout_seconds=_get(section, "client_write_timeout_seconds", "limits", ctx,
                                          _positive_number, d.client_write_timeout_seconds),
        max_upstream_bytes=_get(section, "max_upstream_bytes", "limits", ctx, _positive_int, d.max_upstream_bytes),
    )


_WEBHOOK_KEYS: Final = ("url", "format", "events", "chat_id", "timeout")


def _parse_alerts(node: object, ctx: _Context) -> AlertSettings:
    section = _section(node, "alerts", ctx, ("webhooks", "dedupe_seconds"))
    if section is None:
        return AlertSettings()
    hooks = [_parse_webhook(item, where, ctx) for where, item in _items(section.get("webhooks"), "alerts.webhooks", ctx)]
    return AlertSettings(
        webhooks=tuple(hook for hook in hooks if hook is not None),
        dedupe_seconds=_get(section, "dedupe_seconds", "alerts", ctx, _non_negative_number, 300.0),
    )


def _parse_webhook(node: object, path: str, ctx: _Context) -> WebhookSettings | None:
    m = _section(node, path, ctx, _WEBHOOK_KEYS)
    if m is None:
        return None
    url = _opt(m, "url", path, ctx, _http_url)
    fmt = _get(m, "format", path, ctx, _text, "json")
    if fmt not in ALERT_FORMATS:
        ctx.error(f"{path}.format", _unknown("format", fmt, ALERT_FORMATS))
    events: set[str] = set()
    for where, item in _items(m.get("events"), f"{path}.events", ctx):
        kind = _convert(item, where, ctx, _text)
        if kind in ALERT_KINDS:
            events.add(kind)
        elif kind is not None:
            ctx.error(where, _unknown("event kind", kind, ALERT_KINDS))
    chat_id = _opt(m, "chat_id", path, ctx, _text)
    if fmt == "telegram" and chat_id is None:
        ctx.error(path, "a telegram webhook needs chat_id")
    if url is None:
        ctx.error(path, "missing required key 'url'")
        return None
    return WebhookSettings(
        url=url, format=fmt, events=frozenset(events) if m.get("events") is not None else ALERT_KINDS,
        chat_id=chat_id, timeout=_get(m, "timeout", path, ctx, _positive_number, 5.0),
    )


def _timezone(value: object) -> str:
    name = _text(value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise _BadValue(f"unknown time zone {name!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from exc
    return name


def _non_negative_number(value: object) -> float:
    number = _number(value)
    if number < 0:
        raise _BadValue(f"expected a number >= 0, got {number:g}")
    return number


def _parse_auth(node: object, ctx: _Context) -> tuple[str, ...]:
    section = _section(node, "auth", ctx, ("keys",))
    if section is None:
        return ()
    items = _items(section.get("keys"), "auth.keys", ctx)
    keys = (_convert(item, where, ctx, _client_key) for where, item in items)
    return tuple(dict.fromkeys(key for key in keys if key))  # empty keys are dropped


_SHA256_KEY: Final = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _client_key(value: object) -> str:
    """A key as clients send it, or its SHA-256 as `sha256:<64 hex digits>`."""
    key = _text(value)
    if key.startswith("sha256:") and not _SHA256_KEY.fullmatch(key):
        raise _BadValue("a hashed key is 'sha256:' followed by 64 hex digits (sha256sum of the key)")
    return key


def _parse_server(node: object, ctx: _Context) -> ServerConfig:
    section = _section(node, "server", ctx, _SERVER_KEYS)
    if section is None:
        return _DEFAULT_SERVER
    default = _DEFAULT_SERVER
    return ServerConfig(
        host=_get(section, "host", "server", ctx, _text, default.host),
        port=_get(section, "port", "server", ctx, _int_between(0, 65535), default.port),
        max_body_bytes=_get(
            section, "max_body_bytes", "server", ctx, _positive_int, default.max_body_bytes
        ),
        admin_key=_opt(section, "admin_key", "server", ctx, _client_key),
        shutdown_grace_seconds=_get(
            section, "shutdown_grace_seconds", "server", ctx, _positive_number, default.shutdown_grace_seconds
        ),
        reload_check_seconds=_get(
            section, "reload_check_seconds", "server", ctx, _non_negative_number, default.reload_check_seconds
        ),
    )


def _warn_if_open(auth_keys: tuple[str, ...], server: ServerConfig, ctx: _Context) -> None:
    if auth_keys or _is_loopback(server.host):
        return
    ctx.warn(
        "auth",
        f"no keys and server.host {server.host!r} is not loopback: "
        f"anyone who can reach port {server.port} can spend your provider quotas",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- providers ------------------------------------------------------------------------

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PROVIDER_KEYS: Final = frozenset(
    {
        "model", "api_key", "api_base", "timeout", "quota", "context_window", "capabilities",
        "local", "warmup", "probe", "system_prompt", "retries", "headers",
    }
)
_TIMEOUT_KEYS: Final = ("connect", "first_token", "total", "idle")
_QUOTA_KEYS: Final = ("requests_per_day", "tokens_per_day")
_DEFAULT_TIMEOUTS: Final = Timeouts()

# litellm providers whose wire format is OpenAI's, so requests are relayed as is.
_OPENAI_COMPATIBLE: Final = frozenset(
    {
        "openai", "together_ai", "groq", "deepseek", "mistral", "fireworks_ai", "openrouter", "xai",
        "hosted_vllm", "lm_studio", "llamafile",
    }
)
_API_BASE_REQUIRED: Final = frozenset({"hosted_vllm", "llamafile"})
_LOCAL_BY_DEFAULT: Final = frozenset({"ollama", "ollama_chat", "lm_studio"})
_DEFAULT_API_BASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "openai": "https://api.openai.com/v1",
        "together_ai": "https://api.together.xyz/v1",
        "groq": "https://api.groq.com/openai/v1",
        "deepseek": "https://api.deepseek.com/v1",
        "mistral": "https://api.mistral.ai/v1",
        "fireworks_ai": "https://api.fireworks.ai/inference/v1",
        "openrouter": "https://openrouter.ai/api/v1",
        "xai": "https://api.x.ai/v1",
        "lm_studio": "http://localhost:1234/v1",
        "ollama": "http://localhost:11434",
        "ollama_chat": "http://localhost:11434",
    }
)
# Common litellm prefixes, only to catch typos such as "olama_chat/".
_KNOWN_PREFIXES: Final = _OPENAI_COMPATIBLE | frozenset(
    {
        "anthropic", "azure", "azure_ai", "bedrock", "cerebras", "cohere", "deepinfra", "gemini",
        "huggingface", "ollama", "ollama_chat", "perplexity", "vertex_ai", "watsonx",
    }
)


@dataclass(frozen=True, slots=True)
class _Scope:
    """The names a route may refer to, and the names it must not be."""

    providers: frozenset[str]
    routes: frozenset[str]


def _parse_providers(
    node: object, routes_node: object, ctx: _Context
) -> tuple[dict[str, ProviderConfig], _Scope]:
    section = _section(node, "providers", ctx, None)
    if section == {}:
        ctx.error("providers", "at least one provider is required")
    section = section or {}
    providers: dict[str, ProviderConfig] = {}
    for name, body in section.items():
        path = f"providers.{name}"
        if not _valid_name(name, path, ctx):
            continue
        provider = _parse_provider(name, body, path, ctx)
        if provider is not None:
            providers[name] = provider
    route_names = routes_node.keys() if isinstance(routes_node, Mapping) else ()
    scope = _Scope(
        providers=frozenset(name for name in section if _NAME.fullmatch(name)),
        routes=frozenset(name for name in route_names if isinstance(name, str)),
    )
    return providers, scope


def _valid_name(name: str, path: str, ctx: _Context) -> bool:
    if _NAME.fullmatch(name):
        return True
    ctx.error(path, "names use letters, digits, '.', '_' and '-', and start with a letter or digit")
    return False


def _parse_provider(name: str, node: object, path: str, ctx: _Context) -> ProviderConfig | None:
    m = _section(node, path, ctx, _PROVIDER_KEYS)
    if m is None:
        return None
    model = _required_text(m, "model", path, ctx)
    provider = ProviderConfig(
        name=name,
        model=model or "",
        litellm_provider="",  # the model-derived fields are filled in by _with_target
        upstream_model="",
        openai_compatible=False,
        api_base=_opt(m, "api_base", path, ctx, _http_url),
        api_key=_opt(m, "api_key", path, ctx, _text),
        timeout=_parse_timeouts(m.get("timeout"), f"{path}.timeout", ctx),
        quota=_parse_quota(m.get("quota"), f"{path}.quota", ctx),
        context_window=_opt(m, "context_window", path, ctx, _positive_int),
        capabilities=_parse_capabilities(m.get("capabilities"), f"{path}.capabilities", ctx),
        local=_get(m, "local", path, ctx, _boolean, False),
        warmup=_get(m, "warmup", path, ctx, _boolean, False),
        system_prompt=_opt(m, "system_prompt", path, ctx, _text),
        retries=_get(m, "retries", path, ctx, _int_between(0, 5), 0),
        headers=_parse_headers(m.get("headers"), f"{path}.headers", ctx),
        probe=_get(m, "probe", path, ctx, _boolean, True),
    )
    return None if model is None else _with_target(provider, path, ctx)


def _with_target(provider: ProviderConfig, path: str, ctx: _Context) -> ProviderConfig | None:
    """``provider`` with the fields derived from its model string filled in."""
    prefix, slash, upstream = provider.model.partition("/")
    if not slash:
        prefix, upstream = "openai", provider.model
    if not prefix or not upstream:
        ctx.error(f"{path}.model", "expected 'provider/model', e.g. openai/gpt-4o-2024-08-06")
        return None
    _warn_about_model(prefix, upstream, f"{path}.model", ctx)
    return replace(
        provider,
        litellm_provider=prefix,
        upstream_model=upstream,
        openai_compatible=prefix in _OPENAI_COMPATIBLE,
        api_base=_api_base(provider, prefix, path, ctx),
    )


def _api_base(provider: ProviderConfig, prefix: str, path: str, ctx: _Context) -> str | None:
    if provider.api_base is not None:
        return provider.api_base
    where = f"{path}.api_base"
    if prefix in _API_BASE_REQUIRED:
        ctx.error(where, f"required for {prefix} models (the address of your server)")
    elif provider.local and prefix not in _LOCAL_BY_DEFAULT:
        ctx.error(
            where, "required for a local provider (the address of the server on your hardware)"
        )
    return _DEFAULT_API_BASES.get(prefix)


def _warn_about_model(prefix: str, upstream: str, path: str, ctx: _Context) -> None:
    if prefix in ("ollama", "ollama_chat"):
        base, colon, tag = upstream.rpartition(":")
        if not colon or "/" in tag:
            base, tag = upstream, ""
        if tag in ("", "latest"):
            ctx.warn(
                path,
                f"tag not pinned ({upstream!r} resolves to :latest, which changes under you); "
                f"write e.g. {base}:7b",
            )
    elif upstream.endswith("-latest"):
        ctx.warn(path, f"{upstream!r} is an alias that moves to new snapshots; pin a dated one")
    if prefix not in _KNOWN_PREFIXES and difflib.get_close_matches(prefix, _KNOWN_PREFIXES, n=1):
        ctx.warn(path, _unknown("litellm provider", prefix, _KNOWN_PREFIXES))


def _parse_timeouts(node: object, path: str, ctx: _Context) -> Timeouts:
    section = _section(node, path, ctx, _TIMEOUT_KEYS)
    if not section:
        return _DEFAULT_TIMEOUTS
    given = {key: _opt(section, key, path, ctx, _positive_number) for key in _TIMEOUT_KEYS}
    total = given["total"] or _DEFAULT_TIMEOUTS.total
    for key in ("connect", "first_token"):
        value = given[key]
        if value is not None and value > total:
            ctx.error(f"{path}.{key}", f"{value:g}s must not exceed total ({total:g}s)")
    # Unset deadlines default to at most the total, so setting only `total` is enough.
    return Timeouts(
        connect=given["connect"] or min(_DEFAULT_TIMEOUTS.connect, total),
        first_token=given["first_token"] or min(_DEFAULT_TIMEOUTS.first_token, total),
        total=total,
        idle=given["idle"] or min(_DEFAULT_TIMEOUTS.idle, total),
    )


def _parse_quota(node: object, path: str, ctx: _Context) -> Quota | None:
    section = _section(node, path, ctx, _QUOTA_KEYS)
    if not section:
        return None
    requests = _opt(section, "requests_per_day", path, ctx, _positive_int)
    tokens = _opt(section, "tokens_per_day", path, ctx, _positive_int)
    return None if requests is None and tokens is None else Quota(requests, tokens)


def _parse_capabilities(node: object, path: str, ctx: _Context) -> frozenset[str] | None:
    if node is None:
        return None
    found: set[str] = set()
    for where, item in _items(node, path, ctx):
        name = _convert(item, where, ctx, _text)
        if name in CAPABILITIES:
            found.add(name)
        elif name is not None:
            ctx.error(where, _unknown("capability", name, CAPABILITIES))
    return frozenset(found)


def _parse_headers(node: object, path: str, ctx: _Context) -> Mapping[str, str]:
    headers: dict[str, str] = {}
    for name, raw in (_section(node, path, ctx, None) or {}).items():
        if not _HEADER_NAME.fullmatch(name):
            ctx.error(path, f"{name!r} is not a valid header name")
            continue
        value = _convert(raw, f"{path}.{name}", ctx, _text)
        if value:  # empty after interpolation: leave the header out
            headers[name] = value
    return MappingProxyType(headers)


# --- routes -------------------------------------------------------------------------------

_ROUTE_KEYS: Final = frozenset(
    {"chain", "first", "on", "local_only", "continuation", "hedge_after_ms", "budget"}
)
_Edges = dict[str, dict[str, str]]


def _parse_routes(
    node: object, providers: Mapping[str, ProviderConfig], scope: _Scope, ctx: _Context
) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for name, body in (_section(node, "routes", ctx, None) or {}).items():
        path = f"routes.{name}"
        if not _valid_name(name, path, ctx):
            continue
        if name in scope.providers:
            ambiguous = f"the model {name!r} would be ambiguous"
            ctx.error(path, f"a provider has the same name, so {ambiguous}")
        route = _parse_route(name, body, path, scope, ctx)
        if route is not None and _route_is_sound(route, path, providers, ctx):
            routes[name] = route
    return routes


def _parse_route(name: str, node: object, path: str, scope: _Scope, ctx: _Context) -> Route | None:
    if isinstance(node, list):
        chain = _chain(node, path, scope, ctx)
        return None if chain is None else Route(name=name, first=chain[0], edges=_freeze(chain[1]))
    if not isinstance(node, Mapping):
        ctx.error(
            path,
            "expected a list of providers (a chain), or a mapping with chain: or first:/on:",
        )
        return None
    m = _section(node, path, ctx, _ROUTE_KEYS)
    shape = None if m is None else _route_shape(m, path, scope, ctx)
    if m is None or shape is None:
        return None
    first, edges, form = shape
    return Route(
        name=name,
        first=first,
        edges=_freeze(edges),
        form=form,
        local_only=_get(m, "local_only", path, ctx, _boolean, False),
        continuation=_get(m, "continuation", path, ctx, _boolean, True),
        hedge_after_ms=_opt(m, "hedge_after_ms", path, ctx, _positive_int),
        budget=_opt(m, "budget", path, ctx, _positive_number),
    )


def _route_shape(
    m: Mapping[str, object], path: str, scope: _Scope, ctx: _Context
) -> tuple[str, _Edges, str] | None:
    """``(first, edges, form)`` from a route mapping, or None after an error."""
    if "chain" in m and ("first" in m or "on" in m):
        ctx.error(path, "use either chain: or first:/on:, not both")
        return None
    if "chain" in m:
        chain = m["chain"]
        if not isinstance(chain, list):
            ctx.error(f"{path}.chain", f"expected a list of providers, got {_kind(chain)}")
            return None
        parsed = _chain(chain, f"{path}.chain", scope, ctx)
        return None if parsed is None else (*parsed, "chain")
    if "first" not in m:
        ctx.error(path, "needs chain: [...] or first: with on: {...}")
        return None
    return _graph(m, path, scope, ctx)


def _chain(
    items: list[object], path: str, scope: _Scope, ctx: _Context
) -> tuple[str, _Edges] | None:
    """A chain's first node and default edges, or None after an error (reported)."""
    if not items:
        ctx.error(path, "chain is empty")
        return None
    errors = len(ctx.errors)
    nodes: list[str] = []
    for where, item in _items(items, path, ctx):
        name = _reference(item, where, scope, ctx)
        if name in nodes:
            why = "a request visits each provider at most once"
            ctx.error(where, f"{name!r} appears twice ({why})")
        elif name is not None:
            nodes.append(name)
    if len(ctx.errors) > errors:
        return None
    return nodes[0], {node: {"default": target} for node, target in zip(nodes, nodes[1:])}


def _graph(
    m: Mapping[str, object], path: str, scope: _Scope, ctx: _Context
) -> tuple[str, _Edges, str] | None:
    errors = len(ctx.errors)
    first = _reference(m["first"], f"{path}.first", scope, ctx)
    edges: _Edges = {}
    on = _section(m.get("on"), f"{path}.on", ctx, None) or {}
    for node, out in on.items():
        if node not in scope.providers:
            ctx.error(f"{path}.on", _unknown("provider", node, scope.providers))
            continue
        edges[node] = _edge_map(out, f"{path}.on.{node}", scope, ctx)
    if first is None or len(ctx.errors) > errors:
        return None
    return first, edges, "graph"


def _edge_map(node: object, path: str, scope: _Scope, ctx: _Context) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in (_section(node, path, ctx, None) or {}).items():
        if key not in EDGE_KEYS:
            ctx.error(path, _unknown("failure class", key, EDGE_KEYS))
            continue
        target = _reference(raw, f"{path}.{key}", scope, ctx)
        if target is not None:
            out[key] = target
    return out


def _reference(raw: object, path: str, scope: _Scope, ctx: _Context) -> str | None:
    """The provider named by ``raw``, or None after an error (reported)."""
    errors = len(ctx.errors)
    name = _convert(raw, path, ctx, _text)
    if name is None:
        if len(ctx.errors) == errors:
            ctx.error(path, "expected a provider name")
        return None
    if name in scope.providers:
        return name
    if name in scope.routes:
        ctx.error(path, f"{name!r} is a route; a route's nodes must be providers")
    else:
        ctx.error(path, _unknown("provider", name, scope.providers))
    return None


def _freeze(edges: _Edges) -> Mapping[str, Mapping[str, str]]:
    return MappingProxyType({node: MappingProxyType(out) for node, out in edges.items()})


def _route_is_sound(
    route: Route, path: str, providers: Mapping[str, ProviderConfig], ctx: _Context
) -> bool:
    """Check the walk: no cycle, every edge source reachable, local_only kept."""
    errors = len(ctx.errors)
    cycle = find_cycle(route.first, route.edges)
    if cycle is not None:
        ctx.error(path, "cycle " + " -> ".join(cycle))
    walk = reachable(route)
    for node in route.edges:
        if node not in walk:
            message = f"not reachable from first {route.first!r}; no edge leads here"
            ctx.error(f"{path}.on.{node}", message)
    for node in walk if route.local_only else ():
        provider = providers.get(node)
        if provider is not None and not provider.local:
            ctx.error(path, f"local_only route reaches non-local provider {node!r}")
    return len(ctx.errors) == errors
