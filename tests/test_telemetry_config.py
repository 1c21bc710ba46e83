"""The `telemetry:` section and the standard OTEL_* variables, parsed into TelemetrySettings."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import TELEMETRY_VARIABLES, ConfigError, TelemetrySettings, parse_config
from proxy.runtime import restart_needed

BASE: dict[str, Any] = {
    "providers": {"cloud": {"model": "openai/gpt-test", "api_key": "sk-test", "api_base": "http://127.0.0.1:9/v1"}},
    "routes": {"default": ["cloud"]},
}


def settings(telemetry: dict[str, Any] | None = None, **environ: str) -> TelemetrySettings:
    data = BASE if telemetry is None else {**BASE, "telemetry": telemetry}
    return parse_config(data, environ=environ).telemetry


def problems(telemetry: dict[str, Any] | None = None, **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings(telemetry, **environ)
    return list(caught.value.problems)


def test_off_unless_an_endpoint_or_the_otlp_exporter_is_named() -> None:
    assert settings() == TelemetrySettings()
    assert not settings().enabled
    assert not settings({"service_name": "edge", "sampler": "always_on"}).enabled
    assert not settings(OTEL_SERVICE_NAME="edge", OTEL_TRACES_SAMPLER="always_on").enabled
    named = settings(OTEL_TRACES_EXPORTER="otlp")
    assert named.enabled and named.endpoint == "http://localhost:4318/v1/traces"


def test_an_endpoint_turns_traces_on_and_gets_the_traces_path() -> None:
    assert settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/").endpoint == "http://collector:4318/v1/traces"
    assert settings({"endpoint": "https://otel.example:4318"}).endpoint == "https://otel.example:4318/v1/traces"
    traces = settings(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://collector:4318/custom", OTEL_EXPORTER_OTLP_ENDPOINT="http://x"
    )
    assert traces.enabled and traces.endpoint == "http://collector:4318/custom"  # the per-signal URL, as given


def test_the_variable_wins_over_the_file_key_by_key() -> None:
    telemetry = {
        "endpoint": "http://from-file:4318",
        "service_name": "from-file",
        "sampler": "always_on",
        "sampler_arg": 0.25,
        "headers": {"authorization": "Bearer file", "x-file": "1"},
        "resource_attributes": {"deployment.environment.name": "file", "team": "llm"},
        "timeout_ms": 2500,
        "max_queue_size": 100,
    }
    got = settings(
        telemetry,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://from-env:4318",
        OTEL_SERVICE_NAME="from-env",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20env",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-traces=2",  # the per-signal variable beats the general one
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=prod",
        OTEL_EXPORTER_OTLP_TIMEOUT="4000",
    )
    assert got.endpoint == "http://from-env:4318/v1/traces"
    assert got.service_name == "from-env"
    assert (got.sampler, got.sampler_arg) == ("parentbased_traceidratio", 0.25)
    assert dict(got.headers) == {"authorization": "Bearer file", "x-file": "1", "x-traces": "2"}
    assert dict(got.resource_attributes) == {"deployment.environment.name": "prod", "team": "llm"}
    assert got.timeout == 4.0  # milliseconds, as the spec says
    assert got.max_queue_size == 100


def test_the_file_section_alone_configures_everything() -> None:
    got = settings(
        {
            "endpoint": "http://collector:4318",
            "headers": {"x-tenant": "acme"},
            "service_name": "edge",
            "resource_attributes": {"replica": 3, "canary": True},
            "sampler": "traceidratio",
            "sampler_arg": "0.1",
            "compression": "gzip",
            "schedule_delay_ms": 200,
            "max_queue_size": 4096,
            "max_export_batch_size": 256,
            "certificate": "/etc/ssl/collector-ca.pem",
        }
    )
    assert got.enabled and got.service_name == "edge" and got.sampler_arg == 0.1
    assert dict(got.resource_attributes) == {"replica": "3", "canary": "true"}
    assert (got.compression, got.schedule_delay, got.max_queue_size, got.max_export_batch_size) == (
        "gzip",
        0.2,
        4096,
        256,
    )
    assert got.certificate == "/etc/ssl/collector-ca.pem"
    assert "acme" not in repr(got)  # headers may carry a token


def test_file_values_are_interpolated_and_service_name_falls_back_to_the_resource() -> None:
    data = {**BASE, "telemetry": {"endpoint": "${COLLECTOR}", "headers": {"authorization": "Bearer ${OTEL_TOKEN:-}"}}}
    got = parse_config(data, environ={"COLLECTOR": "http://c:4318", "OTEL_RESOURCE_ATTRIBUTES": "service.name=svc"})
    assert got.telemetry.endpoint == "http://c:4318/v1/traces"
    assert dict(got.telemetry.headers) == {"authorization": "Bearer "}
    assert got.telemetry.service_name == "svc"


@pytest.mark.parametrize(
    ("telemetry", "environ"),
    [
        ({"endpoint": "http://c:4318", "disabled": True}, {}),
        ({"endpoint": "http://c:4318"}, {"OTEL_SDK_DISABLED": "TRUE"}),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}),
        ({"endpoint": "http://c:4318"}, {"OTEL_TRACES_EXPORTER": "none"}),
    ],
    ids=["file-disabled", "variable-disabled", "variable-disables-variable", "exporter-none"],
)
def test_the_kill_switches(telemetry: dict[str, Any], environ: dict[str, str]) -> None:
    assert not settings(telemetry, **environ).enabled


def test_only_true_disables_as_the_spec_says() -> None:
    assert settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_SDK_DISABLED="yes").enabled


def test_bad_variables_are_named_when_traces_are_on() -> None:
    assert problems(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_TRACES_SAMPLER="jaeger_remote",
        OTEL_TRACES_SAMPLER_ARG="2",
        OTEL_RESOURCE_ATTRIBUTES="no-equals-sign",
        OTEL_BSP_MAX_QUEUE_SIZE="-1",
    ) == [
        "OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported, got 'grpc': point the endpoint at the "
        "collector's OTLP/HTTP port (4318)",
        "OTEL_TRACES_SAMPLER: unknown sampler 'jaeger_remote' (expected one of: always_off, always_on, "
        "parentbased_always_off, parentbased_always_on, parentbased_traceidratio, traceidratio)",
        "OTEL_TRACES_SAMPLER_ARG: a sampling ratio is between 0 and 1, got 2",
        "OTEL_BSP_MAX_QUEUE_SIZE: must be a positive integer, got -1",
        "OTEL_RESOURCE_ATTRIBUTES: expected key=value items separated by commas, got 'no-equals-sign'",
    ]
    assert problems(OTEL_EXPORTER_OTLP_ENDPOINT="collector:4318") == [
        "OTEL_EXPORTER_OTLP_ENDPOINT: expected an http:// or https:// URL, got 'collector:4318'"
    ]
    assert problems(OTEL_TRACES_EXPORTER="console") == [
        "OTEL_TRACES_EXPORTER: only the otlp exporter is available (or none to turn traces off), got 'console'"
    ]


def test_variables_do_not_stop_a_proxy_that_does_not_trace() -> None:
    """A cluster-wide OTEL_* setting that this proxy cannot use is ignored while traces are off."""
    assert not settings(OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_TRACES_SAMPLER="xray").enabled


def test_the_section_is_checked_even_when_off() -> None:
    assert problems({"sampler": "sometimes", "max_queue_size": 4, "max_export_batch_size": 8, "endpont": "x"}) == [
        "telemetry: unknown key 'endpont' (did you mean 'endpoint'?)",
        "telemetry.sampler: unknown sampler 'sometimes' (expected one of: always_off, always_on, "
        "parentbased_always_off, parentbased_always_on, parentbased_traceidratio, traceidratio)",
        "telemetry: max_export_batch_size (8) must not exceed max_queue_size (4)",
    ]
    assert problems({"protocol": "grpc"})[0].startswith("telemetry.protocol: only http/protobuf is supported")
    assert problems({"headers": ["a"]}) == ["telemetry.headers: expected a mapping, got a list"]


def test_every_variable_is_a_standard_otel_one() -> None:
    assert all(name.startswith("OTEL_") for name in TELEMETRY_VARIABLES)
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER_ARG"} <= TELEMETRY_VARIABLES


def test_a_reload_that_changes_telemetry_says_a_restart_is_needed() -> None:
    old = parse_config(BASE, environ={})
    new = parse_config({**BASE, "telemetry": {"endpoint": "http://c:4318"}}, environ={})
    assert restart_needed(old, new) == ["telemetry"]
