"""What every dialect shares: the prepared call, parsed pieces, the parser base, and the
writer that turns pieces into OpenAI chunks (one orjson encode each)."""

from __future__ import annotations

import importlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import orjson

from proxy.adapters import classify
from proxy.adapters.base import AttemptLimits, Chunk, Usage
from proxy.adapters.http import TRANSPORT_ERRORS
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError

# Failures of the connection itself: aiohttp's (the dialects), httpx's (the
# `acompletion` fallback), and a reset socket can surface as a bare OSError.
TRANSLATED_TRANSPORT_ERRORS: Final = (*TRANSPORT_ERRORS, httpx.HTTPError)

# The OpenAI parameters litellm's `completion()` hands to `get_optional_params`
# by name; any other body key is a provider-specific extra, unless litellm
# reserves it (api_key, api_base, metadata, ...): those are never forwarded.
OPENAI_ARGS: Final = frozenset(
    {
        "functions",
        "function_call",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "modalities",
        "prediction",
        "audio",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "response_format",
        "seed",
        "tools",
        "tool_choice",
        "logprobs",
        "top_logprobs",
        "parallel_tool_calls",
        "reasoning_effort",
        "verbosity",
        "thinking",
        "web_search_options",
        "include_server_side_tool_invocations",
        "safety_identifier",
        "service_tier",
        "store",
        "prompt_cache_key",
    }
)
PARAMS_CACHE_SIZE: Final = 256
GEMINI_BASE: Final = "https://generativelanguage.googleapis.com/v1beta"
ANTHROPIC_BASE: Final = "https://api.anthropic.com"


def translation_errors(litellm: Any) -> tuple[type[BaseException], ...]:
    """What litellm's translation code raises on input it cannot handle: its own
    exceptions (the openai family and the per-provider `BaseLLMException`s) and
    the plain errors of dict-walking code."""
    base = importlib.import_module("litellm.llms.base_llm.chat.transformation")
    openai = importlib.import_module("openai")
    return (base.BaseLLMException, openai.OpenAIError, ValueError, TypeError, LookupError, AttributeError)


def httpx_timeout(limits: AttemptLimits) -> httpx.Timeout:
    return httpx.Timeout(connect=limits.connect, read=limits.read, write=limits.connect, pool=limits.connect)


def gemini_auth_and_url(
    vertex: Any, provider: ProviderConfig, model: str, *, stream: bool | None, mode: str = "chat"
) -> tuple[Any, str]:
    """litellm's Google AI Studio auth and URL for one call to `model` (`vertex`: its `VertexLLM`)."""
    auth, url = vertex._get_token_and_url(
        model=model,
        auth_header=None,
        gemini_api_key=provider.api_key,
        vertex_project=None,
        vertex_location=None,
        vertex_credentials=None,
        stream=stream,
        custom_llm_provider="gemini",
        api_base=provider.api_base,
        mode=mode,
    )
    return auth, url


def json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is None:
        raise TypeError(f"cannot encode {type(value).__name__}")
    return dump()


def malformed(what: str, data: bytes) -> ProviderError:
    return ProviderError(FailureClass.SERVER_ERROR, f"malformed {what}: {data[:120]!r}")


class LitellmLog:
    """The slice of litellm's logging object that its transformations touch."""

    __slots__ = ("model_call_details", "optional_params")

    def __init__(self, optional_params: dict[str, Any]) -> None:
        self.optional_params = optional_params  # the client's OpenAI params, as litellm logs them
        self.model_call_details: dict[str, Any] = {}

    def pre_call(self, *args: Any, **kwargs: Any) -> None:
        pass

    def post_call(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass(slots=True)
class Call:
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
    log: LitellmLog


@dataclass(slots=True)
class Piece:
    """What one upstream stream event adds to the answer."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Any = None
    model: str | None = None


def piece_of(parsed: Any) -> Piece | None:
    """Read a litellm `ModelResponseStream` (None: nothing to say)."""
    if parsed is None:
        return None
    piece = Piece(usage=getattr(parsed, "usage", None), model=parsed.model or None)
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


class Parser:
    """Turns one upstream stream's payloads into pieces, with litellm's chunk
    parser for the provider (`iterator`). `complete` says the upstream ended
    its answer properly."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator
        self.complete = False

    def feed(self, data: bytes) -> Piece | None:
        raise NotImplementedError


class MalformedEvent(Exception):
    """A stream payload that is not a JSON object: skipped, the stream goes on."""


def read_event(data: bytes) -> dict[str, Any]:
    """One stream payload as a JSON object; an in-band error raises classified,
    an unreadable one `MalformedEvent`."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent from exc
    if not isinstance(event, dict):
        raise MalformedEvent
    if "error" in event:
        raise classify.from_stream_error(event)
    return event


@dataclass(slots=True)
class ChunkWriter:
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

    def chunk(self, piece: Piece) -> Chunk | None:
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
