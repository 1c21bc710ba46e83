"""What a request needs, and the request shaped for the provider that answers.

* `needs_of` reads what a request needs (images, tools, privacy) once.
* `eligibility` says, without I/O, why a provider must be passed over for it
  (`policy`: disabled by the config for want of a key, or not local for
  private work; `unsupported`: lacks vision, tools or structured outputs, or
  its wire format cannot give what the request asks for: several choices (`n`)
  or logprobs through a translation that drops them; for embeddings: another
  vector space, or token arrays it cannot read).
* `Shaper.shape` rewrites the request for one provider: its `system_prompt`
  replaces the client's ("mini mode"), and when the prompt does not fit its
  `context_window` (leaving room for `max_tokens`, or a quarter of the window
  when the request sets none) the oldest turns are dropped
  until it does; if it cannot fit, the provider is skipped with
  `context_window_exceeded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config import ProviderConfig, Route
from proxy.errors import FailureClass, ProviderError
from proxy.litellm_import import load_litellm
from proxy.tokens import DEFAULT_COMPLETION_TOKENS, completion_limit, upper_bound

RESERVE_SHARE = 4  # without max_tokens, at most 1/RESERVE_SHARE of a window is kept for the answer
_TRUE = frozenset({"1", "true", "yes", "on"})

TokenCount = Callable[[str, list[dict[str, Any]]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Needs:
    vision: bool = False
    tools: bool = False
    local_only: bool = False
    json_schema: bool = False  # structured outputs
    choices: int = 1  # n
    logprobs: bool = False
    # Embeddings: the vector space every answer must come from (the route's first
    # provider's), and whether `input` is token ids (only the OpenAI format takes them).
    embedding_space: str | None = None
    token_input: bool = False


def needs_of(body: dict[str, Any], local_only_header: str | None) -> Needs:
    tools = bool(body.get("tools") or body.get("functions"))
    response_format = body.get("response_format")
    n = body.get("n")
    return Needs(
        vision=any(_has_image(m) for m in body.get("messages", ())),
        tools=tools or body.get("tool_choice") not in (None, "none"),
        local_only=(local_only_header or "").strip().lower() in _TRUE,
        json_schema=isinstance(response_format, dict) and response_format.get("type") == "json_schema",
        choices=n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1,
        logprobs=body.get("logprobs") is True or bool(body.get("top_logprobs")),
    )


def _has_image(message: object) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return False
    return any(isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image") for part in content)


def eligibility(provider: ProviderConfig, route: Route, needs: Needs) -> ProviderError | None:
    """Why this provider must not be called for this request (no I/O), or None."""
    if provider.disabled_reason is not None:
        return ProviderError(FailureClass.POLICY, f"disabled: {provider.disabled_reason}; not called")
    if (route.local_only or needs.local_only) and not provider.local:
        return ProviderError(FailureClass.POLICY, "not a local provider; private work stays on this machine")
    if needs.embedding_space is not None:
        return embedding_eligibility(provider, needs)
    if not provider.openai_compatible and (needs.choices > 1 or needs.logprobs):
        asked = f"n={needs.choices}" if needs.choices > 1 else "logprobs"
        return ProviderError(
            FailureClass.UNSUPPORTED, f"the request asks for {asked}, which this provider's wire format cannot give"
        )
    capabilities = provider.capabilities
    if capabilities is None:
        return None
    for need, capability, what in (
        (needs.vision, "vision", "has images"),
        (needs.tools, "tools", "uses tools"),
        (needs.json_schema, "json_schema", "asks for a JSON schema (structured outputs)"),
    ):
        if need and capability not in capabilities:
            return ProviderError(FailureClass.UNSUPPORTED, f"the request {what}; this provider lacks {capability}")
    return None


def embedding_eligibility(provider: ProviderConfig, needs: Needs) -> ProviderError | None:
    """Vectors from two spaces cannot be compared: a provider of another space is
    never a fallback for embeddings, whatever the route says."""
    if provider.space != needs.embedding_space:
        return ProviderError(
            FailureClass.UNSUPPORTED,
            f"embedding space '{provider.space}' is not the route's '{needs.embedding_space}'; "
            "vectors of different spaces are never mixed",
        )
    if needs.token_input and not provider.openai_compatible:
        return ProviderError(FailureClass.UNSUPPORTED, "token-array input needs an OpenAI-format provider")
    return None


@dataclass(frozen=True, slots=True)
class Shaped:
    body: dict[str, Any]
    trimmed: int = 0  # messages dropped to fit the context window


def with_system_prompt(messages: Sequence[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """Mini mode: the provider's system prompt replaces the client's."""
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return [{"role": "system", "content": prompt}, *rest]


def completion_reserve(body: dict[str, Any], window: int) -> int:
    """Tokens kept for the answer: what the request allows it, else at most a
    quarter of the window (512 in a large one)."""
    limit = completion_limit(body)
    if limit is not None:
        return limit
    return min(DEFAULT_COMPLETION_TOKENS, window // RESERVE_SHARE)


def drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Without the oldest non-system turn (and tool results it leaves orphaned);
    None when only the last turn is left."""
    turns = [i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")]
    if len(turns) <= 1:
        return None
    drop = {turns[0]}
    for index in turns[1:-1]:
        if messages[index].get("role") != "tool":
            break
        drop.add(index)
    return [m for i, m in enumerate(messages) if i not in drop]


async def litellm_count(model: str, messages: list[dict[str, Any]]) -> int:
    """litellm's token counter for this model, off the event loop."""

    def count() -> int:
        try:
            tokens: int = load_litellm().token_counter(model=model, messages=messages)
        except (ValueError, TypeError, LookupError, AttributeError):
            # litellm cannot read some valid inputs (audio parts, odd shapes):
            # the byte count is a safe overestimate.
            return upper_bound(messages)
        return tokens

    return await asyncio.to_thread(count)


class Shaper:
    def __init__(self, count: TokenCount = litellm_count) -> None:
        self._count = count

    async def shape(self, provider: ProviderConfig, body: dict[str, Any]) -> Shaped:
        messages: list[dict[str, Any]] | None = body.get("messages")
        if messages is None:  # not a chat request (embeddings): nothing to shape
            return Shaped(body)
        if provider.system_prompt is not None:
            messages = with_system_prompt(messages, provider.system_prompt)
        trimmed = 0
        if provider.context_window is not None:
            budget = provider.context_window - completion_reserve(body, provider.context_window)
            while upper_bound(messages) > budget and await self._count(provider.model, messages) > budget:
                shorter = drop_oldest_turn(messages)
                if shorter is None:
                    raise ProviderError(
                        FailureClass.CONTEXT_WINDOW_EXCEEDED,
                        f"the prompt does not fit {provider.context_window} tokens even with only its last turn",
                    )
                trimmed += len(messages) - len(shorter)
                messages = shorter
        if messages is body["messages"]:
            return Shaped(body)
        return Shaped({**body, "messages": messages}, trimmed)
