"""The small top-level sections: redis, health, quotas, limits, alerts, auth, server."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from typing import Final

from proxy.config.model import (
    ALERT_FORMATS,
    ALERT_KINDS,
    AlertSettings,
    HealthSettings,
    LimitSettings,
    RedisSettings,
    ServerConfig,
    WebhookSettings,
)
from proxy.config.values import (
    _BadValue,
    _boolean,
    _Context,
    _convert,
    _get,
    _http_url,
    _int_between,
    _integer,
    _items,
    _number,
    _opt,
    _positive_int,
    _positive_number,
    _redis_url,
    _section,
    _text,
    _unknown,
)
from proxy.state.urls import parse_cluster_url, url_count

_TOP_KEYS: Final = frozenset(
    {"redis", "auth", "server", "limits", "health", "quotas", "alerts", "providers", "routes", "telemetry"}
)
_SERVER_KEYS: Final = frozenset(
    {
        "host",
        "port",
        "max_body_bytes",
        "admin_key",
        "shutdown_grace_seconds",
        "reload_check_seconds",
        "workers",
        "max_in_flight",
    }
)
_DEFAULT_SERVER: Final = ServerConfig()


_REDIS_KEYS: Final = (
    "url",
    "prefix",
    "timeout_ms",
    "breaker_seconds",
    "max_connections",
    "pool_wait_ms",
    "breaker_timeouts",
    "cluster",
    "health_ttl_seconds",
)
_HEALTH_KEYS: Final = (
    "failure_threshold",
    "cooldown_seconds",
    "probe_interval_seconds",
    "probe_timeout_seconds",
    "slow_ttft_seconds",
    "loop_lag_seconds",
)


def _parse_redis(node: object, ctx: _Context) -> RedisSettings:
    section = _section(node, "redis", ctx, _REDIS_KEYS)
    default = RedisSettings()
    if section is None:
        return default
    timeout_ms = _opt(section, "timeout_ms", "redis", ctx, _positive_number)
    pool_wait_ms = _opt(section, "pool_wait_ms", "redis", ctx, _positive_number)
    url = _redis_urls(section.get("url"), ctx)
    cluster = _get(section, "cluster", "redis", ctx, _boolean, default.cluster)
    prefix = _get(section, "prefix", "redis", ctx, _text, default.prefix)
    _check_cluster(url, cluster, prefix, ctx)
    return RedisSettings(
        url=url,
        prefix=prefix,
        timeout=default.timeout if timeout_ms is None else timeout_ms / 1000,
        breaker_seconds=_get(section, "breaker_seconds", "redis", ctx, _positive_number, default.breaker_seconds),
        max_connections=_get(
            section, "max_connections", "redis", ctx, _int_between(1, 10_000), default.max_connections
        ),
        pool_wait=default.pool_wait if pool_wait_ms is None else pool_wait_ms / 1000,
        breaker_timeouts=_get(
            section, "breaker_timeouts", "redis", ctx, _int_between(1, 1000), default.breaker_timeouts
        ),
        cluster=cluster,
        health_ttl=_get(section, "health_ttl_seconds", "redis", ctx, _health_ttl, default.health_ttl),
    )


def _redis_urls(node: object, ctx: _Context) -> str | None:
    """`redis.url`: one URL, or a cluster's seed URLs as a list or comma-separated
    (kept comma-separated)."""
    if not isinstance(node, list):
        return _convert(node, "redis.url", ctx, _redis_url)
    urls = [_convert(item, path, ctx, _redis_url) for path, item in _items(node, "redis.url", ctx)]
    return ",".join(url for url in urls if url) or None


def _check_cluster(url: str | None, cluster: bool, prefix: str, ctx: _Context) -> None:
    """A cluster needs seed URLs it can use; several URLs need `cluster: true`."""
    if not cluster:
        if url is not None and url_count(url) > 1:
            ctx.error("redis.url", "several URLs are the seed nodes of a Redis Cluster: set redis.cluster: true")
        return
    if url is None:
        ctx.error("redis.cluster", "true needs redis.url: the URL of one or more of the cluster's nodes")
        return
    try:
        parse_cluster_url(url)
    except ValueError as exc:
        ctx.error("redis.url", str(exc))
    if "{" in prefix or "}" in prefix:
        ctx.error("redis.prefix", "must not contain { or } on a Redis Cluster: every key would share one hash slot")


def _health_ttl(value: object) -> float:
    seconds = _number(value)
    if seconds < 60:
        raise _BadValue(f"must be at least 60 (seconds; a record must outlive any cooldown), got {seconds:g}")
    return seconds


def _parse_health(node: object, ctx: _Context) -> HealthSettings:
    section = _section(node, "health", ctx, _HEALTH_KEYS)
    default = HealthSettings()
    if section is None:
        return default
    return HealthSettings(
        failure_threshold=_get(section, "failure_threshold", "health", ctx, _positive_int, default.failure_threshold),
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
        loop_lag_seconds=_get(section, "loop_lag_seconds", "health", ctx, _positive_number, default.loop_lag_seconds),
    )


def _parse_quotas(node: object, ctx: _Context) -> str:
    section = _section(node, "quotas", ctx, ("timezone",))
    if section is None:
        return "UTC"
    return _get(section, "timezone", "quotas", ctx, _timezone, "UTC")


_LIMIT_KEYS: Final = (
    "requests_per_minute",
    "concurrent_streams",
    "max_messages",
    "max_header_bytes",
    "client_write_timeout_seconds",
    "max_upstream_bytes",
    "upstream_max_connections",
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
        requests_per_minute=_get(
            section, "requests_per_minute", "limits", ctx, _non_negative_int, d.requests_per_minute
        ),
        concurrent_streams=_get(section, "concurrent_streams", "limits", ctx, _non_negative_int, d.concurrent_streams),
        max_messages=_get(section, "max_messages", "limits", ctx, _positive_int, d.max_messages),
        max_header_bytes=_get(section, "max_header_bytes", "limits", ctx, _positive_int, d.max_header_bytes),
        client_write_timeout_seconds=_get(
            section, "client_write_timeout_seconds", "limits", ctx, _positive_number, d.client_write_timeout_seconds
        ),
        max_upstream_bytes=_get(section, "max_upstream_bytes", "limits", ctx, _positive_int, d.max_upstream_bytes),
        upstream_max_connections=_get(
            section, "upstream_max_connections", "limits", ctx, _non_negative_int, d.upstream_max_connections
        ),
    )


_WEBHOOK_KEYS: Final = ("url", "format", "events", "chat_id", "timeout")


def _parse_alerts(node: object, ctx: _Context) -> AlertSettings:
    section = _section(node, "alerts", ctx, ("webhooks", "dedupe_seconds"))
    if section is None:
        return AlertSettings()
    hooks = [
        _parse_webhook(item, where, ctx) for where, item in _items(section.get("webhooks"), "alerts.webhooks", ctx)
    ]
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
        if m.get("url") is None:
            ctx.error(path, "missing required key 'url'")
        # else: given but empty after interpolation (`${ALERT_WEBHOOK_URL:-}` unset): this webhook is off,
        # as an empty entry of auth.keys is dropped.
        return None
    return WebhookSettings(
        url=url,
        format=fmt,
        events=frozenset(events) if m.get("events") is not None else ALERT_KINDS,
        chat_id=chat_id,
        timeout=_get(m, "timeout", path, ctx, _positive_number, 5.0),
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
        max_body_bytes=_get(section, "max_body_bytes", "server", ctx, _positive_int, default.max_body_bytes),
        admin_key=_opt(section, "admin_key", "server", ctx, _client_key),
        shutdown_grace_seconds=_get(
            section, "shutdown_grace_seconds", "server", ctx, _positive_number, default.shutdown_grace_seconds
        ),
        reload_check_seconds=_get(
            section, "reload_check_seconds", "server", ctx, _non_negative_number, default.reload_check_seconds
        ),
        workers=_get(section, "workers", "server", ctx, _int_between(1, 512), default.workers),
        max_in_flight=_get(section, "max_in_flight", "server", ctx, _non_negative_int, default.max_in_flight),
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
