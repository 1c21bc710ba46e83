"""The adapter protocol: one provider, one wire format, OpenAI shapes on our side.

An adapter turns an OpenAI chat-completions request body (a dict) into a call
to its provider and hands back OpenAI-shaped results:

* `complete(body, limits)` returns a `Completion` holding the OpenAI
  `chat.completion` JSON bytes to send to the client;
* `stream(body, limits)` is an async iterator of `Chunk`s, each the JSON of one
  OpenAI `chat.completion.chunk` (what follows `data: ` on the wire);
* `embed(body, limits)` answers an OpenAI embeddings request with an
  `Embeddings` (the OpenAI `list` of `embedding` objects);
* `probe()` checks the provider without paying for a completion.

Every failure leaves an adapter as a classified `ProviderError`; classification
happens in `proxy.adapters.classify` and nowhere else. Deadlines for the first
token and the whole stream are enforced by the caller; the adapter applies the
connect timeout to its own connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import httpx
import orjson

from proxy.config import ProviderConfig

# The W3C trace context (`traceparent`, `tracestate`) of the provider call being
# made, for the upstream request: set around each call by `proxy.telemetry` (in
# the calling task's own context, so a hedge's call has its own), None while
# traces are off. A context variable, so that no adapter's API carries it.
UPSTREAM_TRACE: Final[ContextVar[Mapping[str, str] | None]] = ContextVar("fallback_proxy_upstream_trace", default=None)


def with_trace(headers: Mapping[str, str]) -> Mapping[str, str]:
    """`headers` plus the current call's trace context, if any (a copy then)."""
    trace = UPSTREAM_TRACE.get()
    return headers if trace is None else {**headers, **trace}


@dataclass(frozen=True, slots=True)
class HttpClients:
    """The process's pooled HTTP clients, shared by every adapter of every config."""

    session: aiohttp.ClientSession  # the hot path: requests to the providers
    client: httpx.AsyncClient  # for what needs httpx: litellm's `acompletion` fallback

    def __repr__(self) -> str:
        return "HttpClients()"


@dataclass(frozen=True, slots=True)
class AttemptLimits:
    """Network limits for one attempt (seconds)."""

    connect: float
    read: float | None  # max silence while reading; None = no limit from the transport
    max_bytes: int = 32 * 1024 * 1024  # a larger answer is a failure of the provider


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: object) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        return cls(
            prompt_tokens=prompt if isinstance(prompt, int) else 0,
            completion_tokens=completion if isinstance(completion, int) else 0,
        )


@dataclass(slots=True)
class Completion:
    """A whole non-streaming answer in OpenAI `chat.completion` form."""

    body: bytes
    model: str
    usage: Usage | None = None


@dataclass(slots=True)
class Embeddings:
    """A whole embeddings answer in OpenAI's shape (`{"object": "list", "data":
    [{"object": "embedding", "index", "embedding"}], "model", "usage"}`), parsed so
    the caller can check and convert it, and as received when that is already
    OpenAI's shape (`raw`: sent on as is when nothing needs converting)."""

    data: dict[str, Any]
    model: str
    usage: Usage | None = None
    raw: bytes | None = None


@dataclass(slots=True)
class Chunk:
    """One OpenAI `chat.completion.chunk`: its JSON bytes and what the relay needs to know."""

    payload: bytes
    has_content: bool = False  # carries content, tool calls or a refusal: a real token
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    text: str = ""  # the first choice's content delta
    tool_calls: bool = False  # carries tool-call deltas (a stream that cannot be continued as text)
    # Another chunk of the same upstream read follows at once (no wait on the
    # network, so no read deadline guards it): the stream sends them to the
    # client as one write.
    more: bool = False
    data: dict[str, Any] | None = None  # the parsed chunk, when the adapter had it at hand

    @classmethod
    def from_dict(cls, chunk: dict[str, Any]) -> Chunk:
        """Build from an OpenAI chunk dict (translated providers)."""
        return describe(orjson.dumps(chunk), chunk)

    def parsed(self) -> dict[str, Any]:
        """The chunk as a dict (parsed once, then kept)."""
        data = self.data
        if data is None:
            data = self.data = orjson.loads(self.payload)
        return data


def describe(payload: bytes, chunk: dict[str, Any]) -> Chunk:
    """Summarise a parsed OpenAI chunk without building any model object."""
    choices = chunk.get("choices")
    if type(choices) is list and len(choices) == 1:  # the common chunk: one choice, text or nothing
        choice = choices[0]
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is dict and delta.keys() <= _TEXT_DELTA:
            content = delta.get("content")
            reason = choice.get("finish_reason")
            usage = chunk.get("usage")
            model = chunk.get("model")
            if (content is None or type(content) is str) and (reason is None or type(reason) is str):
                return Chunk(
                    payload=payload,
                    has_content=bool(content),
                    finish_reason=reason,
                    usage=None if usage is None else Usage.from_openai(usage),
                    model=model if type(model) is str else None,
                    text=content or "",
                    data=chunk,
                )
    return _describe_any(payload, chunk)


# A delta of these keys only is plain text (`refusal: null` comes with OpenAI's first chunk).
_TEXT_DELTA = frozenset({"role", "content"})


def _describe_any(payload: bytes, chunk: dict[str, Any]) -> Chunk:
    has_content = tool_calls = False
    finish_reason: str | None = None
    text = ""
    choices = chunk.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content and not text:
                    text = content
                calls = bool(delta.get("tool_calls") or delta.get("function_call"))
                tool_calls = tool_calls or calls
                if content or calls or delta.get("refusal") or delta.get("reasoning_content"):
                    has_content = True
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                finish_reason = reason
    model = chunk.get("model")
    return Chunk(
        payload=payload,
        has_content=has_content,
        finish_reason=finish_reason,
        usage=Usage.from_openai(chunk.get("usage")),
        model=model if isinstance(model, str) else None,
        text=text,
        tool_calls=tool_calls,
        data=chunk,
    )


class AdapterHooks:
    """What adapters tell the rest of the proxy about while they read; no-op here
    (`observe.OperatorEvents` counts and logs)."""

    def malformed(self, provider: str, payload: bytes) -> None:
        """A stream event that could not be read was skipped; the stream goes on."""


class Adapter(Protocol):
    """What the dispatcher needs from a provider, whatever its wire format."""

    provider: ProviderConfig

    async def complete(self, body: dict[str, Any], limits: AttemptLimits) -> Completion:
        """Send a non-streaming request; raise `ProviderError` on any failure."""
        ...

    def stream(self, body: dict[str, Any], limits: AttemptLimits) -> AsyncIterator[Chunk]:
        """Stream the answer as OpenAI chunks. Raises `ProviderError` on any failure,
        including an error event inside a 200 stream or an end without a finish.
        Closing the iterator (`aclose`) closes the upstream request."""
        ...

    async def embed(self, body: dict[str, Any], limits: AttemptLimits) -> Embeddings:
        """Send an OpenAI embeddings request (`input` as the client gave it, the
        model already this provider's); raise `ProviderError` on any failure."""
        ...

    async def probe(self, limits: AttemptLimits) -> None:
        """A free health check (model list, tags); raise `ProviderError` if unhealthy."""
        ...
