"""OpenTelemetry traces end to end: the proxy exports to a real OTLP/HTTP
receiver (tests/otlp_receiver.py decodes the protobuf, as a collector does),
clients are the official `openai` SDK, providers the fakes."""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.config import parse_config
from proxy.fakes import FakeAnthropic, FakeOpenAI
from tests.conftest import ServedApp, openai_provider
from tests.otlp_receiver import CLIENT, SERVER, STATUS_ERROR, Exported, HangingCollector, OtlpReceiver

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Describe the quartz zebra of Vlissingen-7f3a in one line."
MESSAGES: Any = [{"role": "user", "content": PROMPT}]
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
TRACE_HEADERS = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def traced_config(providers: dict[str, Any], chain: list[str], **telemetry: Any) -> dict[str, Any]:
    return {
        "providers": providers,
        "routes": {"default": chain},
        "telemetry": {"schedule_delay_ms": 20, **telemetry},
    }


def two_providers(cloud: FakeOpenAI, backup: FakeOpenAI, endpoint: str, **backup_extra: Any) -> dict[str, Any]:
    providers = {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url, **backup_extra)}
    return traced_config(providers, ["cloud", "backup"], endpoint=endpoint)


def sdk(proxy: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, default_headers=TRACE_HEADERS)


def tree(receiver: OtlpReceiver, clients: int, requests: int = 1) -> tuple[Exported, list[Exported]]:
    """The request span and its attempt spans (in start order), once all have arrived."""

    def complete(spans: list[Exported]) -> bool:
        kinds = [s.kind for s in spans]
        return kinds.count(SERVER) >= requests and kinds.count(CLIENT) >= clients

    spans = receiver.wait_for(complete)
    servers = sorted((s for s in spans if s.kind == SERVER), key=lambda s: s.start)
    attempts = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start)
    assert len(attempts) == clients
    return servers[-1], attempts


def assert_no_content(receiver: OtlpReceiver, *answers: str) -> None:
    """No prompt and no answer in any byte the collector received."""
    assert receiver.raw
    for body in receiver.raw:
        for text in (PROMPT, "quartz zebra", *answers):
            assert text.encode() not in body, f"{text!r} was exported"


def sent_traceparent(fake: FakeOpenAI) -> str:
    return fake.requests[-1].headers["traceparent"]


def test_a_plain_answer_is_one_request_span_continuing_the_client_trace_and_one_attempt(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    config = traced_config({"cloud": openai_provider(cloud.url)}, ["cloud"], endpoint=receiver.url)
    proxy = serve(config)
    with sdk(proxy) as client:
        answer = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=50, temperature=0.5)
    assert answer.choices[0].message.content == "Hello from cloud."

    request, [attempt] = tree(receiver, clients=1)
    assert receiver.paths[0] == "/v1/traces"
    assert (request.name, request.trace_id, request.parent_span_id) == ("chat default", CLIENT_TRACE, CLIENT_SPAN)
    assert (attempt.name, attempt.trace_id, attempt.parent_span_id) == ("chat gpt-test", CLIENT_TRACE, request.span_id)
    assert request.start <= attempt.start <= attempt.end <= request.end
    assert request.attributes | {"fallback_proxy.request_id": "-"} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "default",
        "gen_ai.response.model": "gpt-test",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.usage.input_tokens": answer.usage.prompt_tokens if answer.usage else -1,
        "gen_ai.usage.output_tokens": 3,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "url.path": "/v1/chat/completions",
        "fallback_proxy.request_id": "-",
        "fallback_proxy.route": "default",
        "fallback_proxy.provider": "cloud",
        "fallback_proxy.outcome": "ok",
        "fallback_proxy.stream": False,
        "fallback_proxy.attempts": 1,
    }
    assert attempt.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.response.model": "gpt-test",
        "gen_ai.response.id": answer.id,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": request.attributes["gen_ai.usage.input_tokens"],
        "gen_ai.usage.output_tokens": 3,
        "server.address": "127.0.0.1",
        "server.port": cloud.port,
        "fallback_proxy.provider": "cloud",
        "fallback_proxy.retry": 0,
        "fallback_proxy.outcome": "ok",
    }
    assert request.resource["service.name"] == "fallback-proxy"
    assert request.resource["service.version"]
    # The upstream call carries the client's trace, with the attempt as its parent.
    assert sent_traceparent(cloud) == f"00-{CLIENT_TRACE}-{attempt.span_id}-01"
    assert cloud.requests[-1].headers["tracestate"] == "vendor=opaque"
    assert_no_content(receiver, "Hello from cloud")


def test_a_fallback_is_one_failed_attempt_then_the_one_that_answered(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    proxy = serve(two_providers(cloud, backup, receiver.url))
    cloud.set_fault("status", status=503)
    with sdk(proxy) as client:
        answer = client.chat.completions.create(model="default", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello from backup."

    request, [failed, answered] = tree(receiver, clients=2)
    assert failed.parent_span_id == answered.parent_span_id == request.span_id
    assert failed.status == STATUS_ERROR and answered.status != STATUS_ERROR
    assert failed.attributes["fallback_proxy.provider"] == "cloud"
    assert failed.attributes["error.type"] == failed.attributes["fallback_proxy.outcome"] == "server_error"
    assert failed.attributes["http.response.status_code"] == 503
    assert "gen_ai.usage.input_tokens" not in failed.attributes
    assert answered.attributes["fallback_proxy.provider"] == "backup"
    assert answered.attributes["fallback_proxy.fallback_from"] == "cloud"
    assert answered.attributes["fallback_proxy.fallback_reason"] == "server_error"
    assert answered.attributes["gen_ai.usage.output_tokens"] == 3
    assert request.attributes["fallback_proxy.attempts"] == 2
    assert request.attributes["fallback_proxy.fallbacks"] == ("cloud=server_error",)
    assert request.attributes["fallback_proxy.provider"] == "backup"
    assert "error.type" not in request.attributes and request.status != STATUS_ERROR
    # Each provider saw its own attempt as the parent, in the client's trace.
    assert sent_traceparent(cloud) == f"00-{CLIENT_TRACE}-{failed.span_id}-01"
    assert sent_traceparent(backup) == f"00-{CLIENT_TRACE}-{answered.span_id}-01"
    assert_no_content(receiver, "Hello from backup", "Hello from cloud")


def test_skips_are_events_of_the_request_span_and_no_attempt(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    config = two_providers(cloud, backup, receiver.url, local=True)
    config["providers"]["cloud"]["quota"] = {"requests_per_day": 1}
    proxy = serve(config)
    with sdk(proxy) as client:
        client.chat.completions.create(model="default", messages=MESSAGES)  # spends cloud's quota
        client.chat.completions.create(model="default", messages=MESSAGES)  # cloud: quota_exhausted
        private = client.chat.completions.with_raw_response.create(
            model="default", messages=MESSAGES, extra_headers={"x-proxy-local-only": "true"}
        )  # cloud: policy (not local)
    assert private.headers["x-proxy-provider"] == "backup"

    spans = receiver.wait_for(lambda s: [x.kind for x in s].count(SERVER) == 3)
    first, spent, local = sorted((s for s in spans if s.kind == SERVER), key=lambda s: s.start)
    attempts = {s.parent_span_id: s for s in spans if s.kind == CLIENT}
    assert len(attempts) == 3  # one attempt per request: a skip makes no call
    assert attempts[first.span_id].attributes["fallback_proxy.quota.decision"] == "admitted"
    assert first.events == []
    skip = {"fallback_proxy.provider": "cloud", "fallback_proxy.skip_reason": "quota_exhausted"}
    assert spent.events == [("fallback_proxy.skip", skip | {"fallback_proxy.quota.decision": "exhausted"})]
    assert attempts[spent.span_id].attributes["fallback_proxy.fallback_reason"] == "quota_exhausted"
    assert local.events == [("fallback_proxy.skip", skip | {"fallback_proxy.skip_reason": "policy"})]
    assert attempts[local.span_id].attributes["fallback_proxy.provider"] == "backup"
    assert cloud.request_count == 1
    assert_no_content(receiver, "Hello from backup", "Hello from cloud")


def test_a_stream_attempt_lasts_as_long_as_the_stream_with_its_first_token_time(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    cloud.set_fault("slow", token_delay=0.05)
    proxy = serve(traced_config({"cloud": openai_provider(cloud.url)}, ["cloud"], endpoint=receiver.url))
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model="default", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from cloud."

    request, [attempt] = tree(receiver, clients=1)
    assert attempt.parent_span_id == request.span_id
    assert request.attributes["fallback_proxy.stream"] is True
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 3
    assert attempt.attributes["gen_ai.response.id"].startswith("chatcmpl-")
    assert attempt.attributes["fallback_proxy.outcome"] == "ok"
    ttft_ms = attempt.attributes["fallback_proxy.time_to_first_token_ms"]
    duration_ms = (attempt.end - attempt.start) / 1e6
    assert 0 < ttft_ms < duration_ms  # the span ends with the stream, well after its first token
    assert duration_ms >= 50  # three tokens 50 ms apart
    assert request.attributes["fallback_proxy.time_to_first_token_ms"] > 0
    assert sent_traceparent(cloud) == f"00-{CLIENT_TRACE}-{attempt.span_id}-01"
    assert_no_content(receiver, "Hello from cloud")


def test_a_stream_continued_mid_way_shows_the_interrupted_attempt_and_the_continuation(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    proxy = serve(two_providers(cloud, backup, receiver.url))
    cloud.set_fault("die_midstream", after_chunks=2)
    with sdk(proxy) as client:
        stream = client.chat.completions.create(model="default", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.endswith("Hello from backup.")

    request, [cut, continued] = tree(receiver, clients=2)
    assert cut.parent_span_id == continued.parent_span_id == request.span_id
    assert cut.attributes["fallback_proxy.provider"] == "cloud"
    assert cut.attributes["error.type"] == "connection_error" and cut.status == STATUS_ERROR
    assert "fallback_proxy.time_to_first_token_ms" in cut.attributes  # it had started
    assert continued.attributes["fallback_proxy.continuation"] is True
    assert continued.attributes["fallback_proxy.fallback_from"] == "cloud"
    assert continued.attributes["fallback_proxy.fallback_reason"] == "connection_error"
    assert continued.attributes["fallback_proxy.outcome"] == "ok"
    assert cut.end <= continued.start
    assert request.attributes["fallback_proxy.continued_by"] == ("backup",)
    assert request.attributes["fallback_proxy.interrupted"] == "connection_error"
    reason = {"fallback_proxy.provider": "cloud", "fallback_proxy.reason": "connection_error"}
    assert request.events == [("fallback_proxy.continuation", reason)]
    assert sent_traceparent(backup) == f"00-{CLIENT_TRACE}-{continued.span_id}-01"
    # The continuation asked the backup to go on from the cloud's words: none of them is exported.
    assert_no_content(receiver, "Hello from backup", "Hello from", backup.requests[-1].body["messages"][-2]["content"])


def test_the_standard_variables_configure_export_and_resource(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # the per-signal endpoint below wins
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/custom/traces",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme%20corp",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_SERVICE_NAME": "edge-proxy",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,service.name=ignored",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
    }
    data = {"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}}
    proxy = serve(parse_config({**data, "health": {"probe_interval_seconds": 0}}, environ=environ))
    with sdk(proxy) as client:
        client.chat.completions.create(model="default", messages=MESSAGES)

    request, _ = tree(receiver, clients=1)
    assert receiver.paths[0] == "/custom/traces"
    assert receiver.headers[0]["x-tenant"] == "acme corp"
    assert receiver.headers[0]["content-encoding"] == "gzip"
    assert request.resource["service.name"] == "edge-proxy"
    assert request.resource["deployment.environment.name"] == "test"
    assert_no_content(receiver, "Hello from cloud")


def test_an_unsampled_request_exports_nothing_and_still_passes_its_trace_on(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    config = traced_config(
        {"cloud": openai_provider(cloud.url)}, ["cloud"], endpoint=receiver.url, sampler="parentbased_always_on"
    )
    proxy = serve(config)
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"  # the client decided not to record it
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        client.chat.completions.create(model="default", messages=MESSAGES, extra_headers={"traceparent": unsampled})
    trace, parent, flags = sent_traceparent(cloud).split("-")[1:]
    assert (trace, flags) == (CLIENT_TRACE, "00") and parent != CLIENT_SPAN
    proxy.stop()  # the shutdown flushes whatever is queued
    assert receiver.spans == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("collector", ["hanging", "down"])
def test_a_dead_collector_never_slows_a_request(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, collector: str
) -> None:
    with contextlib.ExitStack() as stack:
        hanging = stack.enter_context(HangingCollector()) if collector == "hanging" else None
        endpoint = hanging.url if hanging is not None else f"http://127.0.0.1:{free_port()}"
        providers = {"cloud": openai_provider(cloud.url)}
        # An export waits up to 30 s for the collector; the queue holds 8 spans.
        telemetry = {"timeout_ms": 30_000, "schedule_delay_ms": 1, "max_queue_size": 8, "max_export_batch_size": 2}
        traced = serve(traced_config(providers, ["cloud"], endpoint=endpoint, **telemetry))
        untraced = serve({"providers": providers, "routes": {"default": ["cloud"]}})
        seconds: dict[str, list[float]] = {"traced": [], "untraced": []}
        with sdk(traced) as on, sdk(untraced) as off:
            for _ in range(40):  # interleaved, so that the machine's noise falls on both
                for name, client in (("traced", on), ("untraced", off)):
                    started = time.perf_counter()
                    client.chat.completions.create(model="default", messages=MESSAGES)
                    seconds[name].append(time.perf_counter() - started)
        if hanging is not None:
            deadline = time.monotonic() + 30
            while hanging.received == 0:  # the exporter did send, and waits for an answer that never comes
                assert time.monotonic() < deadline, "the exporter never reached the collector"
                time.sleep(0.01)
        # A blocked export would cost seconds (30 s per batch); here each request costs what it costs untraced.
        assert max(seconds["traced"]) < 5, seconds["traced"]
        assert statistics.median(seconds["traced"]) < statistics.median(seconds["untraced"]) + 0.05
        started = time.monotonic()
        traced.stop()  # the last flush is bounded too (5 s), whatever the collector does
        assert not traced.thread.is_alive() and time.monotonic() - started < 9


def test_with_traces_off_nothing_of_opentelemetry_is_loaded() -> None:
    """Off is the default: a request served without tracing imports no OpenTelemetry
    module (and sends no trace context upstream)."""
    script = f"""
import sys, httpx
from proxy.app import create_app
from proxy.fakes import FakeAnthropic, FakeOpenAI
from tests.conftest import ServedApp, build_config, openai_provider
with FakeOpenAI("cloud") as cloud:
    served = ServedApp(create_app(build_config(
        {{"providers": {{"cloud": openai_provider(cloud.url)}}, "routes": {{"default": ["cloud"]}}}})))
    served.start()
    answer = httpx.post(served.url + "/v1/chat/completions", headers={{"traceparent": "{TRACEPARENT}"}},
                        json={{"model": "default", "messages": [{{"role": "user", "content": "hi"}}], "stream": True}})
    assert answer.status_code == 200 and answer.text.endswith("[DONE]\\n\\n"), answer.text
    assert "traceparent" not in cloud.requests[-1].headers
    served.stop()
print(sorted(m for m in sys.modules if m.startswith("opentelemetry") or m == "proxy.telemetry"))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_hedge_race_shows_the_cancelled_call_and_the_one_that_won(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    config = two_providers(cloud, backup, receiver.url)
    config["routes"] = {"default": {"chain": ["cloud", "backup"], "hedge_after_ms": 100}}
    proxy = serve(config)
    cloud.set_fault("slow", first_token_delay=5)
    with sdk(proxy) as client:
        answer = client.chat.completions.create(model="default", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello from backup."

    request, [primary, hedge] = tree(receiver, clients=2)
    assert primary.parent_span_id == hedge.parent_span_id == request.span_id
    assert primary.attributes["fallback_proxy.provider"] == "cloud"
    assert primary.attributes["fallback_proxy.outcome"] == "cancelled"  # the hedge answered first
    assert "error.type" not in primary.attributes
    assert hedge.attributes["fallback_proxy.outcome"] == "ok"
    # 100 ms later, less uvloop's timer slack (its clock counts milliseconds: a timer may fire 1 ms early)
    assert primary.end <= request.end and hedge.start - primary.start >= 98e6
    assert request.attributes["fallback_proxy.fallbacks"] == ("cloud=timeout",)


@pytest.mark.litellm
def test_a_translated_provider_gets_the_trace_context_too(
    serve: Callable[..., ServedApp], receiver: OtlpReceiver
) -> None:
    with FakeAnthropic("claude", api_key="sk-ant-test", model="claude-sonnet-4-5-20250929") as claude:
        provider = {"model": "anthropic/claude-sonnet-4-5-20250929", "api_key": "sk-ant-test", "api_base": claude.url}
        proxy = serve(traced_config({"claude": provider}, ["claude"], endpoint=receiver.url))
        with sdk(proxy) as client:
            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=20)
            stream = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=20, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        spans = receiver.wait_for(lambda s: [x.kind for x in s].count(SERVER) == 2)
        attempts = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start)
        sent = [r.headers["traceparent"] for r in claude.requests if r.path.endswith("/messages")]
    assert sent == [f"00-{CLIENT_TRACE}-{a.span_id}-01" for a in attempts]
    for attempt in attempts:
        assert attempt.attributes["gen_ai.provider.name"] == "anthropic"
        assert attempt.attributes["gen_ai.request.model"] == "claude-sonnet-4-5-20250929"
        assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
        assert attempt.attributes["fallback_proxy.outcome"] == "ok"
    assert_no_content(receiver, "Hello from claude")


def test_a_retry_is_an_attempt_of_its_own(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    provider = openai_provider(cloud.url, retries=1)
    proxy = serve(traced_config({"cloud": provider}, ["cloud"], endpoint=receiver.url))
    cloud.set_fault("status", status=503, times=1)
    with sdk(proxy) as client:
        client.chat.completions.create(model="default", messages=MESSAGES)

    request, [first, retry] = tree(receiver, clients=2)
    assert (first.attributes["fallback_proxy.retry"], first.attributes["error.type"]) == (0, "server_error")
    assert (retry.attributes["fallback_proxy.retry"], retry.attributes["fallback_proxy.outcome"]) == (1, "ok")
    assert "fallback_proxy.fallback_reason" not in retry.attributes  # the same provider, not a fallback
    assert request.attributes["fallback_proxy.attempts"] == 1  # one visit of the route's graph
    assert sent_traceparent(cloud) == f"00-{CLIENT_TRACE}-{retry.span_id}-01"
