"""The ``telemetry`` section and the standard ``OTEL_*`` variables: OpenTelemetry traces.

Every key of the section has its standard variable, and the variable wins when
both are set (per key; headers and resource attributes are merged name by name,
the variable's value winning): platforms (the OpenTelemetry Operator, a chart's
``env``) set these variables for every service they run, and the file holds the
defaults. ``OTEL_SDK_DISABLED=true`` turns traces off whatever the file says.

Traces are off unless an endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``telemetry.endpoint``...) or the
exporter is named explicitly (``OTEL_TRACES_EXPORTER=otlp``: the default
``http://localhost:4318``). Only OTLP over HTTP with protobuf is spoken (a
collector's port 4318): gRPC would bring grpcio, a large native package, for
what one HTTP POST per batch does. While traces are off the variables are not
checked (a cluster-wide ``OTEL_*`` setting cannot stop a proxy that does not
trace); the section's keys always are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

from proxy.config.model import COMPRESSIONS, SAMPLERS, TelemetrySettings
from proxy.config.values import (
    BadValue,
    Context,
    boolean,
    http_url,
    join,
    kind_of,
    number,
    opt,
    positive_int,
    positive_number,
    read_section,
    read_value,
    text,
    unknown,
)

T = TypeVar("T")

# Each key of the section, and its variables: the per-signal one first.
_VARIABLES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "disabled": ("OTEL_SDK_DISABLED",),
        "exporter": ("OTEL_TRACES_EXPORTER",),
        "endpoint": ("OTEL_EXPORTER_OTLP_ENDPOINT",),
        "traces_endpoint": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",),
        "protocol": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        "headers": ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        "timeout_ms": ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
        "compression": ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
        "certificate": ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        "client_key": ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        "client_certificate": (
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ),
        "service_name": ("OTEL_SERVICE_NAME",),
        "resource_attributes": ("OTEL_RESOURCE_ATTRIBUTES",),
        "sampler": ("OTEL_TRACES_SAMPLER",),
        "sampler_arg": ("OTEL_TRACES_SAMPLER_ARG",),
        "max_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE",),
        "max_export_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",),
        "schedule_delay_ms": ("OTEL_BSP_SCHEDULE_DELAY",),
    }
)
TELEMETRY_VARIABLES: Final = frozenset(name for names in _VARIABLES.values() for name in names)
_PATH: Final = "telemetry"
_PROTOCOL: Final = "http/protobuf"
_TRACES_PATH: Final = "/v1/traces"
_DEFAULT_ENDPOINT: Final = "http://localhost:4318"


class _Reader:
    """One key at a time: its variable when set (and traces are on), else the file's value."""

    def __init__(self, section: Mapping[str, object], ctx: Context) -> None:
        self.section = section
        self.ctx = ctx
        self.use_environ = True

    def variable(self, key: str) -> tuple[str, str] | None:
        """The first of the key's variables set to a non-empty value (the spec reads empty as unset)."""
        if not self.use_environ:
            return None
        for name in _VARIABLES[key]:
            value = self.ctx.environ.get(name, "").strip()
            if value:
                return name, value
        return None

    def get(
        self, key: str, convert: Callable[[object], T], from_variable: Callable[[str], T] | None = None
    ) -> T | None:
        in_file = opt(self.section, key, _PATH, self.ctx, convert)  # checked even when a variable wins
        found = self.variable(key)
        if found is None:
            return in_file
        name, raw = found
        try:
            return (from_variable or convert)(raw)
        except BadValue as exc:
            self.ctx.error(name, str(exc))
            return None

    def pairs(self, key: str) -> dict[str, str]:
        """A mapping key: the file's pairs, then the variable's (``k=v,k2=v2``, values percent-encoded)."""
        merged = _file_pairs(self.section.get(key), join(_PATH, key), self.ctx)
        found = self.variable(key)
        if found is not None:
            name, raw = found
            try:
                merged.update(_variable_pairs(raw))
            except BadValue as exc:
                self.ctx.error(name, str(exc))
        return merged


def parse_telemetry(node: object, ctx: Context) -> TelemetrySettings:
    section = read_section(node, _PATH, ctx, tuple(_VARIABLES))
    if section is None:
        return TelemetrySettings()
    read = _Reader(section, ctx)
    disabled = read.get("disabled", boolean, _spec_boolean)
    exporter = read.get("exporter", _exporter)
    traces_endpoint = read.get("traces_endpoint", _url_as_is)
    endpoint = read.get("endpoint", http_url)
    enabled = not disabled and exporter != "none" and bool(traces_endpoint or endpoint or exporter == "otlp")
    read.use_environ = enabled
    url = traces_endpoint or (endpoint or _DEFAULT_ENDPOINT) + _TRACES_PATH
    read.get("protocol", _protocol)
    default = TelemetrySettings()
    sampler = read.get("sampler", _sampler) or default.sampler
    sampler_arg = read.get("sampler_arg", _ratio)
    max_queue_size = read.get("max_queue_size", positive_int) or default.max_queue_size
    batch = read.get("max_export_batch_size", positive_int) or min(default.max_export_batch_size, max_queue_size)
    if batch > max_queue_size:
        ctx.error(_PATH, f"max_export_batch_size ({batch}) must not exceed max_queue_size ({max_queue_size})")
    timeout_ms = read.get("timeout_ms", positive_number)
    delay_ms = read.get("schedule_delay_ms", positive_number)
    attributes = read.pairs("resource_attributes")
    service_name = read.get("service_name", text) or attributes.get("service.name") or default.service_name
    return TelemetrySettings(
        enabled=enabled,
        endpoint=url,
        headers=MappingProxyType(read.pairs("headers")),
        service_name=service_name,
        resource_attributes=MappingProxyType(attributes),
        sampler=sampler,
        sampler_arg=default.sampler_arg if sampler_arg is None else sampler_arg,
        timeout=default.timeout if timeout_ms is None else timeout_ms / 1000,
        compression=read.get("compression", _compression) or default.compression,
        certificate=read.get("certificate", text),
        client_key=read.get("client_key", text),
        client_certificate=read.get("client_certificate", text),
        max_queue_size=max_queue_size,
        max_export_batch_size=batch,
        schedule_delay=default.schedule_delay if delay_ms is None else delay_ms / 1000,
    )


def _spec_boolean(value: str) -> bool:
    """The spec's booleans: only "true" (any case) is true."""
    return value.strip().lower() == "true"


def _exporter(value: object) -> str:
    names = {part.strip().lower() for part in text(value).split(",") if part.strip()}
    if "none" in names:
        return "none"
    if names == {"otlp"}:
        return "otlp"
    raise BadValue(f"only the otlp exporter is available (or none to turn traces off), got {text(value)!r}")


def _url_as_is(value: object) -> str:
    url = text(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadValue(f"expected an http:// or https:// URL, got {url!r}")
    return url


def _protocol(value: object) -> str:
    protocol = text(value).strip().lower()
    if protocol != _PROTOCOL:
        raise BadValue(
            f"only {_PROTOCOL} is supported, got {protocol!r}: point the endpoint at the collector's "
            "OTLP/HTTP port (4318)"
        )
    return protocol


def _sampler(value: object) -> str:
    sampler = text(value).strip().lower()
    if sampler not in SAMPLERS:
        raise BadValue(unknown("sampler", sampler, SAMPLERS))
    return sampler


def _ratio(value: object) -> float:
    ratio = number(value)
    if not 0.0 <= ratio <= 1.0:
        raise BadValue(f"a sampling ratio is between 0 and 1, got {ratio:g}")
    return ratio


def _compression(value: object) -> str:
    compression = text(value).strip().lower()
    if compression not in COMPRESSIONS:
        raise BadValue(unknown("compression", compression, COMPRESSIONS))
    return compression


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise BadValue(f"expected a string or a number, got {kind_of(value)}")


def _file_pairs(node: object, path: str, ctx: Context) -> dict[str, str]:
    section = read_section(node, path, ctx, None)
    pairs: dict[str, str] = {}
    for name, raw in (section or {}).items():
        value = read_value(raw, join(path, name), ctx, _scalar)
        if value:  # empty after interpolation: left out
            pairs[name] = value
    return pairs


def _variable_pairs(raw: str) -> dict[str, str]:
    """``key=value`` items separated by commas, values percent-decoded (the spec's W3C Baggage form)."""
    pairs: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise BadValue(f"expected key=value items separated by commas, got {item.strip()!r}")
        pairs[unquote(name.strip())] = unquote(value.strip())
    return pairs
