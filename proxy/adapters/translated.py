"""The adapter for every non-OpenAI wire format: litellm translates, we do the I/O.

litellm is used only for its per-provider translation: the provider config
classes (`AnthropicConfig`, `OllamaChatConfig`, `GoogleAIStudioGeminiConfig`)
map OpenAI parameters, build the headers, URL and body, turn a whole answer
into a `ModelResponse`, and their chunk parsers turn stream events into
`ModelResponseStream`s. Its `acompletion` machinery (logging objects,
callbacks, cost tracking, `CustomStreamWrapper`, private HTTP clients that
retry on their own) is skipped: it costs ~10 ms of CPU per call and ~40 ms
per stream, where this path spends about a millisecond in litellm's
translation per call or stream, plus one orjson encode per chunk.

    OpenAI body ─► optional params (memoised) ─► config: headers, URL, body ─► our pooled aiohttp session
    upstream bytes ─► config: whole answer or chunk parser ─► OpenAI JSON, one encode

Plain text deltas (nearly every chunk of a stream) skip the chunk parser when
its answer is known to be exactly the text; anything else goes through it.

Providers other than anthropic, ollama_chat and gemini go through
`litellm.acompletion` (slower, same classification), with an HTTP handler
that sends over our pooled httpx client and never retries on one of its own.
"""

from __future__ import annotations

import functools
import importlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import httpx
import orjson

from proxy.adapters import classify
from proxy.adapters.base import Chunk, Completion, HttpClients, Limits, Usage
from proxy.adapters.http import (
    TRANSPORT_ERRORS,
    attempt_timeout,
    done_with,
    fetch,
    read_capped,
    too_large,
)
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.litellm_import import load_litellm

# Failures of the connection itself: aiohttp's (the dialects), httpx's (the
# `acompletion` fallback), and a reset socket can surface as a bare OSError.
_TRANSPORT_ERRORS: Final = (*TRANSPORT_ERRORS, httpx.HTTPError)

# The OpenAI parameters litellm's `completion()` hands to `get_optional_params`
# by name; any other body key is a provider-specific extra, unless litellm
# reserves it (api_key, api_base, metadata, ...): those are never forwarded.
_OPENAI_ARGS: Final = frozenset({
    "functions", "function_call", "temperature", "top_p", "n", "stream", "stream_options", "stop",
    "max_tokens", "max_completion_tokens", "modalities", "prediction", "audio", "presence_penalty",
    "frequency_penalty", "logit_bias", "user", "response_format", "seed", "tools", "tool_choice",
    "logprobs", "top_logprobs", "parallel_tool_calls", "reasoning_effort", "verbosity", "thinking",
    "web_search_options", "include_server_side_tool_invocations", "safety_identifier", "service_tier",
    "store", "prompt_cache_key",
})
_PARAMS_CACHE_SIZE: Final = 256
_GEMINI_BASE: Final = "https://generativelanguage.googleapis.com/v1beta"
_ANTHROPIC_BASE: Final = "https://api.anthropic.com"
def _translation_errors(litellm: Any) -> tuple[type[BaseException], ...]:
    """What litellm's translation code raises on input it cannot handle: its own
    exceptions (the openai family and the per-provider `BaseLLMException`s) and
    the plain errors of dict-walking code."""
    base = importlib.import_module("litellm.llms.base_llm.chat.transformation")
    openai = importlib.import_module("openai")
    return (base.BaseLLMException, openai.OpenAIError, ValueError, TypeError, LookupError, AttributeError)


def _timeout(limits: Limits) -> httpx.Timeout:
    return httpx.Timeout(connect=limits.connect, read=limits.read, write=limits.connect, pool=limits.connect)


def _json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is None:
        raise TypeError(f"cannot encode {type(value).__name__}")
    return dump()


def _malformed(what: str, data: bytes) -> ProviderError:
    return ProviderError(FailureClass.SERVER_ERROR, f"malformed {what}: {data[:120]!r}")


class _Log:
    """The slice of litellm's logging object that its transformations touch."""

    __slots__ = ("optional_params", "model_call_details")

    def __init__(self, optional_params: dict[str, Any]) -> None:
        self.optional_params = optional_params  # the client's OpenAI params, as litellm logs them
        self.model_call_details: dict[str, Any] = {}

    def pre_call(self, *args: Any, **kwargs: Any) -> None:
        pass

    def post_call(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass(slots=True)
class _Call:
    """One translated upstream request and the state its answer's translation needs."""

    url: str
    headers: dict[str, str]
    content: bytes
    messages: list[Any]
    optional_params: dict[str, Any]
    litellm_params: dict[str, Any]
    data: dict[str, Any]
    json_mode: bool
    include_usage: bool
    log: _Log


@dataclass(slots=True)
class _Piece:
    """What one upstream stream event adds to the answer."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Any = None
    model: str | None = None


def _piece_of(parsed: Any) -> _Piece | None:
    """Read a litellm `ModelResponseStream` (None: nothing to say)."""
    if parsed is None:
        return None
    piece = _Piece(usage=getattr(parsed, "usage", None), model=parsed.model or None)
    if parsed.choices:
        choice = parsed.choices[0]
        delta = choice.delta
        piece.content = delta.content or None
        piece.reasoning = getattr(delta, "reasoning_content", None) or None
        calls = delta.tool_calls
        if calls:
            piece.tool_calls = [call.model_dump(exclude_none=True) for call in calls]
        piece.finish_reason = choice.finish_reason or None
    return piece


def _usage_dict(usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    if isinstance(usage, dict):
        return usage
    dumped: dict[str, Any] = usage.model_dump(exclude_none=True)
    return dumped


class _Parser:
    """Turns one upstream stream's payloads into pieces, with litellm's chunk
    parser for the provider (`iterator`). `complete` says the upstream ended
    its answer properly."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator
        self.complete = False

    def feed(self, data: bytes) -> _Piece | None:
        raise NotImplementedError


def _event(data: bytes) -> dict[str, Any]:
    """One stream payload as a JSON object; an in-band error raises classified."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _malformed("stream event", data) from exc
    if not isinstance(event, dict):
        raise _malformed("stream event", data)
    if "error" in event:
        raise classify.from_stream_error(event)
    return event


@dataclass(slots=True)
class _Writer:
    """Assembles OpenAI `chat.completion.chunk`s: one id, created and model per stream,
    the role on the first chunk, the finish (and usage) once the upstream is done."""

    model: str
    include_usage: bool
    map_finish_reason: Any
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: bool = False
    saw_tool_calls: bool = False
    finish_reason: str | None = None
    usage: Any = None

    def chunk(self, piece: _Piece) -> Chunk | None:
        if piece.model:
            self.model = piece.model
        if piece.usage is not None:
            self.usage = piece.usage
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
        delta: dict[str, Any] = {}
        if piece.content:
            delta["content"] = piece.content
        if piece.reasoning:
            delta["reasoning_content"] = piece.reasoning
        if piece.tool_calls:
            delta["tool_calls"] = piece.tool_calls
            self.saw_tool_calls = True
        if not delta:
            return None
        return Chunk.from_dict(self._envelope([{"index": 0, "delta": self._role(delta), "finish_reason": None}]))

    def finish(self) -> list[Chunk]:
        reason = self.map_finish_reason(self.finish_reason) if self.finish_reason else "stop"
        if reason == "stop" and self.saw_tool_calls:
            reason = "tool_calls"
        last = Chunk.from_dict(self._envelope([{"index": 0, "delta": self._role({}), "finish_reason": reason}]))
        usage = _usage_dict(self.usage)
        if usage is None:
            return [last]
        if not self.include_usage:
            last.usage = Usage.from_openai(usage)  # for quota accounting; not sent to the client
            return [last]
        tail = self._envelope([])
        tail["usage"] = usage
        return [last, Chunk.from_dict(tail)]

    def _role(self, delta: dict[str, Any]) -> dict[str, Any]:
        if self.started:
            return delta
        self.started = True
        return {"role": "assistant", **delta}

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


class _Dialect:
    """One wire format spoken through litellm's config class for it."""

    framing = "sse"  # or "ndjson"

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

    def parser(self, call: _Call, headers: Mapping[str, str]) -> _Parser:
        raise NotImplementedError

    def answer(self, call: _Call, response: httpx.Response, parsed: dict[str, Any]) -> Any:
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

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        return None

    def check_probe(self, body: bytes) -> None:
        pass


class _Anthropic(_Dialect):
    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        base = (provider.api_base or _ANTHROPIC_BASE).rstrip("/")
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

    def _headers(self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any]) -> Any:
        return self.config.validate_environment(
            headers=dict(self.provider.headers),
            model=self.model,
            messages=messages,
            optional_params=optional_params,
            litellm_params=litellm_params,
            api_key=self.provider.api_key,
            api_base=self.url,
        )

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        optional_params.pop("stream", None)
        optional_params.pop("vertex_count_tokens_location", None)
        params = {**optional_params, "is_vertex_request": False}
        headers = self._headers(messages, params, litellm_params)
        data = self.config.transform_request(
            model=self.model, messages=messages, optional_params=params, litellm_params=litellm_params, headers=headers
        )
        headers, data = self._filter_betas(headers=headers, request_data=data, provider="anthropic")
        if stream:
            data["stream"] = True
        return self.url, headers, data

    def parser(self, call: _Call, headers: Mapping[str, str]) -> _Parser:
        iterator = self._iterator(
            streaming_response=None,
            sync_stream=False,
            json_mode=call.json_mode,
            speed=call.optional_params.get("speed"),
            tool_name_reverse_map=call.litellm_params.get(self._reverse_map_key),
        )
        return _AnthropicParser(iterator)

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        headers = self._headers([], {}, {})
        return self.models_url, headers


class _AnthropicParser(_Parser):
    """Anthropic SSE events (`event: error` included). To litellm's parser a `text`
    delta is exactly its text and touches no state, so it is answered here, as are
    `ping` and `message_stop` (nothing to say); every other event goes to it."""

    def feed(self, data: bytes) -> _Piece | None:
        event = _event(data)
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                return _Piece(content=delta["text"])
        elif kind == "ping":
            return None
        elif kind == "message_stop":
            self.complete = True
            return None
        return _piece_of(self.iterator.chunk_parser(chunk=event))


class _Ollama(_Dialect):
    framing = "ndjson"

    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        self.base = (provider.api_base or "http://localhost:11434").rstrip("/")
        transformation = importlib.import_module("litellm.llms.ollama.chat.transformation")
        self._iterator: Any = transformation.OllamaChatCompletionResponseIterator

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = self.config.validate_environment(
            headers=dict(self.provider.headers),
            model=self.model,
            messages=messages,
            optional_params=optional_params,
            litellm_params=litellm_params,
            api_key=self.provider.api_key,
            api_base=self.base,
        )
        url = self.config.get_complete_url(
            api_base=self.base,
            api_key=self.provider.api_key,
            model=self.model,
            optional_params=optional_params,
            litellm_params=litellm_params,
            stream=stream,
        )
        data = self.config.transform_request(
            model=self.model, messages=messages, optional_params=optional_params, litellm_params=litellm_params,
            headers=headers,
        )
        headers.setdefault("content-type", "application/json")
        return url, headers, data

    def parser(self, call: _Call, headers: Mapping[str, str]) -> _Parser:
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
            raise _malformed("/api/tags answer", body) from exc
        models = tags.get("models") if isinstance(tags, dict) else None
        names = {
            name
            for entry in (models if isinstance(models, list) else [])
            if isinstance(entry, dict)
            for name in (entry.get("name"), entry.get("model"))
        }
        if wanted not in names:
            message = f"model '{wanted}' not pulled on {self.base} (ollama pull {wanted})"
            raise classify.from_status(404, orjson.dumps({"error": message}))


class _OllamaParser(_Parser):
    """Ollama NDJSON lines (`{"error": ...}` included). To litellm's parser a line
    of plain content, before any reasoning and without tool calls, is exactly its
    content, so it is answered here; the others (the `done` line too) go to it."""

    def feed(self, data: bytes) -> _Piece | None:
        line = _event(data)
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
                return _Piece(content=content or None, model=model if isinstance(model, str) else None)
        return _piece_of(self.iterator.chunk_parser(chunk=line))


class _Gemini(_Dialect):
    def __init__(self, provider: ProviderConfig, litellm: Any) -> None:
        super().__init__(provider, litellm)
        gemini = importlib.import_module("litellm.llms.vertex_ai.gemini.vertex_and_google_ai_studio_gemini")
        transformation = importlib.import_module("litellm.llms.vertex_ai.gemini.transformation")
        self._vertex: Any = gemini.VertexLLM()
        self._iterator: Any = gemini.ModelResponseIterator
        self._transform_body: Any = transformation._transform_request_body
        self.base = (provider.api_base or _GEMINI_BASE).rstrip("/")

    def build(
        self, messages: list[Any], optional_params: dict[str, Any], litellm_params: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        optional_params.pop("stream", None)
        auth, url = self._vertex._get_token_and_url(
            model=self.model,
            auth_header=None,
            gemini_api_key=self.provider.api_key,
            vertex_project=None,
            vertex_location=None,
            vertex_credentials=None,
            stream=stream,
            custom_llm_provider="gemini",
            api_base=self.provider.api_base,
        )
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

    def parser(self, call: _Call, headers: Mapping[str, str]) -> _Parser:
        iterator = self._iterator(
            streaming_response=None, sync_stream=False, logging_obj=call.log, response_headers=headers
        )
        return _GeminiParser(iterator)

    def probe_request(self) -> tuple[str, dict[str, str]] | None:
        headers = dict(self.provider.headers)
        if self.provider.api_key:
            headers["x-goog-api-key"] = self.provider.api_key
        return self.base + "/models", headers


class _GeminiParser(_Parser):
    """Gemini `streamGenerateContent?alt=sse` events (an `error` object included);
    the answer is complete once a candidate carries a finish reason."""

    def feed(self, data: bytes) -> _Piece | None:
        piece = _piece_of(self.iterator.chunk_parser(chunk=_event(data)))
        if piece is not None and piece.finish_reason:
            self.complete = True
        return piece


_DIALECTS: Final[dict[str, type[_Dialect]]] = {"anthropic": _Anthropic, "ollama_chat": _Ollama, "gemini": _Gemini}


class _Framer:
    """The payloads of a stream, block by block: each SSE event's `data`, or each NDJSON line."""

    __slots__ = ("_sse", "_buffer", "_data")

    def __init__(self, framing: str) -> None:
        self._sse = framing == "sse"
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, block: bytes) -> list[bytes]:
        lines = (self._buffer + block if self._buffer else block).split(b"\n")
        self._buffer = lines.pop()
        payloads: list[bytes] = []
        data = self._data
        for line in lines:
            if not self._sse:
                if line.strip():
                    payloads.append(line)
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif not line.rstrip(b"\r") and data:
                payloads.append(b"\n".join(data))
                data.clear()
        return payloads

    def flush(self) -> list[bytes]:
        """What remains when the upstream closes (a last event or line without its end)."""
        buffer, data, payloads = self._buffer, self._data, []
        self._buffer = b""
        if buffer.startswith(b"data:"):
            data.append(buffer[5:].strip())
        elif buffer.strip() and not self._sse:
            payloads.append(buffer)
        if data:
            payloads.append(b"\n".join(data))
            data.clear()
        return payloads


class TranslatedAdapter:
    """Adapter for providers litellm translates (Anthropic, Ollama's native API,
    Gemini, and through `acompletion` any other), over the app's pooled clients:
    the aiohttp session for the dialects, the httpx client for `acompletion`."""

    def __init__(self, provider: ProviderConfig, clients: HttpClients) -> None:
        self.provider = provider
        self._session = clients.session
        litellm = load_litellm()
        self._errors = _translation_errors(litellm)
        self._get_optional_params: Any = importlib.import_module("litellm.utils").get_optional_params
        core = importlib.import_module("litellm.litellm_core_utils.core_helpers")
        self._map_finish_reason: Any = core.map_finish_reason
        reserved = importlib.import_module("litellm.types.utils").all_litellm_params
        self._reserved = frozenset(litellm.OPENAI_CHAT_COMPLETION_PARAMS) | frozenset(reserved) | {"model", "messages"}
        self._params_cache: OrderedDict[bytes, bytes] = OrderedDict()
        dialect = _DIALECTS.get(provider.litellm_provider)
        self._dialect: _Dialect | None = dialect(provider, litellm) if dialect is not None else None
        self._fallback = _Acompletion(provider, clients.client, litellm) if dialect is None else None

    def __repr__(self) -> str:
        how = "acompletion" if self._dialect is None else type(self._dialect).__name__.strip("_").lower()
        return f"TranslatedAdapter({self.provider.name!r}, {self.provider.model!r}, via={how})"

    # -- the adapter protocol ------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], limits: Limits) -> Completion:
        if self._dialect is None:
            assert self._fallback is not None
            return await self._fallback.complete(self._split(body), body, limits)
        call = self._prepare(self._dialect, body, stream=False)
        answer = await fetch(self._session, "POST", call.url, headers=call.headers, data=call.content, limits=limits)
        # litellm reads a whole answer from an httpx response: one is built, no I/O.
        raw = httpx.Response(answer.status, headers=list(answer.headers.items()), content=answer.content)
        return self._completion(self._dialect, call, raw)

    async def stream(self, body: dict[str, Any], limits: Limits) -> AsyncGenerator[Chunk, None]:
        if self._dialect is None:
            assert self._fallback is not None
            async for chunk in self._fallback.stream(self._split(body), body, limits):
                yield chunk
            return
        dialect = self._dialect
        call = self._prepare(dialect, body, stream=True)
        try:
            response = await self._post(call, limits)
        except _TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        try:
            if response.status >= 400:
                content = await read_capped(response, limits.max_bytes)
                raise classify.from_status(response.status, content, response.headers)
            # Socket bytes → payloads → litellm's parser → OpenAI chunks, in this generator.
            parser: _Parser = self._reading(dialect.parser, call, response.headers)
            writer = _Writer(self.provider.upstream_model, call.include_usage, self._map_finish_reason)
            framer = _Framer(dialect.framing)
            reader = response.content
            max_bytes = limits.max_bytes
            size = 0
            try:
                while block := await reader.readany():
                    size += len(block)
                    if size > max_bytes:
                        raise too_large(max_bytes)
                    for data in framer.feed(block):
                        piece: _Piece | None = self._reading(parser.feed, data)
                        if piece is not None and (out := writer.chunk(piece)) is not None:
                            yield out
                for data in framer.flush():
                    piece = self._reading(parser.feed, data)
                    if piece is not None and (out := writer.chunk(piece)) is not None:
                        yield out
            except _TRANSPORT_ERRORS:
                # After the upstream's own end of answer, a broken tail loses nothing.
                if not parser.complete:
                    raise
            if not parser.complete:
                raise classify.incomplete_stream()
            for last in writer.finish():
                yield last
        except _TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        finally:
            done_with(response)

    async def probe(self, limits: Limits) -> None:
        if self._dialect is None:
            return
        dialect = self._dialect
        try:
            target = dialect.probe_request()
        except self._errors as exc:
            raise classify.untranslatable(exc) from exc
        if target is None:
            return
        url, headers = target
        content = await self._exchange("GET", url, headers, None, limits)
        dialect.check_probe(content)

    async def warmup(self) -> None:
        """Load an Ollama model and keep it resident (`keep_alive: -1`); a no-op elsewhere."""
        if not isinstance(self._dialect, _Ollama):
            return
        dialect = self._dialect
        timeouts = self.provider.timeout
        payload = {"model": dialect.model, "prompt": "", "keep_alive": -1}
        headers = {"content-type": "application/json", **dialect.auth_headers()}
        limits = Limits(connect=timeouts.connect, read=timeouts.total)
        await self._exchange("POST", dialect.base + "/api/generate", headers, orjson.dumps(payload), limits)

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None, limits: Limits
    ) -> bytes:
        """A small request, read whole: its body, or the classified failure."""
        return (await fetch(self._session, method, url, headers=headers, data=data, limits=limits)).content

    # -- translation ---------------------------------------------------------------------------

    def _reading(self, step: Any, *args: Any) -> Any:
        """Run one litellm step that reads the upstream's answer; what it raises leaves classified."""
        try:
            return step(*args)
        except self._errors as exc:
            raise classify.unreadable(exc) from exc

    def _split(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The body's OpenAI params and provider extras (litellm's reserved names dropped)."""
        named: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for key, value in body.items():
            if key in _OPENAI_ARGS:
                named[key] = value
            elif key not in self._reserved:
                extras[key] = value
        # A preloaded Ollama model stays resident unless the client says otherwise:
        # a request without keep_alive would reset it to the daemon's 5 minutes.
        if self.provider.warmup and self.provider.litellm_provider == "ollama_chat":
            extras.setdefault("keep_alive", -1)
        return named, extras

    def _optional_params(self, named: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        """litellm's provider params for these OpenAI params. Pure in its inputs
        (the model and provider are fixed per adapter), so memoised by their JSON;
        each call gets a fresh copy since the transformations mutate it."""
        key = orjson.dumps((named, extras))
        cached = self._params_cache.get(key)
        if cached is None:
            own_named, own_extras = orjson.loads(key)  # litellm may edit what it is given
            params = self._get_optional_params(
                model=self.provider.upstream_model,
                custom_llm_provider=self.provider.litellm_provider,
                drop_params=True,
                **own_extras,
                **own_named,
            )
            cached = orjson.dumps(params, default=_json_default)
            self._params_cache[key] = cached
            if len(self._params_cache) > _PARAMS_CACHE_SIZE:
                self._params_cache.popitem(last=False)
        else:
            self._params_cache.move_to_end(key)
        fresh: dict[str, Any] = orjson.loads(cached)
        return fresh

    def _prepare(self, dialect: _Dialect, body: dict[str, Any], *, stream: bool) -> _Call:
        named, extras = self._split(body)
        named["stream"] = stream
        stream_options = named.get("stream_options")
        include_usage = stream and isinstance(stream_options, dict) and stream_options.get("include_usage") is True

        def translate() -> _Call:
            # A private copy: the transformations edit messages in place, and the
            # caller may send the same body to the next provider.
            messages = dialect.config.translate_developer_role_to_system_role(
                messages=orjson.loads(orjson.dumps(body.get("messages") or []))
            )
            optional_params = self._optional_params(named, extras)
            json_mode = bool(optional_params.pop("json_mode", False))
            extra_body = optional_params.pop("extra_body", None)
            litellm_params: dict[str, Any] = {"api_base": self.provider.api_base, "drop_params": True}
            url, headers, data = dialect.build(messages, optional_params, litellm_params, stream)
            if isinstance(extra_body, dict):
                data = {**data, **extra_body}
            content = orjson.dumps(data, default=_json_default)
            return _Call(
                url=url, headers=headers, content=content, messages=messages, optional_params=optional_params,
                litellm_params=litellm_params, data=data, json_mode=json_mode, include_usage=include_usage,
                log=_Log(named),
            )

        try:
            return translate()
        except self._errors as exc:
            raise classify.untranslatable(exc) from exc

    async def _post(self, call: _Call, limits: Limits) -> aiohttp.ClientResponse:
        return await self._session.post(call.url, data=call.content, headers=call.headers,
                                        timeout=attempt_timeout(limits))

    def _completion(self, dialect: _Dialect, call: _Call, response: httpx.Response) -> Completion:
        try:
            parsed = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise _malformed("answer", response.content) from exc
        if not isinstance(parsed, dict):
            raise _malformed("answer", response.content)
        if "error" in parsed:
            raise classify.from_stream_error(parsed)
        answer = self._reading(dialect.answer, call, response, parsed)
        out: dict[str, Any] = answer.model_dump()
        model = dialect.served_model(answer, parsed)
        out["model"] = model
        return Completion(body=orjson.dumps(out, default=_json_default), model=model, usage=Usage.from_openai(out.get("usage")))


class _Acompletion:
    """Providers without a translated dialect go through `litellm.acompletion`,
    with an HTTP handler that sends over our client and never retries on one of
    its own. Slower (litellm's whole machinery), same contract."""

    def __init__(self, provider: ProviderConfig, client: httpx.AsyncClient, litellm: Any) -> None:
        self._provider = provider
        self._litellm = litellm
        self._errors = _translation_errors(litellm)
        self._handler = _pooled_handler(client)

    def _kwargs(self, params: tuple[dict[str, Any], dict[str, Any]], body: dict[str, Any], limits: Limits) -> dict[str, Any]:
        named, extras = orjson.loads(orjson.dumps(params))  # litellm edits what it is given
        provider = self._provider
        return {
            **extras,
            **{key: value for key, value in named.items() if key != "stream"},
            "model": provider.model,
            "messages": orjson.loads(orjson.dumps(body.get("messages") or [])),
            "api_base": provider.api_base,
            "api_key": provider.api_key,
            "extra_headers": dict(provider.headers) or None,
            "client": self._handler,
            "timeout": _timeout(limits),
            "drop_params": True,
            "num_retries": 0,
            "max_retries": 0,
        }

    async def complete(
        self, params: tuple[dict[str, Any], dict[str, Any]], body: dict[str, Any], limits: Limits
    ) -> Completion:
        try:
            answer = await self._litellm.acompletion(**self._kwargs(params, body, limits), stream=False)
        except _TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        except self._errors as exc:
            raise classify.from_litellm(exc) from exc
        out: dict[str, Any] = answer.model_dump()
        model = out.get("model") if isinstance(out.get("model"), str) else self._provider.upstream_model
        return Completion(body=orjson.dumps(out, default=_json_default), model=str(model), usage=Usage.from_openai(out.get("usage")))

    async def stream(
        self, params: tuple[dict[str, Any], dict[str, Any]], body: dict[str, Any], limits: Limits
    ) -> AsyncIterator[Chunk]:
        try:
            wrapper = await self._litellm.acompletion(**self._kwargs(params, body, limits), stream=True)
        except _TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        except self._errors as exc:
            raise classify.from_litellm(exc) from exc
        finished = False
        try:
            async for part in wrapper:
                dumped = part.model_dump(exclude_none=True)
                for choice in dumped.get("choices") or ():
                    choice.setdefault("finish_reason", None)
                chunk = Chunk.from_dict(dumped)
                finished = finished or chunk.finish_reason is not None
                yield chunk
        except _TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        except self._errors as exc:
            raise classify.from_litellm(exc) from exc
        finally:
            await wrapper.aclose()
        if not finished:
            raise classify.incomplete_stream()


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
                "POST", url, data=request_data, json=json, params=params, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT, files=files,
                content=request_content,
            )
            response = await client.send(request, stream=stream)
            response.raise_for_status()
            return response

    return PooledHandler()
