"""Embeddings in non-OpenAI wire formats, with litellm's embedding transformations.

Ollama's `/api/embed` and Gemini's `batchEmbedContents` are built and read by
litellm's own request and answer functions for them; the call goes over the
shared aiohttp session, as for chat. A provider litellm has no such functions
for goes through `litellm.aembedding` (see `acompletion`).

    OpenAI embeddings body ─► litellm: URL, headers, body ─► our pooled aiohttp session
    upstream JSON ─► litellm: `EmbeddingResponse` ─► OpenAI `list` of `embedding`s

Both take text only: token-array input is kept off them by `shaping.eligibility`.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

import orjson

from proxy.adapters.base import Embeddings, Usage
from proxy.adapters.translated.wire import gemini_auth_and_url
from proxy.config import ProviderConfig

# What the client's body may carry for Ollama's `/api/embed` besides `input` and `dimensions`.
_OLLAMA_EXTRAS: Final = ("truncate", "keep_alive", "options")


def texts_of(body: dict[str, Any]) -> str | list[str]:
    """The body's `input` as text (a string or a list of strings)."""
    value = body["input"]
    if isinstance(value, str):
        return value
    return [str(item) for item in value]


def openai_list(answer: Any, model: str) -> dict[str, Any]:
    """A litellm `EmbeddingResponse` as OpenAI's `list` object (its items may be
    dicts or `Embedding` objects, depending on the provider's code)."""
    data = []
    for index, item in enumerate(answer.data or ()):
        vector = item["embedding"] if isinstance(item, dict) else item.embedding
        position = item.get("index", index) if isinstance(item, dict) else getattr(item, "index", index)
        data.append({"object": "embedding", "index": position, "embedding": vector})
    usage = answer.usage
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def embeddings_of(data: dict[str, Any]) -> Embeddings:
    usage = data["usage"]
    return Embeddings(data=data, model=data["model"], usage=Usage(prompt_tokens=usage["prompt_tokens"]))


class Embedder:
    """One provider's embeddings endpoint, through litellm's functions for it."""

    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        self.provider = provider
        self.model = provider.upstream_model
        self._response: Any = litellm.EmbeddingResponse

    def request(self, body: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
        """URL, headers and body of the upstream request."""
        raise NotImplementedError

    def answer(self, body: dict[str, Any], content: bytes) -> Embeddings:
        """The upstream's answer in OpenAI's shape."""
        raise NotImplementedError


class OllamaEmbedder(Embedder):
    """`POST /api/embed` (Ollama 0.3.4 and later): every input in one call."""

    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        handler = importlib.import_module("litellm.llms.ollama.completion.handler")
        self._payload: Any = handler._prepare_ollama_embedding_payload
        self._process: Any = handler._process_ollama_embedding_response
        self.url = (provider.api_base or "http://localhost:11434").rstrip("/") + "/api/embed"

    def request(self, body: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
        texts = texts_of(body)
        params: dict[str, Any] = {key: body[key] for key in _OLLAMA_EXTRAS if key in body}
        if body.get("dimensions") is not None:
            params["dimensions"] = body["dimensions"]
        if self.provider.warmup:  # a preloaded model stays resident (see `TranslatedAdapter._split`)
            params.setdefault("keep_alive", -1)
        payload = self._payload(self.model, [texts] if isinstance(texts, str) else texts, params)
        headers = {"content-type": "application/json", **self.provider.headers}
        if self.provider.api_key is not None and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.provider.api_key}"
        return self.url, headers, orjson.dumps(payload)

    def answer(self, body: dict[str, Any], content: bytes) -> Embeddings:
        parsed = orjson.loads(content)
        texts = texts_of(body)
        answer = self._process(
            response_json=parsed,
            prompts=[texts] if isinstance(texts, str) else texts,
            model=self.model,
            model_response=self._response(),
            logging_obj=None,
            encoding=None,
        )
        served = parsed.get("model") if isinstance(parsed, dict) else None
        return embeddings_of(openai_list(answer, served if isinstance(served, str) and served else self.model))


class GeminiEmbedder(Embedder):
    """Google AI Studio's `models/{model}:batchEmbedContents`: one request per input, in one call."""

    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        gemini = importlib.import_module("litellm.llms.vertex_ai.gemini.vertex_and_google_ai_studio_gemini")
        transformation = importlib.import_module(
            "litellm.llms.vertex_ai.gemini_embeddings.batch_embed_content_transformation"
        )
        self._vertex: Any = gemini.VertexLLM()
        self._transform: Any = transformation.transform_openai_input_gemini_content
        self._process: Any = transformation.process_response

    def request(self, body: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
        auth, url = gemini_auth_and_url(self._vertex, self.provider, self.model, stream=None, mode="batch_embedding")
        params = {"dimensions": body["dimensions"]} if body.get("dimensions") is not None else {}
        data = self._transform(input=texts_of(body), model=self.model, optional_params=params)
        headers = {"content-type": "application/json", **(auth if isinstance(auth, dict) else {})}
        headers.update(self.provider.headers)
        return url, headers, orjson.dumps(data)

    def answer(self, body: dict[str, Any], content: bytes) -> Embeddings:
        answer = self._process(
            input=texts_of(body), model_response=self._response(), model=self.model, _predictions=orjson.loads(content)
        )
        return embeddings_of(openai_list(answer, self.model))


EMBEDDERS: Final[dict[str, type[Embedder]]] = {
    "ollama": OllamaEmbedder,
    "ollama_chat": OllamaEmbedder,
    "gemini": GeminiEmbedder,
}
