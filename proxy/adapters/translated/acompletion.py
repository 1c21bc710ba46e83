"""Providers without a native dialect: `litellm.acompletion` over our pooled httpx client,
with an HTTP handler that never retries on its own."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from proxy.adapters import classify
from proxy.adapters.base import AttemptLimits, Chunk, Completion, Embeddings, Usage, with_trace
from proxy.adapters.translated.embed import embeddings_of, openai_list
from proxy.adapters.translated.wire import (
    TRANSLATED_TRANSPORT_ERRORS,
    httpx_timeout,
    json_default,
    translation_errors,
)
from proxy.config import ProviderConfig
from proxy.errors import ProviderError


class Acompletion:
    """Providers without a translated dialect go through `litellm.acompletion`,
    with an HTTP handler that sends over our client and never retries on one of
    its own. Slower (litellm's whole machinery), same contract."""

    def __init__(self, provider: ProviderConfig, client: httpx.AsyncClient, litellm: Any) -> None:
        self._provider = provider
        self._litellm = litellm
        # what a litellm call may raise: the connection's failures, and litellm's own
        self._caught: tuple[type[BaseException], ...] = (*TRANSLATED_TRANSPORT_ERRORS, *translation_errors(litellm))
        self._handler = _pooled_handler(client)

    def _kwargs(
        self, params: tuple[dict[str, Any], dict[str, Any]], body: dict[str, Any], limits: AttemptLimits
    ) -> dict[str, Any]:
        named, extras = orjson.loads(orjson.dumps(params))  # litellm edits what it is given
        provider = self._provider
        return {
            **extras,
            **{key: value for key, value in named.items() if key != "stream"},
            "model": provider.model,
            "messages": orjson.loads(orjson.dumps(body.get("messages") or [])),
            "api_base": provider.api_base,
            "api_key": provider.api_key,
            "extra_headers": dict(with_trace(provider.headers)) or None,
            "client": self._handler,
            "timeout": httpx_timeout(limits),
            "drop_params": True,
            "num_retries": 0,
            "max_retries": 0,
        }

    async def complete(
        self, params: tuple[dict[str, Any], dict[str, Any]], body: dict[str, Any], limits: AttemptLimits
    ) -> Completion:
        try:
            answer = await self._litellm.acompletion(**self._kwargs(params, body, limits), stream=False)
        except self._caught as exc:
            raise self._failure(exc) from exc
        out: dict[str, Any] = answer.model_dump()
        model = out.get("model") if isinstance(out.get("model"), str) else self._provider.upstream_model
        return Completion(
            body=orjson.dumps(out, default=json_default), model=str(model), usage=Usage.from_openai(out.get("usage"))
        )

    async def stream(
        self, params: tuple[dict[str, Any], dict[str, Any]], body: dict[str, Any], limits: AttemptLimits
    ) -> AsyncIterator[Chunk]:
        try:
            wrapper = await self._litellm.acompletion(**self._kwargs(params, body, limits), stream=True)
        except self._caught as exc:
            raise self._failure(exc) from exc
        finished = False
        try:
            async for part in wrapper:
                dumped = part.model_dump(exclude_none=True)
                for choice in dumped.get("choices") or ():
                    choice.setdefault("finish_reason", None)
                chunk = Chunk.from_dict(dumped)
                finished = finished or chunk.finish_reason is not None
                yield chunk
        except self._caught as exc:
            raise self._failure(exc) from exc
        finally:
            await wrapper.aclose()
        if not finished:
            raise classify.incomplete_stream()

    def _failure(self, exc: BaseException) -> ProviderError:
        """A litellm call's failure, classified: the connection's, or litellm's own."""
        if isinstance(exc, TRANSLATED_TRANSPORT_ERRORS):
            return classify.from_exception(exc)
        return classify.from_litellm(exc)

    async def embed(self, body: dict[str, Any], limits: AttemptLimits) -> Embeddings:
        """`litellm.aembedding`, for providers without embedding functions of our own;
        floats are asked for (a base64 answer is encoded by the caller)."""
        provider = self._provider
        extras = {key: body[key] for key in ("dimensions", "user") if body.get(key) is not None}
        try:
            answer = await self._litellm.aembedding(
                model=provider.model,
                input=orjson.loads(orjson.dumps(body["input"])),
                api_base=provider.api_base,
                api_key=provider.api_key,
                extra_headers=dict(provider.headers) or None,
                timeout=httpx_timeout(limits),
                drop_params=True,
                num_retries=0,
                max_retries=0,
                **extras,
            )
        except self._caught as exc:
            raise self._failure(exc) from exc
        model = answer.model if isinstance(answer.model, str) and answer.model else provider.upstream_model
        return embeddings_of(openai_list(answer, model))


def _pooled_handler(client: httpx.AsyncClient) -> Any:
    """A litellm `AsyncHTTPHandler` whose POSTs go through `client`, without the
    retry-on-a-fresh-client litellm does after a refused or reset connection."""
    http: Any = importlib.import_module("litellm.llms.custom_httpx.http_handler")
    base: Any = http.AsyncHTTPHandler

    class PooledHandler(base):  # type: ignore[misc]
        def __init__(self) -> None:  # the base would build a client of its own
            self.timeout = None
            self.event_hooks = None
            self.ssl_verify = None
            self.shared_session = None
            self.client_alias = "fallback-proxy"
            self._client = client
            self._owns_client = False

        async def post(
            self,
            url: str,
            data: Any = None,
            json: Any = None,
            params: Any = None,
            headers: Any = None,
            timeout: Any = None,
            stream: bool = False,
            logging_obj: Any = None,
            files: Any = None,
            content: Any = None,
        ) -> httpx.Response:
            request_data, request_content = http._prepare_request_data_and_content(data, content)
            request = client.build_request(
                "POST",
                url,
                data=request_data,
                json=json,
                params=params,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                files=files,
                content=request_content,
            )
            response = await client.send(request, stream=stream)
            response.raise_for_status()
            return response

    return PooledHandler()
