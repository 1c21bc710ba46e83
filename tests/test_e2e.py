"""End to end over real sockets: the official openai SDK -> the proxy -> fake providers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.adapters import AttemptLimits, Chunk
from proxy.adapters.openai_compat import OpenAICompatAdapter
from proxy.fakes import FakeOpenAI
from proxy.stream.encoders import ChatEncoder

from .conftest import ServedApp, openai_provider, request_log

FAST = {"connect": 1, "first_token": 1, "total": 3, "idle": 1}


def two_provider_config(cloud: FakeOpenAI, backup: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "providers": {
            "cloud": openai_provider(cloud.url, timeout=FAST),
            "backup": openai_provider(backup.url, timeout=FAST),
        },
        "routes": {"default": ["cloud", "backup"]},
        **extra,
    }


@pytest.fixture
def proxy(serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI) -> ServedApp:
    return serve(two_provider_config(cloud, backup))


@pytest.fixture
def client(proxy: ServedApp) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


def test_non_stream_answer_comes_from_first_provider(client: openai.OpenAI, cloud: FakeOpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from cloud."
    assert completion.model == "gpt-test"
    assert raw.headers["x-proxy-route"] == "default"
    assert raw.headers["x-proxy-provider"] == "cloud"
    assert raw.headers["x-proxy-attempts"] == "1"
    assert "x-proxy-fallbacks" not in raw.headers
    assert cloud.requests[0].body["model"] == "gpt-test"
    assert cloud.requests[0].headers["authorization"] == "Bearer sk-upstream"


def test_stream_answer_is_one_openai_stream(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="default", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["x-proxy-provider"] == "cloud"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from cloud."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


FAULTS = [
    pytest.param({"kind": "status", "status": 500}, "server_error", id="500"),
    pytest.param({"kind": "status", "status": 503}, "server_error", id="503"),
    pytest.param({"kind": "status", "status": 429, "retry_after": 30}, "rate_limited", id="429"),
    pytest.param({"kind": "status", "status": 401}, "auth_error", id="401"),
    pytest.param(
        {"kind": "status", "status": 400, "error_code": "context_length_exceeded"},
        "context_window_exceeded",
        id="context",
    ),
    pytest.param({"kind": "hang"}, "timeout", id="hang"),
    pytest.param({"kind": "slow", "first_token_delay": 5}, "timeout", id="slow"),
    pytest.param({"kind": "stream_error", "after_chunks": 0}, "server_error", id="stream-error"),
    pytest.param({"kind": "die_midstream", "after_chunks": 0}, None, id="die"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("fault", "expected"), FAULTS)
def test_fallback_on_each_failure_class(
    client: openai.OpenAI,
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    fault: dict[str, Any],
    expected: str | None,
    stream: bool,
) -> None:
    cloud.set_fault(**fault)
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="default", messages=MESSAGES, stream=True
        ) as response:
            headers = response.headers
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
        headers = raw.headers
        text = raw.parse().choices[0].message.content or ""
    assert text == "Hello from backup."
    assert headers["x-proxy-provider"] == "backup"
    assert headers["x-proxy-attempts"] == "2"
    reason = headers["x-proxy-fallbacks"].removeprefix("cloud=")
    if expected is None:  # a connection dropped before any answer: reset or incomplete stream
        assert reason in {"connection_error", "server_error"}
    else:
        assert reason == expected


def test_refused_connection_falls_back(client: openai.OpenAI, cloud: FakeOpenAI) -> None:
    cloud.stop()
    raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.headers["x-proxy-fallbacks"] == "cloud=connection_error"
    assert raw.parse().choices[0].message.content == "Hello from backup."


def test_headers_held_until_first_token(client: openai.OpenAI, cloud: FakeOpenAI) -> None:
    """The cloud starts a 200 stream but never sends a token: the client sees
    only the backup's answer, with no trace of the failed start but the headers."""
    cloud.set_fault("slow", first_token_delay=10)
    with client.chat.completions.with_streaming_response.create(
        model="default", messages=MESSAGES, stream=True
    ) as response:
        chunks = list(response.parse())
        assert response.headers["x-proxy-fallbacks"] == "cloud=timeout"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from backup."


def test_failure_after_first_token_is_continued_by_the_next_provider(
    client: openai.OpenAI, cloud: FakeOpenAI, backup: FakeOpenAI, proxy: ServedApp
) -> None:
    cloud.set_fault("die_midstream", after_chunks=2)
    with client.chat.completions.with_streaming_response.create(
        model="default", messages=MESSAGES, stream=True
    ) as response:
        assert response.headers["x-proxy-provider"] == "cloud"  # sent before the failure
        raw = response.http_response.read().decode()
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1  # one stream, whoever answered
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # The cloud sent "Hello from"; the backup, asked to continue, started over
    # ("Hello from backup."): what the client already had is dropped, not repeated.
    assert text == "Hello from backup."
    assert ": fallback-proxy continued this stream across providers: cloud,backup" in raw
    sent = backup.requests[-1].body["messages"]
    assert sent[-2] == {"role": "assistant", "content": "Hello from"}
    assert sent[-1]["role"] == "user" and "Continue" in sent[-1]["content"]
    metrics = httpx.get(proxy.url + "/metrics").text
    assert (
        'fallback_proxy_continuations_total{from_provider="cloud",reason="connection_error",route="default",'
        'to_provider="backup"} 1.0'
    ) in metrics


def test_failure_after_first_token_without_continuation_ends_with_inband_error(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    config = two_provider_config(cloud, backup)
    config["routes"] = {"default": {"chain": ["cloud", "backup"], "continuation": False}}
    proxy = serve(config)
    cloud.set_fault("die_midstream", after_chunks=2)
    received: list[str] = []
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.APIError) as caught:
            for chunk in sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True):
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
    text = "".join(received)
    assert text and "Hello from cloud.".startswith(text) and text != "Hello from cloud."
    assert "cloud" in str(caught.value.message)
    assert backup.request_count == 0


def test_plain_client_error_is_returned_without_fallback(
    client: openai.OpenAI, cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    cloud.set_fault("status", status=400)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default", messages=MESSAGES)
    assert caught.value.status_code == 400
    assert backup.request_count == 0


def test_all_providers_failed(client: openai.OpenAI, cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    cloud.set_fault("status", status=503)
    backup.set_fault("status", status=429)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="default", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 503
    assert error.code == "all_providers_failed"
    assert "cloud: server_error" in error.message and "backup: rate_limited" in error.message
    assert error.response.headers["x-proxy-fallbacks"] == "cloud=server_error,backup=rate_limited"


def test_single_provider_as_model_has_no_fallback(client: openai.OpenAI, cloud: FakeOpenAI, backup: FakeOpenAI) -> None:
    cloud.set_fault("status", status=503)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="cloud", messages=MESSAGES)
    assert backup.request_count == 0
    assert client.chat.completions.create(model="backup", messages=MESSAGES).choices[0].message.content == (
        "Hello from backup."
    )


@pytest.mark.asyncio
async def test_async_client_stream_and_plain(proxy: ServedApp, cloud: FakeOpenAI) -> None:
    cloud.set_fault("status", status=500, times=1)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(model="default", messages=MESSAGES)
        assert completion.choices[0].message.content == "Hello from backup."
        stream = await sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello from cloud."


# -- errors the user can cause -------------------------------------------------------------


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code", "param"} <= set(body["error"])
    return dict(body["error"])


def test_malformed_json_is_400(proxy: ServedApp, http: httpx.Client) -> None:
    response = http.post(
        proxy.url + "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in _error(response)["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "default"},
        {"model": "default", "messages": []},
        {"model": "default", "messages": "hi"},
        {"model": "default", "messages": [{"content": "no role"}]},
        {"model": "default", "messages": [{"role": "user", "content": 42}]},
    ],
)
def test_bad_messages_are_400(proxy: ServedApp, http: httpx.Client, body: dict[str, Any]) -> None:
    response = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert _error(response)["param"].startswith("messages")


def test_unknown_model_is_404_listing_what_exists(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "default" in caught.value.message and "cloud" in caught.value.message


def test_oversized_body_is_413(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = serve(two_provider_config(cloud, backup, server={"max_body_bytes": 1000}))
    big = {"model": "default", "messages": [{"role": "user", "content": "x" * 2000}]}
    response = http.post(proxy.url + "/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"
    assert cloud.request_count == 0


def test_unknown_path_is_openai_shaped_404(proxy: ServedApp, http: httpx.Client) -> None:
    response = http.get(proxy.url + "/v1/nothing-here")
    assert response.status_code == 404
    assert _error(response)["type"] == "invalid_request_error"


# -- auth ----------------------------------------------------------------------------------


def test_bearer_keys(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = serve(two_provider_config(cloud, backup, auth={"keys": ["team-key-1", "team-key-2"]}))
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            sdk.chat.completions.create(model="default", messages=MESSAGES)
    missing = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "default", "messages": MESSAGES})
    assert missing.status_code == 401
    assert _error(missing)["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="team-key-2", max_retries=0) as sdk:
        assert sdk.chat.completions.create(model="default", messages=MESSAGES).choices[0].message.content
    assert cloud.request_count == 1
    assert "team-key" not in caplog.text and "sk-upstream" not in caplog.text


# -- transparency --------------------------------------------------------------------------


def test_request_log_line(client: openai.OpenAI, cloud: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fallback_proxy.request")
    cloud.set_fault("status", status=503)
    client.chat.completions.create(model="default", messages=MESSAGES)
    lines = request_log(caplog)
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "default" and line["provider"] == "backup" and line["status"] == 200
    assert [(a["provider"], a["outcome"]) for a in line["attempts"]] == [("cloud", "server_error"), ("backup", "ok")]
    assert line["tokens"]["completion"] > 0 and line["total_ms"] > 0 and line["request_id"]


def test_metrics_count_attempts_and_fallbacks(
    client: openai.OpenAI, cloud: FakeOpenAI, proxy: ServedApp, http: httpx.Client
) -> None:
    cloud.set_fault("status", status=429)
    client.chat.completions.create(model="default", messages=MESSAGES)
    text = http.get(proxy.url + "/metrics").text
    assert 'fallback_proxy_attempts_total{outcome="rate_limited",provider="cloud"} 1.0' in text
    assert (
        'fallback_proxy_fallbacks_total{from_provider="cloud",reason="rate_limited",route="default",'
        'to_provider="backup"} 1.0'
    ) in text
    assert 'fallback_proxy_requests_total{outcome="ok",provider="backup",route="default"} 1.0' in text
    assert "fallback_proxy_request_duration_seconds_bucket" in text


def test_models_health_ready(proxy: ServedApp, http: httpx.Client, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["default", "cloud", "backup"]
    assert http.get(proxy.url + "/healthz").json() == {"status": "ok"}
    ready = http.get(proxy.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_a_bug_is_one_logged_500_and_the_connection_stays_usable(
    serve: Callable[..., ServedApp], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: OpenAICompatAdapter, body: dict[str, Any], limits: AttemptLimits) -> AsyncIterator[Chunk]:
        raise RuntimeError("a bug in the transport")
        yield  # an async generator, as the adapter's stream is

    async def broken_reads(
        self: OpenAICompatAdapter, body: dict[str, Any], limits: AttemptLimits
    ) -> AsyncIterator[list[dict[str, Any]]]:
        raise RuntimeError("a bug in the transport")
        yield  # as the adapter's parsed reads are

    monkeypatch.setattr(OpenAICompatAdapter, "stream", broken)
    monkeypatch.setattr(OpenAICompatAdapter, "parsed_reads", broken_reads)  # what a non-stream request reads
    proxy = serve({"providers": {"p": openai_provider("http://upstream.invalid")}, "routes": {"default": ["p"]}})
    with httpx.Client(base_url=proxy.url) as http_client:
        response = http_client.post("/v1/chat/completions", json={"model": "default", "messages": MESSAGES})
        assert response.status_code == 500 and _error(response)["code"] == "internal_error"
        assert "a bug in the transport" not in response.text  # no traceback to the client
        assert http_client.get("/healthz").status_code == 200  # same keep-alive connection
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == ["unexpected error on POST /v1/chat/completions"]  # logged once, by the proxy


def test_a_bug_mid_stream_ends_the_stream_with_an_error_the_sdk_raises(
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug after the first chunks went out: the client gets an in-band
    `internal_error` and the stream's end (the SDK raises it as an API error,
    not a broken connection); the proxy logs the bug once, with its traceback."""
    sent = 0
    chunk = ChatEncoder.chunk

    def buggy(self: ChatEncoder, piece: Chunk, continuing: bool) -> bytes:
        nonlocal sent
        sent += 1
        if sent > 2:
            raise RuntimeError("a bug in the encoder")
        return chunk(self, piece, continuing)

    monkeypatch.setattr(ChatEncoder, "chunk", buggy)
    proxy = serve({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    texts = []
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(model="default", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            for event in stream:
                texts.extend(choice.delta.content or "" for choice in event.choices)
    assert "internal error" in caught.value.message and "a bug in the encoder" not in caught.value.message
    assert not isinstance(caught.value, openai.APIConnectionError)
    assert "Hello from cloud.".startswith("".join(texts))
    assert [line["outcome"] for line in request_log(caplog)] == ["internal_error"]
    deadline = time.monotonic() + 5  # the server logs the bug as the response task ends, after the client's last read
    while not (tracebacks := [r for r in caplog.records if r.exc_info]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [str(r.exc_info[1]) for r in tracebacks if r.exc_info] == ["a bug in the encoder"]
