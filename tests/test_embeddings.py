"""`POST /v1/embeddings` end to end: the official SDK -> the proxy -> fake providers in each
wire format; fallback only within one embedding space; formats converted; quotas counted."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from proxy.adapters import Embeddings, Usage
from proxy.config import ConfigError, parse_config
from proxy.embeddings import answer_body, to_base64
from proxy.fakes import FakeGemini, FakeOllama, FakeOpenAI, fake_vector

from .conftest import ServedApp, openai_provider, request_log

FAST = {"connect": 1, "first_token": 2, "total": 5, "idle": 2}


def embedder(url: str, model: str = "text-embedding-3-small", **extra: Any) -> dict[str, Any]:
    return {"model": f"openai/{model}", "api_key": "sk-upstream", "api_base": url + "/v1", "timeout": FAST, **extra}


@pytest.fixture
def third() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("third") as fake:
        yield fake


@pytest.fixture
def sdk() -> Iterator[Callable[[ServedApp], openai.OpenAI]]:
    """`sdk(proxy)`: an SDK client of the proxy, closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(proxy: ServedApp) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(a, b, strict=True))


def test_sdk_default_base64_round_trip(
    sdk: Callable[[ServedApp], openai.OpenAI], serve: Callable[..., ServedApp], cloud: FakeOpenAI
) -> None:
    """The SDK asks for base64 and decodes it itself: the vectors are the provider's."""
    proxy = serve({"providers": {"cloud": embedder(cloud.url)}, "routes": {"embed": ["cloud"]}})
    raw = sdk(proxy).embeddings.with_raw_response.create(model="embed", input=["hello world", "bye"])
    answer = raw.parse()
    CreateEmbeddingResponse.model_validate(answer.model_dump())
    assert [item.index for item in answer.data] == [0, 1]
    assert close(answer.data[0].embedding, fake_vector("text-embedding-3-small", "hello world"))
    assert close(answer.data[1].embedding, fake_vector("text-embedding-3-small", "bye"))
    assert answer.model == "text-embedding-3-small"
    assert answer.usage.prompt_tokens == 3 and answer.usage.total_tokens == 3
    assert raw.headers["x-proxy-provider"] == "cloud" and raw.headers["x-proxy-attempts"] == "1"
    sent = cloud.requests[0].body
    assert sent["encoding_format"] == "base64" and sent["model"] == "text-embedding-3-small"


@pytest.mark.parametrize("floats_only", [False, True], ids=["relayed", "converted"])
def test_formats_and_dimensions(
    sdk: Callable[[ServedApp], openai.OpenAI], serve: Callable[..., ServedApp], floats_only: bool
) -> None:
    """float and base64, `dimensions` and token arrays; a server that only answers full-length
    floats (Ollama's /v1) is converted: base64 encoded, shortened and scaled to unit length."""
    with FakeOllama("local", model="nomic-embed-text:v1.5") as local, FakeOpenAI("cloud") as cloud:
        url, model = (local.url, "nomic-embed-text:v1.5") if floats_only else (cloud.url, "text-embedding-3-small")
        proxy = serve({"providers": {"p": embedder(url, model)}, "routes": {"embed": ["p"]}})
        client = sdk(proxy)
        floats = client.embeddings.create(model="embed", input="one two", encoding_format="float")
        assert close(floats.data[0].embedding, fake_vector(model, "one two"))
        short = client.embeddings.create(model="embed", input="one two", dimensions=4, encoding_format="float")
        vector = short.data[0].embedding
        assert len(vector) == 4 and math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-5)
        assert close(vector, fake_vector(model, "one two", 4))
        encoded = httpx.post(
            proxy.url + "/v1/embeddings",
            json={"model": "embed", "input": [[1, 2, 3], [4]], "encoding_format": "base64", "dimensions": 8},
        ).json()
        first = encoded["data"][0]["embedding"]
        assert isinstance(first, str)
        decoded = list(struct.unpack("<8f", base64.b64decode(first)))
        assert close(decoded, fake_vector(model, "1,2,3", 8))
        assert len(encoded["data"]) == 2


def test_fallback_within_one_space(
    sdk: Callable[[ServedApp], openai.OpenAI],
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    third: FakeOpenAI,
) -> None:
    """The route goes cloud -> other (another model) -> backup (cloud's model): when cloud
    fails, `other` is skipped without a call, naming both spaces, and backup answers."""
    config = {
        "providers": {
            "cloud": embedder(cloud.url),
            "other": embedder(third.url, "text-embedding-3-large"),
            "backup": embedder(backup.url, embedding_space="text-embedding-3-small-v1"),
            "azure-like": embedder(backup.url, "te3s", embedding_space="text-embedding-3-small-v1"),
        },
        "routes": {"embed": ["cloud", "other", "backup"], "named": ["backup", "other", "azure-like"]},
    }
    config["providers"]["cloud"]["embedding_space"] = "text-embedding-3-small-v1"
    proxy = serve(config)
    cloud.set_fault("status", status=503)
    raw = sdk(proxy).embeddings.with_raw_response.create(model="embed", input="hi")
    assert raw.headers["x-proxy-provider"] == "backup"
    assert raw.headers["x-proxy-fallbacks"] == "cloud=server_error,other=unsupported"
    assert third.request_count == 0
    assert close(raw.parse().data[0].embedding, fake_vector("text-embedding-3-small", "hi"))
    backup.set_fault("status", status=500, times=1)
    named = sdk(proxy).embeddings.with_raw_response.create(model="named", input="hi")
    assert named.headers["x-proxy-provider"] == "azure-like"
    assert named.headers["x-proxy-fallbacks"] == "backup=server_error,other=unsupported"


def test_no_provider_left_in_the_space_is_a_503_saying_so(
    sdk: Callable[[ServedApp], openai.OpenAI],
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    third: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = {
        "providers": {"cloud": embedder(cloud.url), "other": embedder(third.url, "text-embedding-3-large")},
        "routes": {"embed": ["cloud", "other"]},
    }
    proxy = serve(config)
    cloud.set_fault("status", status=500)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(proxy).embeddings.create(model="embed", input="hi")
    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 503 and error["code"] == "all_providers_failed"
    assert "No provider of embedding space 'openai/text-embedding-3-small'" in error["message"]
    assert "'openai/text-embedding-3-large' is not the route's 'openai/text-embedding-3-small'" in error["message"]
    assert third.request_count == 0
    lines = request_log(caplog)
    assert lines[-1]["endpoint"] == "embeddings" and lines[-1]["status"] == 503


def test_bad_input_is_a_400(serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client) -> None:
    proxy = serve({"providers": {"cloud": embedder(cloud.url)}, "routes": {"embed": ["cloud"]}})
    cases = [
        ({"model": "embed"}, "input"),
        ({"model": "embed", "input": ""}, "input"),
        ({"model": "embed", "input": ["a", 1]}, "input"),
        ({"model": "embed", "input": [[1], []]}, "input"),
        ({"model": "embed", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "embed", "input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a"}, "model"),
    ]
    for body, param in cases:
        answer = http.post(proxy.url + "/v1/embeddings", json=body)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["param"] == param
    missing = http.post(proxy.url + "/v1/embeddings", json={"model": "nope", "input": "a"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert cloud.request_count == 0


def test_quota_counts_embedding_tokens(
    sdk: Callable[[ServedApp], openai.OpenAI], serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI
) -> None:
    """`tokens_per_day` is spent by the input's real tokens (the provider's usage):
    12 words a call (estimated 16 before it), 35 a day: the third call goes to the next provider."""
    quota = {"tokens_per_day": 35}
    proxy = serve(
        {
            "providers": {"cloud": embedder(cloud.url, quota=quota), "backup": embedder(backup.url)},
            "routes": {"embed": ["cloud", "backup"]},
        }
    )
    text = " ".join(["word"] * 12)
    client = sdk(proxy)
    who = [client.embeddings.with_raw_response.create(model="embed", input=text).headers for _ in range(3)]
    assert [h["x-proxy-provider"] for h in who] == ["cloud", "cloud", "backup"]
    assert who[2]["x-proxy-fallbacks"] == "cloud=quota_exhausted"


def test_answer_body_converts_only_what_needs_it() -> None:
    vector = [0.6, 0.8, 0.0]
    raw = json.dumps({"object": "list", "data": [{"index": 0, "embedding": vector}], "model": "m"}).encode()
    parsed = json.loads(raw)
    answer = Embeddings(data=parsed, model="m", usage=Usage(prompt_tokens=2), raw=raw)
    assert answer_body(answer, {"input": "x"}) is raw
    as_base64 = json.loads(answer_body(answer, {"input": "x", "encoding_format": "base64"}))
    assert as_base64["data"][0]["embedding"] == to_base64(vector)
    assert as_base64["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    shortened = json.loads(answer_body(answer, {"input": "x", "dimensions": 1}))
    assert shortened["data"][0]["embedding"] == [1.0]


@pytest.mark.litellm
def test_ollama_native_api_embed(sdk: Callable[[ServedApp], openai.OpenAI], serve: Callable[..., ServedApp]) -> None:
    """`ollama/` providers speak `/api/embed` through litellm's Ollama embedding functions."""
    with FakeOllama("local", model="nomic-embed-text:v1.5") as local:
        provider = {"model": "ollama/nomic-embed-text:v1.5", "api_base": local.url, "timeout": FAST}
        proxy = serve({"providers": {"local": provider}, "routes": {"embed": ["local"]}})
        answer = sdk(proxy).embeddings.create(model="embed", input=["a b c", "d"], dimensions=6)
        sent = local.requests[-1]
        assert sent.path == "/api/embed"
        assert sent.body == {"model": "nomic-embed-text:v1.5", "input": ["a b c", "d"], "dimensions": 6}
    assert close(answer.data[1].embedding, fake_vector("nomic-embed-text:v1.5", "d", 6))
    assert answer.usage.prompt_tokens == 4 and answer.model == "nomic-embed-text:v1.5"


@pytest.mark.litellm
def test_gemini_batch_embed_contents_with_fallback(
    sdk: Callable[[ServedApp], openai.OpenAI], serve: Callable[..., ServedApp]
) -> None:
    """`gemini/` providers speak `batchEmbedContents` (litellm's transformation); the first
    Gemini fails, the second (same model: same space) answers; a token-array input is not
    sent to either (Gemini reads text only)."""
    with FakeGemini("g1", api_key="g-key") as first, FakeGemini("g2", api_key="g-key") as second:
        providers = {
            name: {
                "model": "gemini/text-embedding-004",
                "api_key": "g-key",
                "api_base": fake.url + "/v1beta",
                "timeout": FAST,
            }
            for name, fake in (("g1", first), ("g2", second))
        }
        proxy = serve({"providers": providers, "routes": {"embed": ["g1", "g2"]}})
        first.set_fault("status", status=429)
        raw = sdk(proxy).embeddings.with_raw_response.create(model="embed", input=["x y", "z"], dimensions=5)
        answer = raw.parse()
        assert raw.headers["x-proxy-fallbacks"] == "g1=rate_limited" and raw.headers["x-proxy-provider"] == "g2"
        sent = second.requests[-1]
        assert sent.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
        assert sent.headers["x-goog-api-key"] == "g-key"
        assert [r["outputDimensionality"] for r in sent.body["requests"]] == [5, 5]
        assert close(answer.data[0].embedding, fake_vector("text-embedding-004", "x y", 5))
        assert answer.usage.prompt_tokens > 0
        tokens = httpx.post(proxy.url + "/v1/embeddings", json={"model": "embed", "input": [1, 2]})
        assert tokens.status_code == 503
        assert "token-array input needs an OpenAI-format provider" in tokens.json()["error"]["message"]


def test_openai_provider_metrics_by_endpoint(
    sdk: Callable[[ServedApp], openai.OpenAI], serve: Callable[..., ServedApp], cloud: FakeOpenAI, http: httpx.Client
) -> None:
    proxy = serve({"providers": {"cloud": openai_provider(cloud.url)}, "routes": {"default": ["cloud"]}})
    sdk(proxy).embeddings.create(model="default", input="a")
    sdk(proxy).chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
    text = http.get(proxy.url + "/metrics").text
    assert 'fallback_proxy_endpoint_requests_total{endpoint="embeddings",outcome="ok",route="default"} 1.0' in text
    assert 'fallback_proxy_endpoint_requests_total{endpoint="chat",outcome="ok",route="default"} 1.0' in text
    assert 'fallback_proxy_requests_total{outcome="ok",provider="cloud",route="default"} 2.0' in text


def test_embedding_space_config() -> None:
    config = parse_config(
        {
            "providers": {
                "a": {"model": "openai/text-embedding-3-small", "api_key": "k", "embedding_space": "te3s"},
                "b": {"model": "openai/text-embedding-3-small", "api_key": "k"},
            },
            "routes": {"r": ["a", "b"]},
        },
        environ={},
    )
    assert config.providers["a"].space == "te3s" and config.providers["b"].space == "openai/text-embedding-3-small"
    with pytest.raises(ConfigError, match=r"providers\.a\.embedding_space: expected a string"):
        parse_config(
            {"providers": {"a": {"model": "openai/x", "api_key": "k", "embedding_space": 3}}, "routes": {"r": ["a"]}},
            environ={},
        )
