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
    BadValue,
    Context,
    boolean,
    get,
    http_url,
    int_between,
    integer,
    kind_of,
    number,
    opt,
    positive_int,
    positive_number,
    read_items,
    read_section,
    read_value,
    redis_url,
    text,
    unknown,
)
from proxy.state.urls import parse_cluster_url, url_count

TOP_KEYS: Final = frozenset(
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
        "cors_origins",
    }
)
_DEFAULT_SERVER: Final = ServerConfig()
_ORIGIN: Final = re.compile(r"https?://[^/\s?#]+")


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


def parse_redis(node: object, ctx: Context) -> RedisSettings:
    section = read_section(node, "redis", ctx, _REDIS_KEYS)
    default = RedisSettings()
    if section is None:
        return default
    timeout_ms = opt(section, "timeout_ms", "redis", ctx, positive_number)
    pool_wait_ms = opt(section, "pool_wait_ms", "redis", ctx, positive_number)
    url = _redis_urls(section.get("url"), ctx)
    cluster = get(section, "cluster", "redis", ctx, boolean, default.cluster)
    prefix = get(section, "prefix", "redis", ctx, text, default.prefix)
    _check_cluster(url, cluster, prefix, ctx)
    return RedisSettings(
        url=url,
        prefix=prefix,
        timeout=default.timeout if timeout_ms is None else timeout_ms / 1000,
        breaker_seconds=get(section, "breaker_seconds", "redis", ctx, positive_number, default.breaker_seconds),
        max_connections=get(section, "max_connections", "redis", ctx, int_between(1, 10_000), default.max_connections),
        pool_wait=default.pool_wait if pool_wait_ms is None else pool_wait_ms / 1000,
        breaker_timeouts=get(section, "breaker_timeouts", "redis", ctx, int_between(1, 1000), default.breaker_timeouts),
        cluster=cluster,
        health_ttl=get(section, "health_ttl_seconds", "redis", ctx, _health_ttl, default.health_ttl),
    )


def _redis_urls(node: object, ctx: Context) -> str | None:
    """`redis.url`: one URL, or a cluster's seed URLs as a list or comma-separated
    (kept comma-separated)."""
    if not isinstance(node, list):
        return read_value(node, "redis.url", ctx, redis_url)
    urls = [read_value(item, path, ctx, redis_url) for path, item in read_items(node, "redis.url", ctx)]
    return ",".join(url for url in urls if url) or None


def _check_cluster(url: str | None, cluster: bool, prefix: str, ctx: Context) -> None:
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
    seconds = number(value)
    if seconds < 60:
        raise BadValue(f"must be at least 60 (seconds; a record must outlive any cooldown), got {seconds:g}")
    return seconds


def parse_health(node: object, ctx: Context) -> HealthSettings:
    section = read_section(node, "health", ctx, _HEALTH_KEYS)
    default = HealthSettings()
    if section is None:
        return default
    return HealthSettings(
        failure_threshold=get(section, "failure_threshold", "health", ctx, positive_int, default.failure_threshold),
        cooldown_seconds=get(section, "cooldown_seconds", "health", ctx, positive_number, default.cooldown_seconds),
        probe_interval_seconds=get(
            section, "probe_interval_seconds", "health", ctx, _non_negative_number, default.probe_interval_seconds
        ),
        probe_timeout_seconds=get(
            section, "probe_timeout_seconds", "health", ctx, positive_number, default.probe_timeout_seconds
        ),
        slow_ttft_seconds=get(section, "slow_ttft_seconds", "health", ctx, positive_number, default.slow_ttft_seconds),
        loop_lag_seconds=get(section, "loop_lag_seconds", "health", ctx, positive_number, default.loop_lag_seconds),
    )


def parse_quotas(node: object, ctx: Context) -> str:
    section = read_section(node, "quotas", ctx, ("timezone",))
    if section is None:
        return "UTC"
    return get(section, "timezone", "quotas", ctx, _timezone, "UTC")


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
    result = integer(value)
    if result < 0:
        raise BadValue(f"expected a whole number >= 0, got {result}")
    return result


def parse_limits(node: object, ctx: Context) -> LimitSettings:
    section = read_section(node, "limits", ctx, _LIMIT_KEYS)
    d = LimitSettings()
    if section is None:
        return d
    return LimitSettings(
        requests_per_minute=get(
            section, "requests_per_minute", "limits", ctx, _non_negative_int, d.requests_per_minute
        ),
        concurrent_streams=get(section, "concurrent_streams", "limits", ctx, _non_negative_int, d.concurrent_streams),
        max_messages=get(section, "max_messages", "limits", ctx, positive_int, d.max_messages),
        max_header_bytes=get(section, "max_header_bytes", "limits", ctx, positive_int, d.max_header_bytes),
        client_write_timeout_seconds=get(
            section, "client_write_timeout_seconds", "limits", ctx, positive_number, d.client_write_timeout_seconds
        ),
        max_upstream_bytes=get(section, "max_upstream_bytes", "limits", ctx, positive_int, d.max_upstream_bytes),
        upstream_max_connections=get(
            section, "upstream_max_connections", "limits", ctx, _non_negative_int, d.upstream_max_connections
        ),
    )


_WEBHOOK_KEYS: Final = ("url", "format", "events", "chat_id", "timeout")


def parse_alerts(node: object, ctx: Context) -> AlertSettings:
    section = read_section(node, "alerts", ctx, ("webhooks", "dedupe_seconds"))
    if section is None:
        return AlertSettings()
    hooks = [
        _parse_webhook(item, where, ctx) for where, item in read_items(section.get("webhooks"), "alerts.webhooks", ctx)
    ]
    return AlertSettings(
        webhooks=tuple(hook for hook in hooks if hook is not None),
        dedupe_seconds=get(section, "dedupe_seconds", "alerts", ctx, _non_negative_number, 300.0),
    )


def _parse_webhook(node: object, path: str, ctx: Context) -> WebhookSettings | None:
    m = read_section(node, path, ctx, _WEBHOOK_KEYS)
    if m is None:
        return None
    url = opt(m, "url", path, ctx, http_url)
    fmt = get(m, "format", path, ctx, text, "json")
    if fmt not in ALERT_FORMATS:
        ctx.error(f"{path}.format", unknown("format", fmt, ALERT_FORMATS))
    events: set[str] = set()
    for where, item in read_items(m.get("events"), f"{path}.events", ctx):
        kind = read_value(item, where, ctx, text)
        if kind in ALERT_KINDS:
            events.add(kind)
        elif kind is not None:
            ctx.error(where, unknown("event kind", kind, ALERT_KINDS))
    chat_id = opt(m, "chat_id", path, ctx, text)
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
        timeout=get(m, "timeout", path, ctx, positive_number, 5.0),
    )


def _timezone(value: object) -> str:
    name = text(value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise BadValue(f"unknown time zone {name!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from exc
    return name


def _non_negative_number(value: object) -> float:
    result = number(value)
    if result < 0:
        raise BadValue(f"expected a number >= 0, got {result:g}")
    return result


def parse_auth(node: object, ctx: Context) -> tuple[str, ...]:
    section = read_section(node, "auth", ctx, ("keys",))
    if section is None:
        return ()
    items = read_items(section.get("keys"), "auth.keys", ctx)
    keys = (read_value(item, where, ctx, _client_key) for where, item in items)
    return tuple(dict.fromkeys(key for key in keys if key))  # empty keys are dropped


_SHA256_KEY: Final = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _client_key(value: object) -> str:
    """A key as clients send it, or its SHA-256 as `sha256:<64 hex digits>`."""
    key = text(value)
    if key.startswith("sha256:") and not _SHA256_KEY.fullmatch(key):
        raise BadValue("a hashed key is 'sha256:' followed by 64 hex digits (sha256sum of the key)")
    return key


def parse_server(node: object, ctx: Context) -> ServerConfig:
    section = read_section(node, "server", ctx, _SERVER_KEYS)
    if section is None:
        return _DEFAULT_SERVER
    default = _DEFAULT_SERVER
    return ServerConfig(
        host=get(section, "host", "server", ctx, text, default.host),
        port=get(section, "port", "server", ctx, int_between(0, 65535), default.port),
        max_body_bytes=get(section, "max_body_bytes", "server", ctx, positive_int, default.max_body_bytes),
        admin_key=opt(section, "admin_key", "server", ctx, _client_key),
        shutdown_grace_seconds=get(
            section, "shutdown_grace_seconds", "server", ctx, positive_number, default.shutdown_grace_seconds
        ),
        reload_check_seconds=get(
            section, "reload_check_seconds", "server", ctx, _non_negative_number, default.reload_check_seconds
        ),
        workers=get(section, "workers", "server", ctx, int_between(1, 512), default.workers),
        max_in_flight=get(section, "max_in_flight", "server", ctx, _non_negative_int, default.max_in_flight),
        cors_origins=opt(section, "cors_origins", "server", ctx, _origins),
    )


def _origins(value: object) -> tuple[str, ...]:
    """`"*"`, or a list of origins as a browser sends them (`https://app.example.com`,
    `http://localhost:3000`: no path, no trailing slash); an empty list: none."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadValue(f'expected "*" or a list of origins, got {kind_of(value)}')
    origins = []
    for item in items:
        if not isinstance(item, str):
            raise BadValue(f"expected an origin (a string), got {kind_of(item)}")
        origin = item.strip()
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            hint = " (no trailing slash: a browser sends none)" if origin.endswith("/") else ""
            raise BadValue(f'expected "*" or scheme://host[:port], got {item!r}{hint}')
        origins.append(origin)
    return tuple(origins)


def warn_if_open(auth_keys: tuple[str, ...], server: ServerConfig, ctx: Context) -> None:
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
