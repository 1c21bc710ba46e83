"""The native dialects: Anthropic Messages, Ollama's `/api/chat` (NDJSON) and Gemini, each
with litellm's translation for its headers, URL, body and answers, and its stream parser."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import orjson

from proxy.adapters.translated.wire import (
    ANTHROPIC_BASE,
    GEMINI_BASE,
    Call,
    Parser,
    Piece,
    gemini_auth_and_url,
    malformed,
    piece_of,
    read_event,
)
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.sse import Framing


class Dialect:
    """One wire format spoken through litellm's config class for it."""

    framing: Framing = "sse"

    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        self.provider = provider
        self.model = provider.upstream_model
        utils = importlib.import_module("litellm.utils")
        self.config: Any = utils.ProviderConfigManager.get_provider_chat_config(
            model=self.model, provider=litellm.LlmProviders(provider.litellm_provider)
        )
        self._model_response: Any = litellm.ModelResponse

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        """URL, headers and body of the upstream request."""
        raise NotImplementedError

    def parser(self, call: Call, headers: Mapping[str, str]) -> Parser:
        raise NotImplementedError

    def answer(self, call: Call, response: httpx.Response, parsed: dict[str, Any]) -> Any:
        """The upstream's whole answer as a litellm `ModelResponse`."""
        return self.config.transform_response(
            model=self.model,
            raw_response=response,
            model_response=self._model_response(),
            logging_obj=call.log,
            request_data=call.data,
            messages=call.messages,
            optional_params=call.optional_params,
            litellm_params=call.litellm_params,
            encoding=None,
            api_key=self.provider.api_key,
            json_mode=call.json_mode,
        )

    def served_model(self, answer: Any, parsed: dict[str, Any]) -> str:
        model = answer.model
        return model if isinstance(model, str) and model else self.model

    def _headers(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], api_base: str
    ) -> Any:
        """litellm's headers for a call to `api_base` (auth included), over the provider's own."""
        return self.config.validate_environment(
            headers=dict(self.provider.headers),
            model=self.model,
            messages=messages,
            optional_params=optional_params,
            litellm_params=litellm_params,
            api_key=self.provider.api_key,
            api_base=api_base,
        )

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        return None

    def check_probe(self, body: bytes) -> None:
        pass


class Anthropic(Dialect):
    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        base = (provider.api_base or ANTHROPIC_BASE).rstrip("/")
        root = base.removesuffix("/v1/messages")
        self.url = root + "/v1/messages"
        self.models_url = root + "/v1/models"
        handler = importlib.import_module("litellm.llms.anthropic.chat.handler")
        transformation = importlib.import_module("litellm.llms.anthropic.chat.transformation")
        betas = importlib.import_module("litellm.anthropic_beta_headers_manager")
        self._iterator: Any = handler.ModelResponseIterator
        self._reverse_map_key: str = transformation.ANTHROPIC_TOOL_NAME_REVERSE_MAP_KEY
        self._filter_betas: Any = betas.update_request_with_filtered_beta
        # `validate_environment` asks this of the model map on every call (~0.2 ms:
        # provider resolution and a model-info walk); the answer is fixed per model
        # name, and the config object is this adapter's own.
        self.config._is_adaptive_thinking_model = functools.lru_cache(maxsize=16)(
            self.config._is_adaptive_thinking_model
        )

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        optional_params.pop("stream", None)
        optional_params.pop("vertex_count_tokens_location", None)
        params = {**optional_params, "is_vertex_request": False}
        headers = self._headers(messages, params, litellm_params, self.url)
        data = self.config.transform_request(
            model=self.model, messages=messages, optional_params=params, litellm_params=litellm_params, headers=headers
        )
        headers, data = self._filter_betas(headers=headers, request_data=data, provider="anthropic")
        if stream:
            data["stream"] = True
        return self.url, headers, data

    def parser(self, call: Call, headers: Mapping[str, str]) -> Parser:
        def litellms() -> Any:
            return self._iterator(
                streaming_response=None,
                sync_stream=False,
                json_mode=call.json_mode,
                speed=call.optional_params.get("speed"),
                tool_name_reverse_map=call.litellm_params.get(self._reverse_map_key),
            )

        return AnthropicParser(litellms, plain=not call.json_mode)

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        headers = self._headers([], {}, {}, self.url)
        return self.models_url, headers


class AnthropicParser(Parser):
    """Anthropic SSE events (`event: error` included).

    To litellm's parser a `text` delta is exactly its text and touches no state,
    so it is always answered here, as are `ping` and `message_stop`. While the
    answer is plain text with plain usage (input and output tokens only: the
    common case), the other events are read here too, giving what litellm gives
    (tests compare both): litellm's parser, and its pydantic objects, cost more
    than the rest of the stream. The first event that is anything else (a tool
    call, thinking, cache or server-tool usage, JSON mode) hands the stream to
    litellm's parser, which is first shown the `message_start` it missed."""

    def __init__(self, litellms: Callable[[], Any], *, plain: bool) -> None:
        super().__init__(None)
        self._litellms = litellms
        self._plain = plain
        self._start: dict[str, Any] | None = None  # message_start, for litellm if it takes over
        self._input_tokens = 0
        self._block: object = None  # the type of the content block under way, while plain

    def feed(self, data: bytes) -> Piece | None:
        event = read_event(data)
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                return Piece(content=delta["text"])
        elif kind == "ping":
            return None
        elif kind == "message_stop":
            self.complete = True
            return None
        if self._plain:
            piece = self._plain_piece(kind, event)
            if not isinstance(piece, _NotPlain):
                return piece
            self._plain = False
        return piece_of(self._litellm().chunk_parser(chunk=event))

    def _litellm(self) -> Any:
        if self.iterator is None:
            self.iterator = self._litellms()
            if self._start is not None:
                self.iterator.chunk_parser(chunk=self._start)  # its model and input tokens
        return self.iterator

    def _plain_piece(self, kind: object, event: dict[str, Any]) -> Piece | _NotPlain | None:
        """The piece of a plain event, or `_NOT_PLAIN`."""
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if not isinstance(message, dict) or not _plain_usage(usage):
                return _NOT_PLAIN
            assert isinstance(usage, dict)
            self._start, self._input_tokens = event, usage.get("input_tokens", 0)
            model = message.get("model")
            return Piece(
                model=model if isinstance(model, str) and model else None,
                usage=_usage(self._input_tokens, usage.get("output_tokens", 0)),
            )
        if kind == "content_block_start":
            block = event.get("content_block")
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                return _NOT_PLAIN
            self._block = "text"
            return Piece(content=block["text"] or None)
        if kind == "content_block_stop" and self._block == "text":
            self._block = None
            return None
        if kind == "message_delta" and event.keys() <= _MESSAGE_DELTA_KEYS:
            delta, usage = event.get("delta"), event.get("usage")
            if not isinstance(delta, dict) or not _plain_usage(usage):
                return _NOT_PLAIN
            assert isinstance(usage, dict)
            self._input_tokens = usage.get("input_tokens", self._input_tokens)
            reason = delta.get("stop_reason")
            return Piece(
                finish_reason=reason if isinstance(reason, str) else None,
                usage=_usage(self._input_tokens, usage.get("output_tokens", 0)),
            )
        return _NOT_PLAIN


class _NotPlain:
    """Not a plain event: litellm reads it."""


_NOT_PLAIN: Final = _NotPlain()
_PLAIN_USAGE_KEYS: Final = frozenset({"input_tokens", "output_tokens"})
_MESSAGE_DELTA_KEYS: Final = frozenset({"type", "delta", "usage"})


def _plain_usage(usage: object) -> bool:
    return (
        isinstance(usage, dict)
        and usage.keys() <= _PLAIN_USAGE_KEYS
        and all(type(value) is int for value in usage.values())
    )


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    """litellm's usage for plain Anthropic tokens, as `model_dump(exclude_none=True)` writes it."""
    return {
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": completion},
        "prompt_tokens_details": {
            "cache_write_tokens": 0,
            "cached_tokens": 0,
            "text_tokens": prompt,
            "cache_creation_tokens": 0,
        },
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


class Ollama(Dialect):
    framing: Framing = "ndjson"

    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        self.base = (provider.api_base or "http://localhost:11434").rstrip("/")
        transformation = importlib.import_module("litellm.llms.ollama.chat.transformation")
        self._iterator: Any = transformation.OllamaChatCompletionResponseIterator

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = self._headers(messages, optional_params, litellm_params, self.base)
        url = self.config.get_complete_url(
            api_base=self.base,
            api_key=self.provider.api_key,
            model=self.model,
            optional_params=optional_params,
            litellm_params=litellm_params,
            stream=stream,
        )
        data = self.config.transform_request(
            model=self.model,
            messages=messages,
            optional_params=optional_params,
            litellm_params=litellm_params,
            headers=headers,
        )
        headers.setdefault("content-type", "application/json")
        return url, headers, data

    def parser(self, call: Call, headers: Mapping[str, str]) -> Parser:
        return _OllamaParser(self._iterator(streaming_response=None, sync_stream=False, json_mode=call.json_mode))

    def served_model(self, answer: Any, parsed: dict[str, Any]) -> str:
        # litellm reports "ollama_chat/<requested>"; the daemon says what it ran.
        model = parsed.get("model")
        return model if isinstance(model, str) and model else self.model

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        return self.base + "/api/tags", self.auth_headers()

    def auth_headers(self) -> dict[str, str]:
        headers = dict(self.provider.headers)
        if self.provider.api_key is not None and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.provider.api_key}"
        return headers

    def check_probe(self, body: bytes) -> None:
        wanted = self.model if ":" in self.model else self.model + ":latest"
        try:
            tags = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise malformed("/api/tags answer", body) from exc
        models = tags.get("models") if isinstance(tags, dict) else None
        names = {
            name
            for entry in (models if isinstance(models, list) else [])
            if isinstance(entry, dict)
            for name in (entry.get("name"), entry.get("model"))
        }
        if wanted not in names:
            message = f"model '{wanted}' not pulled on {self.base} (ollama pull {wanted})"
            raise ProviderError(FailureClass.SERVER_ERROR, message)


class _OllamaParser(Parser):
    """Ollama NDJSON lines (`{"error": ...}` included). To litellm's parser a line
    of plain content, before any reasoning and without tool calls, is exactly its
    content, so it is answered here; the others (the `done` line too) go to it."""

    def feed(self, data: bytes) -> Piece | None:
        line = read_event(data)
        message = line.get("message")
        if line.get("done") is True:
            self.complete = True
        elif (
            isinstance(message, dict)
            and not message.get("tool_calls")
            and not message.get("thinking")
            and not self.iterator.started_reasoning_content
        ):
            content = message.get("content")
            if isinstance(content, str) and "<think>" not in content:
                model = line.get("model")
                return Piece(content=content or None, model=model if isinstance(model, str) else None)
        return piece_of(self.iterator.chunk_parser(chunk=line))


class Gemini(Dialect):
    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        gemini = importlib.import_module("litellm.llms.vertex_ai.gemini.vertex_and_google_ai_studio_gemini")
        transformation = importlib.import_module("litellm.llms.vertex_ai.gemini.transformation")
        self._vertex: Any = gemini.VertexLLM()
        self._iterator: Any = gemini.ModelResponseIterator
        self._transform_body: Any = transformation._transform_request_body
        self.base = (provider.api_base or GEMINI_BASE).rstrip("/")

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        optional_params.pop("stream", None)
        auth, url = gemini_auth_and_url(self._vertex, self.provider, self.model, stream=stream)
        headers = self.config.validate_environment(
            api_key=auth,
            headers=dict(self.provider.headers) or None,
            model=self.model,
            messages=messages,
            optional_params=optional_params,
            litellm_params=litellm_params,
        )
        # Context caching (a `cached_content` request to Google first) is not
        # translated: an explicit `cached_content` name is passed through.
        data = self._transform_body(
            messages=messages,
            model=self.model,
            optional_params=optional_params,
            custom_llm_provider="gemini",
            litellm_params=litellm_params,
            cached_content=optional_params.pop("cached_content", None),
        )
        return url, headers, data

    def parser(self, call: Call, headers: Mapping[str, str]) -> Parser:
        iterator = self._iterator(
            streaming_response=None, sync_stream=False, logging_obj=call.log, response_headers=headers
        )
        return _GeminiParser(iterator)

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        headers = dict(self.provider.headers)
        if self.provider.api_key:
            headers["x-goog-api-key"] = self.provider.api_key
        return self.base + "/models", headers


class _GeminiParser(Parser):
    """Gemini `streamGenerateContent?alt=sse` events (an `error` object included);
    the answer is complete once a candidate carries a finish reason."""

    def feed(self, data: bytes) -> Piece | None:
        piece = piece_of(self.iterator.chunk_parser(chunk=read_event(data)))
        if piece is not None and piece.finish_reason:
            self.complete = True
        return piece


DIALECTS: Final[dict[str, type[Dialect]]] = {"anthropic": Anthropic, "ollama_chat": Ollama, "gemini": Gemini}
