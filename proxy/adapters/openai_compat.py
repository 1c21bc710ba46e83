"""Relay to any server that speaks OpenAI's chat-completions wire format.

OpenAI, Together, Groq, vLLM, Ollama's `/v1`, LM Studio and friends. The
request is re-encoded only to put the upstream model name in; answers are
passed through as the upstream's bytes, parsed once with orjson to learn
what the relay needs (content seen, finish, usage) and never re-encoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from proxy.adapters import classify
from proxy.adapters.base import Chunk, Completion, Limits, Usage, describe
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.relay import iter_sse


class OpenAICompatAdapter:
    """Adapter for OpenAI-compatible upstreams over the app's pooled client."""

    def __init__(self, provider: ProviderConfig, client: httpx.AsyncClient) -> None:
        if not provider.api_base:
            raise ValueError(f"provider {provider.name!r} needs an api_base")
        self.provider = provider
        self._client = client
        base = provider.api_base.rstrip("/")
        self._url = base + "/chat/completions"
        self._models_url = base + "/models"
        headers = {"content-type": "application/json", "accept": "application/json"}
        if provider.api_key:
            headers["authorization"] = f"Bearer {provider.api_key}"
        headers.update(provider.headers)
        self._headers = headers
        self._stream_headers = {**headers, "accept": "text/event-stream"}

    def __repr__(self) -> str:
        return f"OpenAICompatAdapter({self.provider.name!r}, {self._url!r})"

    def _encode(self, body: dict[str, Any], stream: bool) -> bytes:
        upstream = dict(body)
        upstream["model"] = self.provider.upstream_model
        upstream["stream"] = stream
        if not stream:
            upstream.pop("stream_options", None)
        return orjson.dumps(upstream)

    @staticmethod
    def _timeout(limits: Limits) -> httpx.Timeout:
        return httpx.Timeout(connect=limits.connect, read=limits.read, write=limits.connect, pool=limits.connect)

    async def complete(self, body: dict[str, Any], limits: Limits) -> Completion:
        request = self._client.build_request(
            "POST", self._url, content=self._encode(body, False), headers=self._headers, timeout=self._timeout(limits)
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                content = await _read_capped(response, limits.max_bytes)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise classify.from_exception(exc) from exc
        if response.status_code >= 400:
            raise classify.from_status(response.status_code, content, response.headers)
        return _completion(content)

    async def stream(self, body: dict[str, Any], limits: Limits) -> AsyncIterator[Chunk]:
        request = self._client.build_request(
            "POST", self._url, content=self._encode(body, True), headers=self._stream_headers,
            timeout=self._timeout(limits),
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise classify.from_exception(exc) from exc
        try:
            if response.status_code >= 400:
                raise classify.from_status(response.status_code, await response.aread(), response.headers)
            async for chunk in _chunks(response, limits.max_bytes):
                yield chunk
        except httpx.HTTPError as exc:
            raise classify.from_exception(exc) from exc
        finally:
            await response.aclose()

    async def warmup(self) -> None:
        """A local OpenAI-compatible server that is Ollama (`.../v1`): load the
        model and keep it resident through the native API (`keep_alive: -1`)."""
        base = self.provider.api_base or ""
        if not (self.provider.local and base.rstrip("/").endswith("/v1")):
            return
        native = base.rstrip("/")[: -len("/v1")] + "/api/generate"
        payload = {"model": self.provider.upstream_model, "prompt": "", "keep_alive": -1}
        timeouts = self.provider.timeout
        try:
            response = await self._client.post(
                native, content=orjson.dumps(payload), headers=self._headers,
                timeout=httpx.Timeout(connect=timeouts.connect, read=timeouts.total, write=timeouts.connect,
                                      pool=timeouts.connect),
            )
        except httpx.HTTPError as exc:
            raise classify.from_exception(exc) from exc
        if response.status_code >= 400:
            raise classify.from_status(response.status_code, response.content, response.headers)

    async def probe(self, limits: Limits) -> None:
        try:
            response = await self._client.get(self._models_url, headers=self._headers, timeout=self._timeout(limits))
        except httpx.HTTPError as exc:
            raise classify.from_exception(exc) from exc
        if response.status_code >= 400:
            raise classify.from_status(response.status_code, response.content, response.headers)


def _completion(content: bytes) -> Completion:
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(FailureClass.SERVER_ERROR, "upstream answered 2xx with a body that is not JSON") from exc
    if not isinstance(parsed, dict) or "error" in parsed or not isinstance(parsed.get("choices"), list):
        raise classify.from_stream_error(parsed)
    model = parsed.get("model")
    return Completion(body=content, model=model if isinstance(model, str) else "", usage=Usage.from_openai(parsed.get("usage")))


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(part)
    return b"".join(parts)


def _too_large(max_bytes: int) -> ProviderError:
    return ProviderError(FailureClass.SERVER_ERROR, f"the answer is larger than limits.max_upstream_bytes ({max_bytes})")


async def _capped(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        yield chunk


async def _chunks(response: httpx.Response, max_bytes: int) -> AsyncIterator[Chunk]:
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        # Some servers ignore `stream: true` and answer one JSON body.
        body = await response.aread()
        raise ProviderError(
            FailureClass.SERVER_ERROR,
            f"asked for a stream, got {response.headers.get('content-type') or 'no content type'}: {body[:120]!r}",
        )
    finished = False
    async for _event, data in iter_sse(_capped(response.aiter_bytes(), max_bytes)):
        if data == b"[DONE]":
            return
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProviderError(FailureClass.SERVER_ERROR, f"malformed stream event: {data[:120]!r}") from exc
        if not isinstance(parsed, dict):
            raise ProviderError(FailureClass.SERVER_ERROR, f"malformed stream event: {data[:120]!r}")
        if "error" in parsed:
            raise classify.from_stream_error(parsed)
        chunk = describe(data, parsed)
        finished = finished or chunk.finish_reason is not None
        yield chunk
    if not finished:
        raise classify.incomplete_stream()
