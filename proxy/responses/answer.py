"""The `Response` object: built from a chat completion (non-streaming), and the
pieces the stream encoder shares with it (ids, output items, usage, status).

Pure: plain dicts in, plain dicts out; ids come from an injectable `new_id`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, Final

from proxy.adapters.base import Usage
from proxy.responses.request import Echo

NewId = Callable[[str], str]
"""Makes an id with a prefix (`resp`, `msg`, `fc`, `rs`)."""

# finish_reason of a chat completion → Responses `incomplete_details.reason`
_CUT: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    """An id shaped as OpenAI's: a prefix and 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def envelope(
    response_id: str,
    created_at: int,
    model: str,
    echo: Echo,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """One `Response` object."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "model": model,
        "output": output,
        "usage": usage,
        **echo,
    }


def cut_reason(finish_reason: str | None) -> str | None:
    """Why an answer is incomplete (`max_output_tokens`, `content_filter`), or None."""
    return _CUT.get(finish_reason) if finish_reason is not None else None


def usage_of(usage: object) -> dict[str, Any] | None:
    """Chat usage (with its details when the provider gave them) as Responses usage."""
    if isinstance(usage, Usage):
        usage = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _count(prompt_details.get("cached_tokens")),
            "cache_write_tokens": _count(usage.get("cache_creation_input_tokens")),
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _count(completion_details.get("reasoning_tokens"))},
        "total_tokens": _count(usage.get("total_tokens")) or prompt + completion,
    }


def obj(value: object) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (answers are read defensively)."""
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def refusal_part(refusal: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": refusal}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A provider's visible reasoning (Ollama's thinking, DeepSeek's reasoning_content) as a reasoning item."""
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [], "content": content}


def from_completion(
    completion: dict[str, Any], echo: Echo, *, new_id: NewId = new_id, now: Callable[[], float] = time.time
) -> dict[str, Any]:
    """A whole chat completion as a `Response`."""
    choices = completion.get("choices")
    choice = obj(choices[0]) if isinstance(choices, list) and choices else {}
    message = obj(choice.get("message"))
    finish = choice.get("finish_reason")
    cut = cut_reason(finish if isinstance(finish, str) else None)
    status = "completed" if cut is None else "incomplete"
    output: list[dict[str, Any]] = []
    thoughts = message.get("reasoning_content")
    if isinstance(thoughts, str) and thoughts:
        output.append(reasoning_item(new_id("rs"), thoughts, "completed"))
    parts = []
    text = _text_of(message.get("content"))
    if text:
        parts.append(text_part(text))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append(refusal_part(message["refusal"]))
    calls = [call for call in message.get("tool_calls") or () if isinstance(call, dict)]
    if parts or not calls:
        output.append(message_item(new_id("msg"), parts or [text_part("")], status))
    for call in calls:
        function = obj(call.get("function"))
        call_id = call["id"] if isinstance(call.get("id"), str) else new_id("call")
        output.append(
            call_item(
                new_id("fc"),
                call_id,
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
                "completed",
            )
        )
    model = completion.get("model")
    return envelope(
        new_id("resp"),
        int(now()),
        model if isinstance(model, str) else "",
        echo,
        status=status,
        output=output,
        usage=usage_of(completion.get("usage")),
        incomplete=cut,
    )


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
