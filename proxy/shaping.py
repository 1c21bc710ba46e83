"""What a request needs, and the request shaped for the provider that answers.

* `needs_of` reads what a request needs (images, tools, privacy) once.
* `eligibility` says, without I/O, why a provider must be passed over for it
  (`policy`: disabled by the config for want of a key, or not local for
  private work; `unsupported`: lacks vision/tools).
* `Shaper.shape` rewrites the request for one provider: its `system_prompt`
  replaces the client's ("mini mode"), and when the prompt does not fit its
  `context_window` (leaving room for `max_tokens`) the oldest turns are dropped
  until it does; if it cannot fit, the provider is skipped with
  `context_window_exceeded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.config import ProviderConfig, Route
from proxy.errors import FailureClass, ProviderError
from proxy.litellm_import import load_litellm

DEFAULT_COMPLETION_RESERVE = 512
PER_MESSAGE_OVERHEAD = 8  # role and framing tokens, generous
_TRUE = frozenset({"1", "true", "yes", "on"})

TokenCount = Callable[[str, list[dict[str, Any]]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Needs:
    vision: bool = False
    tools: bool = False
    local_only: bool = False


def needs_of(body: dict[str, Any], local_only_header: str | None) -> Needs:
    tools = bool(body.get("tools") or body.get("functions"))
    return Needs(
        vision=any(_has_image(m) for m in body.get("messages", ())),
        tools=tools or body.get("tool_choice") not in (None, "none"),
        local_only=(local_only_header or "").strip().lower() in _TRUE,
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
    capabilities = provider.capabilities
    if capabilities is None:
        return None
    if needs.vision and "vision" not in capabilities:
        return ProviderError(FailureClass.UNSUPPORTED, "the request has images; this provider lacks vision")
    if needs.tools and "tools" not in capabilities:
        return ProviderError(FailureClass.UNSUPPORTED, "the request uses tools; this provider lacks tools")
    return None


@dataclass(frozen=True, slots=True)
class Shaped:
    body: dict[str, Any]
    trimmed: int = 0  # messages dropped to fit the context window


def with_system_prompt(messages: Sequence[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """Mini mode: the provider's system prompt replaces the client's."""
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return [{"role": "system", "content": prompt}, *rest]


def completion_reserve(body: dict[str, Any]) -> int:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return limit if isinstance(limit, int) and limit > 0 else DEFAULT_COMPLETION_RESERVE


def upper_bound(messages: Sequence[dict[str, Any]]) -> int:
    """More tokens than any BPE tokenizer can make of these messages: each
    token covers at least one byte."""
    return len(orjson.dumps(messages)) + PER_MESSAGE_OVERHEAD * len(messages)


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
        messages: list[dict[str, Any]] = body["messages"]
        if provider.system_prompt is not None:
            messages = with_system_prompt(messages, provider.system_prompt)
        trimmed = 0
        if provider.context_window is not None:
            budget = provider.context_window - completion_reserve(body)
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
