"""Anthropic Messages API wire format."""

from __future__ import annotations

import uuid
from types import MappingProxyType
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from ._core import StreamPlan, count_words, format_seconds, json_bytes, prompt_words, split_reply, tool_arguments
from ._fault import Fault
from ._server import FakeServer

_DEFAULT_MODEL: Final = "claude-sonnet-4-5"
_RATE_LIMIT_MESSAGE: Final = (
    "Number of request tokens has exceeded your per-minute rate limit "
    "(https://docs.claude.com/en/api/rate-limits); see the response headers for current usage. "
    "Please reduce the prompt length or the maximum tokens requested, or try again later."
)
_ERRORS_BY_STATUS: Final = MappingProxyType(
    {
        400: ("invalid_request_error", "Invalid request"),
        401: ("authentication_error", "invalid x-api-key"),
        403: ("permission_error", "Your API key does not have permission to use the specified resource."),
        404: ("not_found_error", "Not found"),
        413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        429: ("rate_limit_error", _RATE_LIMIT_MESSAGE),
        500: ("api_error", "Internal server error"),
        503: ("overloaded_error", "Overloaded"),
        504: ("timeout_error", "Request timed out"),
        529: ("overloaded_error", "Overloaded"),
    }
)


def anthropic_error(status: int, type_: str, message: str, *, retry_after: float | None = None) -> JSONResponse:
    """An Anthropic-style error: ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    request_id = f"req_011{uuid.uuid4().hex[:21]}"
    headers = {"request-id": request_id}
    if retry_after is not None:
        headers["retry-after"] = format_seconds(retry_after)
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


def sse_event(event: str, data: Any) -> bytes:
    """One named server-sent event, as Anthropic sends them."""
    return f"event: {event}\n".encode() + b"data: " + json_bytes(data) + b"\n\n"


class FakeAnthropic(FakeServer):
    """A fake Anthropic API: ``POST /v1/messages`` (JSON or SSE stream) and ``GET /v1/models``.

    Requires the ``anthropic-version`` header like the real API; auth is ``x-api-key`` when
    ``api_key`` is set. Responses report the requested model unless ``model`` is given.
    """

    default_name = "anthropic"

    def _routes(self) -> list[BaseRoute]:
        checks = [self._check_auth, self._check_version]
        route = self._core.route
        return [
            route("/v1/messages", self._messages, ["POST"], checks, self._bad_json),
            route("/v1/models", self._list_models, ["GET"], checks, self._bad_json),
        ]

    def _not_found(self, request: Request) -> Response:
        return anthropic_error(404, "not_found_error", "Not Found")

    # -- checks and errors -------------------------------------------------------------------

    def _bad_json(self) -> Response:
        return anthropic_error(400, "invalid_request_error", "There was an issue with the JSON body of your request")

    def _check_auth(self, request: Request) -> Response | None:
        key = self._core.api_key
        if key is None:
            return None
        given = request.headers.get("x-api-key")
        if not given:
            return anthropic_error(401, "authentication_error", "x-api-key header is required")
        if given != key:
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        return None

    def _check_version(self, request: Request) -> Response | None:
        if request.headers.get("anthropic-version"):
            return None
        return anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")

    def _fault_error(self, fault: Fault) -> Response:
        if fault.status == 400 and fault.error_code == "context_length_exceeded":
            type_, message = "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
        elif fault.status in _ERRORS_BY_STATUS:
            type_, message = _ERRORS_BY_STATUS[fault.status]
        else:
            type_, message = "api_error", "Internal server error"
        if fault.error_code and fault.error_code != "context_length_exceeded":
            message = fault.error_code
        return anthropic_error(fault.status, type_, message, retry_after=fault.retry_after)

    @staticmethod
    def _validate(body: Any) -> Response | None:
        if not isinstance(body, dict):
            return anthropic_error(400, "invalid_request_error", "messages: Field required")
        for field in ("model", "messages", "max_tokens"):
            if field not in body:
                return anthropic_error(400, "invalid_request_error", f"{field}: Field required")
        if not isinstance(body["messages"], list):
            return anthropic_error(400, "invalid_request_error", "messages: Input should be a valid list")
        return None

    # -- endpoints ---------------------------------------------------------------------------

    async def _messages(self, request: Request, body: Any) -> Response:
        invalid = self._validate(body)
        if invalid is not None:
            return invalid
        if not self._core.begin(body["messages"]):
            refusal = (
                "This model does not support assistant message prefill. The conversation must end with a user message."
            )
            return anthropic_error(400, "invalid_request_error", refusal)
        stream = bool(body.get("stream"))
        fault, error = await self._core.open_answer(request, stream, self._fault_error)
        if error is not None:
            return error
        message_id = f"msg_01{uuid.uuid4().hex[:22]}"
        model = self._core.response_model(body.get("model"), _DEFAULT_MODEL)
        input_tokens = prompt_words(body.get("messages"), body.get("system"))
        reply = self._reply(body)
        output_tokens = count_words(reply)
        headers = {"request-id": f"req_011{uuid.uuid4().hex[:21]}"}
        call = self._tool_use(body)
        if stream:
            plan = self._stream_plan(message_id, model, input_tokens, output_tokens, reply, call)
            return StreamingResponse(self._core.stream(fault, plan), media_type="text/event-stream", headers=headers)
        content: list[dict[str, Any]] = [{"type": "text", "text": reply}] if call is None else [call]
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": "end_turn" if call is None else "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
        return JSONResponse(message, headers=headers)

    async def _list_models(self, request: Request, body: Any) -> Response:
        model = self._core.model or _DEFAULT_MODEL
        entry = {"type": "model", "id": model, "display_name": model, "created_at": "2025-09-29T00:00:00Z"}
        return JSONResponse({"data": [entry], "has_more": False, "first_id": model, "last_id": model})

    def _tool_use(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A `tool_use` block calling the first tool, when the fake calls tools and no result came back yet."""
        tools = body.get("tools")
        if not self._core.call_tools or not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
            return None
        if _tool_results(body.get("messages")):
            return None
        tool = tools[0]
        arguments = tool_arguments(tool.get("input_schema"))
        return {
            "type": "tool_use",
            "id": f"toolu_01{uuid.uuid4().hex[:22]}",
            "name": tool.get("name"),
            "input": arguments,
        }

    def _reply(self, body: dict[str, Any]) -> str:
        results = _tool_results(body.get("messages"))
        if not self._core.call_tools or not results:
            return self._core.reply
        return f"{self._core.reply} The tool said: {results[-1]}"

    def _stream_plan(
        self,
        message_id: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        reply: str | None = None,
        call: dict[str, Any] | None = None,
    ) -> StreamPlan:
        start = {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        }
        block: dict[str, Any] = {"type": "text", "text": ""}
        if call is not None:
            block = {**call, "input": {}}
        block_start = {"type": "content_block_start", "index": 0, "content_block": block}
        if call is None:
            deltas = [
                sse_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                )
                for piece in split_reply(self._core.reply if reply is None else reply, self._core.chunks)
            ]
        else:
            arguments = json_bytes(call["input"]).decode()
            half = len(arguments) // 2
            deltas = [
                sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": part},
                    },
                )
                for part in (arguments[:half], arguments[half:])
            ]
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn" if call is None else "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return StreamPlan(
            preamble=[
                sse_event("message_start", start),
                sse_event("content_block_start", block_start),
                sse_event("ping", {"type": "ping"}),
            ],
            content=deltas,
            epilogue=[
                sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                sse_event("message_delta", message_delta),
                sse_event("message_stop", {"type": "message_stop"}),
            ],
            error_event=sse_event("error", error),
        )


def _tool_results(messages: Any) -> list[str]:
    """The text of every `tool_result` block the conversation carries."""
    results = []
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_result":
                inner = block.get("content")
                if isinstance(inner, list):
                    inner = " ".join(str(part.get("text", "")) for part in inner if isinstance(part, dict))
                results.append(str(inner))
    return results
