"""A streamed answer assembled into the body OpenAI sends for `stream: false`.

Non-stream requests are sent upstream as streams, so the first-token and idle
deadlines bound them too; the client still gets one `chat.completion`: every
choice of `n`, content, refusal, tool calls (joined by index), logprobs,
finish reasons, usage, `system_fingerprint` and `service_tier`. Pure: fed
parsed chunks in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from proxy.adapters.base import Chunk, Completion, Usage


@dataclass(slots=True)
class _Choice:
    index: int
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    function_call: dict[str, str] | None = None
    logprobs: dict[str, list[Any]] | None = None
    finish_reason: str | None = None
    seen_content: bool = False

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._delta(delta)
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            merged = self.logprobs if self.logprobs is not None else {}
            for key in ("content", "refusal"):
                items = logprobs.get(key)
                if isinstance(items, list):
                    merged.setdefault(key, []).extend(items)
            self.logprobs = merged
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason

    def _delta(self, delta: dict[str, Any]) -> None:
        content = delta.get("content")
        if isinstance(content, str):
            self.content.append(content)
            self.seen_content = True
        for key, parts in (("reasoning_content", self.reasoning), ("refusal", self.refusal)):
            value = delta.get(key)
            if isinstance(value, str):
                parts.append(value)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    self._tool_call(call)
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            joined = self.function_call if self.function_call is not None else {"name": "", "arguments": ""}
            for key in ("name", "arguments"):
                piece = function_call.get(key)
                if isinstance(piece, str):
                    joined[key] += piece
            self.function_call = joined

    def _tool_call(self, call: dict[str, Any]) -> None:
        index = call.get("index")
        slot = index if isinstance(index, int) else len(self.tool_calls)
        joined = self.tool_calls.setdefault(slot, {"id": "", "type": "function", "name": "", "arguments": ""})
        if isinstance(call.get("id"), str) and call["id"]:
            joined["id"] = call["id"]
        if isinstance(call.get("type"), str):
            joined["type"] = call["type"]
        function = call.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                piece = function.get(key)
                if isinstance(piece, str):
                    joined[key] += piece

    def message(self) -> dict[str, Any]:
        calls = [
            {"id": c["id"], "type": c["type"], "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(self.tool_calls.items())
        ]
        content = (
            "".join(self.content) if self.seen_content or not (calls or self.function_call or self.refusal) else None
        )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": "".join(self.refusal) if self.refusal else None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if calls:
            message["tool_calls"] = calls
        if self.function_call is not None:
            message["function_call"] = self.function_call
        return message

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "message": self.message(),
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason or "stop",
        }


_PLAIN_DELTA: Final = frozenset({"role", "content", "refusal"})


def _a_token(choice: dict[str, Any]) -> bool:
    """Whether a choice of a chunk carries a real token or a finish (as `describe` says of a `Chunk`)."""
    if isinstance(choice.get("finish_reason"), str):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(
        delta.get("content")
        or delta.get("tool_calls")
        or delta.get("function_call")
        or delta.get("refusal")
        or delta.get("reasoning_content")
    )


class Assembler:
    """Feed it a stream's chunks in order; `completion()` is the whole answer."""

    __slots__ = ("_choices", "_envelope", "_usage", "model")

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self._envelope: dict[str, Any] = {}
        self._usage: dict[str, Any] | None = None
        self.model = ""

    def add(self, chunk: Chunk) -> None:
        self.add_data(chunk.parsed())

    def add_data(self, data: dict[str, Any]) -> bool:
        """Add one parsed chunk; True when it carries a real token (content, tool
        calls, a refusal, reasoning) or a finish: what ends the wait for the first token."""
        return self.add_read((data,))

    def add_read(self, read: Sequence[dict[str, Any] | str]) -> bool:
        """Add the parsed chunks of one upstream read, in order; True when one of
        them carries a real token or a finish. A text stands for a plain content
        chunk of the first choice, with nothing else new (`ContentShape`). The
        common chunk (one choice, index 0, a delta of nothing but a role and
        content (and OpenAI's `refusal: null`), no logprobs) is taken inline:
        this loop runs for every chunk of every non-stream answer."""
        envelope = self._envelope
        token = False
        for data in read:
            if isinstance(data, str):
                joined = self._choices.get(0)
                if joined is None:
                    joined = self._choices[0] = _Choice(0)
                joined.content.append(data)
                joined.seen_content = True
                token = token or bool(data)
                continue
            if not envelope:
                envelope.update(id=data.get("id"), created=data.get("created"))
            if (value := data.get("model")) is not None:
                envelope["model"] = value
            if (value := data.get("system_fingerprint")) is not None:
                envelope["system_fingerprint"] = value
            if (value := data.get("service_tier")) is not None:
                envelope["service_tier"] = value
            usage = data.get("usage")
            if isinstance(usage, dict):
                self._usage = usage
            choices = data.get("choices")
            if not choices:
                continue
            if len(choices) == 1:
                choice = choices[0]
                if type(choice) is dict and choice.get("index", 0) == 0 and choice.get("logprobs") is None:
                    delta = choice.get("delta")
                    if type(delta) is dict and delta.keys() <= _PLAIN_DELTA and delta.get("refusal") is None:
                        content = delta.get("content")
                        if content is None or type(content) is str:
                            joined = self._choices.get(0)
                            if joined is None:
                                joined = self._choices[0] = _Choice(0)
                            if content is not None:
                                joined.content.append(content)
                                joined.seen_content = True
                                if content:
                                    token = True
                            reason = choice.get("finish_reason")
                            if isinstance(reason, str):
                                joined.finish_reason = reason
                                token = True
                            continue
            for choice in choices:
                if isinstance(choice, dict):
                    index = choice.get("index")
                    slot = index if isinstance(index, int) else 0
                    self._choices.setdefault(slot, _Choice(slot)).add(choice)
                    token = token or _a_token(choice)
        return token

    def completion(self) -> Completion:
        envelope = self._envelope
        model = envelope.get("model")
        self.model = model if isinstance(model, str) else ""
        body: dict[str, Any] = {
            "id": envelope.get("id") or "chatcmpl-fallback-proxy",
            "object": "chat.completion",
            "created": envelope.get("created") or 0,
            "model": self.model,
            "choices": [choice.to_dict() for _, choice in sorted(self._choices.items())],
        }
        if self._usage is not None:
            body["usage"] = self._usage
        for key in ("system_fingerprint", "service_tier"):
            if key in envelope:
                body[key] = envelope[key]
        return Completion(body=orjson.dumps(body), model=self.model, usage=Usage.from_openai(self._usage))
