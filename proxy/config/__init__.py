"""Load, interpolate and validate the YAML config into frozen, typed objects.

Two phases, as uvicorn does: the whole file is parsed and checked up front,
every problem is collected with the path of the key it is about
(``routes.default[2]: unknown provider 'olama'``), and only a config without
problems becomes a :class:`Config`. Nothing else in the proxy reads the
environment: ``${VAR}`` references are resolved here, against the ``environ``
mapping passed in (``os.environ`` by default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from proxy.config.model import (
    ALERT_FORMATS,
    ALERT_KINDS,
    CAPABILITIES,
    EDGE_KEYS,
    FAILURE_CLASSES,
    AlertSettings,
    Config,
    ConfigError,
    HealthSettings,
    LimitSettings,
    ProviderConfig,
    Quota,
    RedisSettings,
    Route,
    ServerConfig,
    TelemetrySettings,
    Timeouts,
    WebhookSettings,
)
from proxy.config.providers import parse_providers
from proxy.config.routes import parse_routes
from proxy.config.sections import (
    TOP_KEYS,
    parse_alerts,
    parse_auth,
    parse_health,
    parse_limits,
    parse_quotas,
    parse_redis,
    parse_server,
    warn_if_open,
)
from proxy.config.source import interpolate, read_yaml, redact_url
from proxy.config.telemetry import TELEMETRY_VARIABLES, parse_telemetry
from proxy.config.values import Context, read_section

__all__ = [
    "ALERT_FORMATS",
    "ALERT_KINDS",
    "CAPABILITIES",
    "CONFIG_PATH_VARIABLE",
    "EDGE_KEYS",
    "FAILURE_CLASSES",
    "TELEMETRY_VARIABLES",
    "AlertSettings",
    "Config",
    "ConfigError",
    "HealthSettings",
    "LimitSettings",
    "ProviderConfig",
    "Quota",
    "RedisSettings",
    "Route",
    "ServerConfig",
    "TelemetrySettings",
    "Timeouts",
    "WebhookSettings",
    "default_config_path",
    "interpolate",
    "load_config",
    "parse_config",
    "redact_url",
]


# --- the public entry points ------------------------------------------------

CONFIG_PATH_VARIABLE: Final = "FALLBACK_PROXY_CONFIG"


def default_config_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The config file named by ``$FALLBACK_PROXY_CONFIG``, if any."""
    return (os.environ if environ is None else environ).get(CONFIG_PATH_VARIABLE) or None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate the YAML file at ``path``; raise ConfigError."""
    source = os.fspath(path)
    return parse_config(read_yaml(source), environ, source=source)


def parse_config(data: object, environ: Mapping[str, str] | None = None, source: str | None = None) -> Config:
    """Validate already-parsed YAML ``data``; raise ConfigError with every problem."""
    ctx = Context(os.environ if environ is None else environ)
    top = read_section(data, "", ctx, TOP_KEYS)
    if top is None:
        raise ConfigError(ctx.errors)
    redis = parse_redis(top.get("redis"), ctx)
    health = parse_health(top.get("health"), ctx)
    quota_timezone = parse_quotas(top.get("quotas"), ctx)
    alerts = parse_alerts(top.get("alerts"), ctx)
    limits = parse_limits(top.get("limits"), ctx)
    auth_keys = parse_auth(top.get("auth"), ctx)
    server = parse_server(top.get("server"), ctx)
    telemetry = parse_telemetry(top.get("telemetry"), ctx)
    providers, scope = parse_providers(top.get("providers"), top.get("routes"), ctx, limits.upstream_max_connections)
    routes = parse_routes(top.get("routes"), providers, scope, ctx)
    warn_if_open(auth_keys, server, ctx)
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
        telemetry=telemetry,
        source=source,
        warnings=tuple(ctx.warnings),
    )
