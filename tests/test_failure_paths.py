"""Failures answered right, end to end with the official SDK against real-socket
fakes: deadlines for non-stream requests, no retries spent on silence, content
filters, a last resort before a dead end, a small context window, and parameters
a wire format cannot carry."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.routing import BaseRoute

from proxy.fakes import FakeOllama, FakeOpenAI

from .conftest import ServedApp, openai_provider

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
HUNG = {"connect": 1, "first_token": 2, "total": 20, "idle": 2}


def sdk(proxy: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=30)


def chain(cloud: FakeOpenAI, backup: FakeOpenAI, cloud_extra: dict[str, Any] | None = None, **route: Any) -> dict:
    return {
        "providers": {
            "cloud": openai_provider(cloud.url, timeout=HUNG, **(cloud_extra or {})),
            "backup": openai_provider(backup.url, timeout=HUNG),
        },
        "routes": {"default": {"chain": ["cloud", "backup"], **route}},
    }


@pytest.mark.parametrize("fault", ["hang", "stall"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_hung_provider_is_left_after_its_first_token_deadline(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, fault: str, stream: bool
) -> None:
    """`first_token: 2` bounds a non-stream request as it bounds a stream (a
    `stall` sends a few chunks, then nothing: the idle deadline)."""
    cloud.set_fault(fault, after_chunks=1)
    proxy = serve(chain(cloud, backup))
    started = time.perf_counter()
    with sdk(proxy) as client:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model="default", messages=MESSAGES, stream=True
            ) as raw:
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
                provider = raw.headers["x-proxy-provider"]
        else:
            answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
            text, provider = answer.parse().choices[0].message.content or "", answer.headers["x-proxy-provider"]
    elapsed = time.perf_counter() - started
    assert elapsed < 8, f"took {elapsed:.1f}s: the 20 s total deadline was waited out"
    if stream and fault == "stall":  # the first chunk reached the client: the backup continued it
        assert provider == "cloud" and text.endswith("backup.")
    else:
        assert (text, provider) == ("Hello from backup.", "backup")


def test_silence_is_not_retried(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    cloud.set_fault("hang")
    proxy = serve(chain(cloud, backup, {"retries": 2}))
    started = time.perf_counter()
    with sdk(proxy) as client:
        answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert answer.headers["x-proxy-provider"] == "backup"
    assert cloud.request_count == 1  # one wait for a first token, not three
    assert time.perf_counter() - started < 6


def test_a_fast_failure_is_retried_and_a_short_retry_after_honoured(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    cloud.set_fault("status", status=429, retry_after=1, times=1)
    proxy = serve(chain(cloud, backup, {"retries": 1}))
    started = time.perf_counter()
    with sdk(proxy) as client:
        answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert answer.headers["x-proxy-provider"] == "cloud" and cloud.request_count == 2
    assert time.perf_counter() - started >= 1.0


def test_a_long_retry_after_goes_to_the_next_node(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    cloud.set_fault("status", status=429, retry_after=60, times=1)
    proxy = serve(chain(cloud, backup, {"retries": 2}))
    with sdk(proxy) as client:
        answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert answer.headers["x-proxy-provider"] == "backup" and cloud.request_count == 1


def test_a_content_filter_refusal_goes_back_to_the_client(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    cloud.set_fault("status", status=400, error_code="content_policy_violation")
    proxy = serve(chain(cloud, backup))
    with sdk(proxy) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default", messages=MESSAGES)
    assert caught.value.response.headers["x-proxy-fallbacks"] == "cloud=content_filtered"
    assert backup.request_count == 0


@pytest.mark.parametrize(
    "route",
    [
        {"chain": ["cloud", "backup"], "fallback_on_content_filter": True},
        {"first": "cloud", "on": {"cloud": {"content_filtered": "backup"}}},
    ],
    ids=["chain-opt-in", "graph-edge"],
)
def test_a_route_may_fall_back_on_a_content_filter(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, route: dict[str, Any]
) -> None:
    cloud.set_fault("status", status=400, error_code="content_policy_violation")
    config = chain(cloud, backup)
    config["routes"] = {"default": route}
    with sdk(serve(config)) as client:
        answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert answer.headers["x-proxy-provider"] == "backup"


def behind_an_open_breaker(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> ServedApp:
    """A proxy over the cloud-then-backup chain whose cloud's breaker one failure opened (for 300 s)."""
    config = chain(cloud, backup)
    config["health"] = {"failure_threshold": 1, "cooldown_seconds": 300}
    proxy = serve(config)
    cloud.set_fault("status", status=500, times=1)
    with sdk(proxy) as client:
        client.chat.completions.create(model="default", messages=MESSAGES)
    return proxy


@pytest.mark.parametrize("stream", [False, True])
def test_the_last_resort_before_a_dead_end(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, stream: bool
) -> None:
    """The cloud recovered a moment ago but its breaker is still open; then the
    local model stops. Rather than 503 until the next probe, the cloud is tried."""
    proxy = behind_an_open_breaker(serve, cloud, backup)
    assert httpx.get(proxy.url + "/readyz").json()["health"]["cloud"]["breaker"] == "open"
    backup.stop()
    with sdk(proxy) as client:
        answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, stream=stream)
        assert answer.headers["x-proxy-provider"] == "cloud"
        assert answer.headers["x-proxy-last-resort"] == "cloud"
    health = httpx.get(proxy.url + "/readyz").json()["health"]["cloud"]
    assert health["breaker"] == "closed"  # the trial answered: the cloud is back


def test_a_last_resort_stream_that_dies_mid_answer_ends_with_an_honest_error(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    """The walk ran out (the backup is down, the cloud's breaker open), the cloud
    answered as the last resort, then its connection broke after the first
    chunks: no one is left to continue, so the stream ends with the in-band
    error and `[DONE]`, not a cut connection (found by the soak: a continuation
    after a last resort walked on from an exhausted walk and raised)."""
    proxy = behind_an_open_breaker(serve, cloud, backup)
    backup.stop()
    cloud.set_fault("die_midstream", after_chunks=2)
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json={"model": "default", "messages": MESSAGES, "stream": True}
    ) as answer:
        assert answer.headers["x-proxy-last-resort"] == "cloud"
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["code"] == "stream_interrupted", error
    texts = "".join(
        choice["delta"].get("content") or "" for event in events[:-2] for choice in json.loads(event)["choices"]
    )
    assert texts and "Hello from cloud.".startswith(texts), texts


def test_a_provider_switched_off_by_an_operator_is_no_last_resort(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    config = chain(cloud, backup)
    config["server"] = {"admin_key": "admin-secret"}
    proxy = serve(config)
    headers = {"authorization": "Bearer admin-secret"}
    assert httpx.post(proxy.url + "/admin/providers/cloud/disable", headers=headers).status_code == 200
    backup.stop()
    with sdk(proxy) as client, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="default", messages=MESSAGES)
    assert caught.value.status_code == 503 and cloud.request_count == 0


def test_a_small_context_window_still_answers_without_max_tokens(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI
) -> None:
    proxy = serve(
        {"providers": {"small": openai_provider(cloud.url, context_window=300)}, "routes": {"default": ["small"]}}
    )
    with sdk(proxy) as client:
        answer = client.chat.completions.create(model="default", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello from cloud."


@pytest.fixture
def local() -> Iterator[FakeOllama]:
    with FakeOllama("local") as fake:
        yield fake


@pytest.mark.litellm
@pytest.mark.parametrize("asked", [{"n": 2}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 2}])
def test_what_a_wire_format_cannot_carry_is_never_silently_dropped(
    serve: Callable[..., ServedApp], local: FakeOllama, cloud: FakeOpenAI, asked: dict[str, Any]
) -> None:
    providers = {
        "local": {"model": "ollama_chat/qwen2.5:7b", "api_base": local.url, "local": True},
        "cloud": openai_provider(cloud.url),
    }
    proxy = serve({"providers": providers, "routes": {"default": ["local", "cloud"], "private": ["local"]}})
    with sdk(proxy) as client:
        answer = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, **asked)
        assert answer.headers["x-proxy-provider"] == "cloud"
        assert answer.headers["x-proxy-fallbacks"] == "local=unsupported"
        assert answer.headers["x-proxy-attempts"] == "1" and answer.headers["x-proxy-skips"] == "1"
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="private", messages=MESSAGES, **asked)
    assert caught.value.status_code == 503 and "wire format cannot give" in str(caught.value.message)
    assert local.request_count == 0


class NoModelsEndpoint(FakeOpenAI):
    """An OpenAI-compatible server that answers chat but has no `GET /v1/models`."""

    def _routes(self) -> list[BaseRoute]:
        return [route for route in super()._routes() if getattr(route, "path", "") != "/v1/models"]


def test_a_probe_endpoint_that_does_not_exist_never_takes_the_provider_out(
    serve: Callable[..., ServedApp],
) -> None:
    with NoModelsEndpoint("bare") as bare:
        config = {
            "providers": {"bare": openai_provider(bare.url)},
            "routes": {"default": ["bare"]},
            "health": {"probe_interval_seconds": 0.1, "failure_threshold": 1},
        }
        proxy = serve(config)
        probes = 'fallback_proxy_probes_total{outcome="server_error",provider="bare"} 1.0'
        deadline = time.monotonic() + 5
        while probes not in httpx.get(proxy.url + "/metrics").text:  # the first probe's 404
            assert time.monotonic() < deadline, "no probe was made"
            time.sleep(0.05)
        with sdk(proxy) as client:
            for _ in range(3):  # across many probe intervals
                assert client.chat.completions.create(model="default", messages=MESSAGES).choices
                time.sleep(0.3)  # the interval is the point: three probe intervals pass, no probe comes
        assert httpx.get(proxy.url + "/readyz").json()["health"]["bare"]["state"] == "healthy"
        assert probes in httpx.get(proxy.url + "/metrics").text  # probed once, then never again


def test_a_plain_call_that_hangs_is_left_at_its_total_deadline(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    """`stream_upstream: false`: one plain exchange, bounded only by `total`."""
    proxy = serve(
        {
            "providers": {
                "cloud": openai_provider(cloud.url, stream_upstream=False, timeout={"total": 0.5}),
                "backup": openai_provider(backup.url),
            },
            "routes": {"default": ["cloud", "backup"]},
        }
    )
    cloud.set_fault("hang")
    with sdk(proxy) as client:
        raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-fallbacks"] == "cloud=timeout" and raw.headers["x-proxy-provider"] == "backup"
    assert raw.parse().choices[0].message.content == "Hello from backup."


def test_embeddings_that_hang_are_left_at_the_first_token_deadline(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    model = "text-embedding-3-small"
    proxy = serve(
        {
            "providers": {
                "cloud": openai_provider(cloud.url, model=f"openai/{model}", timeout={"first_token": 0.5}),
                "backup": openai_provider(backup.url, model=f"openai/{model}"),
            },
            "routes": {"embed": ["cloud", "backup"]},
        }
    )
    cloud.set_fault("hang")
    with sdk(proxy) as client:
        raw = client.embeddings.with_raw_response.create(model="embed", input="hi")
    assert raw.headers["x-proxy-fallbacks"] == "cloud=timeout" and raw.headers["x-proxy-provider"] == "backup"
    assert len(raw.parse().data[0].embedding) > 0
