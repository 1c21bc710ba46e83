"""`ResponsesStream`: OpenAI `chat.completion.chunk`s in, Responses API events out.

Pure (no I/O): the stream module owns the connection and feeds this encoder,
in order, the chunks it sends; each method returns the SSE bytes of zero or
more events (`event: <type>\\ndata: <json>\\n\\n`):

    encoder = ResponsesStream(echo, model)
    encoder.opening()              response.created, response.in_progress
    encoder.feed(chunk)            output_item.added, content_part.added, output_text.delta,
                                   function_call_arguments.delta, ... (items closed as the next starts)
    encoder.completed(usage)       the open item's .done events, then response.completed
                                   (response.incomplete when cut by length or a content filter)
    encoder.failed(code, message)  the open item closed as incomplete, then response.failed

`sequence_number` counts every event from 0. There is no `[DONE]`: a Responses
stream ends with its last event. After `completed` or `failed` every call
returns b"" (a stream has one end).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from proxy.adapters.base import Usage
from proxy.responses.answer import (
    NewId,
    call_item,
    cut_reason,
    envelope,
    message_item,
    new_id,
    obj,
    reasoning_item,
    refusal_part,
    text_part,
    usage_of,
)
from proxy.responses.request import Echo
from proxy.sse import format_event

# The codes OpenAI's `ResponseError` may carry; any other is sent as `server_error`.
ERROR_CODES: Final = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "vector_store_timeout",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


@dataclass(slots=True)
class _Open:
    """The output item being streamed: a message (text, then maybe a refusal),
    a function call, or reasoning."""

    kind: str  # "message", "function_call", "reasoning"
    index: int  # output_index
    id: str
    part: str | None = None  # the open content part's type: output_text, refusal, reasoning_text
    parts: list[dict[str, Any]] = field(default_factory=list)  # the closed content parts
    buffer: list[str] = field(default_factory=list)  # the open part's text, or a call's arguments
    call_id: str = ""
    name: str = ""
    chat_index: int = -1  # a call's `index` in the chat stream


class ResponsesStream:
    """The Responses event stream of one request (see the module docstring)."""

    def __init__(
        self,
        echo: Echo,
        model: str,
        *,
        new_id: NewId = new_id,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.echo = echo
        self.model = model
        self._new_id = new_id
        self.id = new_id("resp")
        self.created_at = int(now())
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # every item so far, closed ones in their final form
        self._open: _Open | None = None
        self._calls: dict[int, _Open] = {}  # chat tool-call index → its item (open or closed)
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._opened = False
        self.ended = False

    # -- the interface ---------------------------------------------------------------------------

    def opening(self) -> bytes:
        """`response.created` and `response.in_progress` (once)."""
        if self._opened:
            return b""
        self._opened = True
        snapshot = self._response("in_progress")
        return self._event("response.created", {"response": snapshot}) + self._event(
            "response.in_progress", {"response": snapshot}
        )

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events one chat chunk makes (b"" for a role-only or usage chunk)."""
        if self.ended:
            return b""
        out = [self.opening()]
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self.model = model
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            if isinstance(choice.get("finish_reason"), str):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def text(self, content: str, model: str | None) -> bytes:
        """The events of a chat chunk that carries nothing but text (as `feed`
        makes them from the whole chunk): a content chunk read by its shape."""
        if self.ended:
            return b""
        out = [self.opening()]
        if model:
            self.model = model
        if content:
            self._text(out, "message", "output_text", content)
        return b"".join(out)

    def completed(self, usage: Usage | None = None) -> bytes:
        """Close what is open, then `response.completed` (or `response.incomplete`).
        The usage the chunks carried wins over `usage` (it has the details)."""
        if self.ended:
            return b""
        out = [self.opening()]
        cut = cut_reason(self._finish)
        self._close(out, "completed" if cut is None else "incomplete")
        self.ended = True
        status = "completed" if cut is None else "incomplete"
        response = self._response(status, usage=usage_of(self._usage or usage), incomplete=cut)
        out.append(self._event(f"response.{status}", {"response": response}))
        return b"".join(out)

    def failed(self, code: str, message: str) -> bytes:
        """Close what is open as incomplete, then `response.failed` carrying the error
        (a code OpenAI does not define goes out as `server_error`)."""
        if self.ended:
            return b""
        out = [self.opening()]
        self._close(out, "incomplete")
        self.ended = True
        error = {"code": code if code in ERROR_CODES else "server_error", "message": message}
        response = self._response("failed", usage=usage_of(self._usage), error=error)
        out.append(self._event("response.failed", {"response": response}))
        return b"".join(out)

    # -- chunks ----------------------------------------------------------------------------------

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        thoughts = delta.get("reasoning_content")
        if isinstance(thoughts, str) and thoughts:
            self._text(out, "reasoning", "reasoning_text", thoughts)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._text(out, "message", "output_text", content)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._text(out, "message", "refusal", refusal)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    self._call(call, out)

    def _text(self, out: list[bytes], kind: str, part: str, text: str) -> None:
        """Text into the open item's open part, opening either as needed."""
        item = self._open
        if item is None or item.kind != kind:
            self._close(out, "completed")
            item = self._start(kind, out)
        if item.part != part:
            self._close_part(item, out)
            item.part = part
            added = {"type": part, "text": ""} if part == "reasoning_text" else _empty_part(part)
            out.append(self._event("response.content_part.added", {**self._where(item), "part": added}))
        item.buffer.append(text)
        delta = {**self._where(item), "delta": text}
        if part == "output_text":
            delta["logprobs"] = []
        kinds = {"output_text": "response.output_text.delta", "refusal": "response.refusal.delta"}
        out.append(self._event(kinds.get(part, "response.reasoning_text.delta"), delta))

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        index = index if isinstance(index, int) else 0
        function = obj(call.get("function"))
        item = self._calls.get(index)
        if item is None:
            self._close(out, "completed")
            item = self._start("function_call", out, call=call, function=function, chat_index=index)
        elif isinstance(function.get("name"), str) and not item.name:
            item.name = function["name"]
        fragment = function.get("arguments")
        if not isinstance(fragment, str) or not fragment:
            return
        item.buffer.append(fragment)
        if item is self._open:
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    {"item_id": item.id, "output_index": item.index, "delta": fragment},
                )
            )
        else:  # a late fragment of a call already closed: kept for the final object
            self._output[item.index]["arguments"] = "".join(item.buffer)

    # -- items -----------------------------------------------------------------------------------

    def _start(
        self,
        kind: str,
        out: list[bytes],
        *,
        call: dict[str, Any] | None = None,
        function: dict[str, Any] | None = None,
        chat_index: int = -1,
    ) -> _Open:
        prefix = {"message": "msg", "function_call": "fc", "reasoning": "rs"}[kind]
        item = _Open(kind, len(self._output), self._new_id(prefix), chat_index=chat_index)
        if call is not None and function is not None:
            item.call_id = call["id"] if isinstance(call.get("id"), str) and call["id"] else self._new_id("call")
            item.name = function["name"] if isinstance(function.get("name"), str) else ""
            self._calls[chat_index] = item
        snapshot = self._item(item, "in_progress")
        self._output.append(snapshot)
        self._open = item
        out.append(self._event("response.output_item.added", {"output_index": item.index, "item": snapshot}))
        return item

    def _close(self, out: list[bytes], status: str) -> None:
        """The open item's `.done` events, and its final form in the output."""
        item, self._open = self._open, None
        if item is None:
            return
        if item.kind == "function_call":
            arguments = "".join(item.buffer)
            done = {"item_id": item.id, "output_index": item.index, "name": item.name, "arguments": arguments}
            out.append(self._event("response.function_call_arguments.done", done))
        else:
            self._close_part(item, out)
        final = self._item(item, status)
        self._output[item.index] = final
        out.append(self._event("response.output_item.done", {"output_index": item.index, "item": final}))

    def _close_part(self, item: _Open, out: list[bytes]) -> None:
        if item.part is None:
            return
        text = "".join(item.buffer)
        part = item.part
        where = self._where(item)
        if part == "output_text":
            out.append(self._event("response.output_text.done", {**where, "text": text, "logprobs": []}))
            final = text_part(text)
        elif part == "refusal":
            out.append(self._event("response.refusal.done", {**where, "refusal": text}))
            final = refusal_part(text)
        else:
            out.append(self._event("response.reasoning_text.done", {**where, "text": text}))
            final = {"type": "reasoning_text", "text": text}
        out.append(self._event("response.content_part.done", {**where, "part": final}))
        item.parts.append(final)
        item.part, item.buffer = None, []

    def _item(self, item: _Open, status: str) -> dict[str, Any]:
        if item.kind == "function_call":
            return call_item(item.id, item.call_id, item.name, "".join(item.buffer), status)
        if item.kind == "reasoning":
            done = reasoning_item(item.id, "", status)
            done["content"] = list(item.parts)
            return done
        return message_item(item.id, list(item.parts), status)

    def _where(self, item: _Open) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index, "content_index": len(item.parts)}

    # -- envelope --------------------------------------------------------------------------------

    def _response(
        self,
        status: str,
        *,
        usage: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        return envelope(
            self.id,
            self.created_at,
            self.model,
            self.echo,
            status=status,
            output=list(self._output),
            usage=usage,
            error=error,
            incomplete=incomplete,
        )

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        sequence = self._sequence
        self._sequence += 1
        return format_event(orjson.dumps({"type": kind, "sequence_number": sequence, **payload}), kind.encode())


def _empty_part(part: str) -> dict[str, Any]:
    return text_part("") if part == "output_text" else refusal_part("")
