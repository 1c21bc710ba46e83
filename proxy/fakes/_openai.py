"""OpenAI chat-completions wire format (also served by the Ollama fake under ``/v1``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from ._core import (
    FakeCore,
    StreamPlan,
    base64_vector,
    count_words,
    embedding_texts,
    fake_vector,
    format_seconds,
    json_bytes,
    prompt_words,
    split_reply,
    status_phrase,
    tool_arguments,
)
from ._fault import Fault
from ._server import FakeServer

_SERVER_ERROR: Final = "The server had an error while processing your request. Sorry about that!"
_CONTEXT_ERROR: Final = (
    "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. "
    "Please reduce the length of the messages."
)
_PREFILL_REFUSED: Final = "The final message must have role 'user' or 'tool'; an assistant prefill is not supported."
_QUOTA_ERROR: Final = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)


def openai_error(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""
    if type_ is None:
        type_ = "server_error" if status >= 500 else "invalid_request_error"
    headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
    if retry_after is not None:
        headers["retry-after"] = format_seconds(retry_after)
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def sse(data: Any) -> bytes:
    """One ``data:`` server-sent event."""
    return b"data: " + json_bytes(data) + b"\n\n"


class OpenAIWire:
    """The OpenAI endpoints of one fake: ``POST /v1/chat/completions`` and ``GET /v1/models``.

    ``known_models`` (Ollama) restricts the accepted models and answers others with Ollama's 404.
    ``POST /v1/embeddings`` honours ``encoding_format`` and ``dimensions`` unless ``floats_only``
    (as some OpenAI-compatible servers, which answer full-length floats whatever is asked).
    """

    def __init__(
        self,
        core: FakeCore,
        *,
        default_model: str,
        owned_by: str = "openai",
        known_models: Sequence[str] | None = None,
        floats_only: bool = False,
    ) -> None:
        self._core = core
        self._floats_only = floats_only
        self._default_model = default_model
        self._owned_by = owned_by
        self._known_models = known_models

    def routes(self) -> list[BaseRoute]:
        checks = [self.check_auth]
        route = self._core.route
        return [
            route("/v1/chat/completions", self.chat, ["POST"], checks, self.bad_json),
            route("/v1/embeddings", self.embeddings, ["POST"], checks, self.bad_json),
            route("/v1/models", self.list_models, ["GET"], checks, self.bad_json),
            route("/v1/models/{model:path}", self.get_model, ["GET"], checks, self.bad_json),
        ]

    def bad_json(self) -> Response:
        return openai_error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.",
        )

    def not_found(self, request: Request) -> Response:
        return openai_error(404, f"Invalid URL ({request.method} {request.url.path})")

    # -- checks and errors -------------------------------------------------------------------

    def check_auth(self, request: Request) -> Response | None:
        key = self._core.api_key
        if key is None:
            return None
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
                "username) if you're accessing the API from your browser and are prompted for a username and "
                "password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            )
        given = header[7:].strip()
        if given != key:
            masked = given[:3] + "*" * 6 + given[-4:] if len(given) > 8 else "*" * len(given)
            return openai_error(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    def fault_error(self, fault: Fault) -> Response:
        """The real error answer for a ``status`` fault."""
        status, code = fault.status, fault.error_code
        if status == 400 and code == "context_length_exceeded":
            return openai_error(400, _CONTEXT_ERROR, code=code, param="messages", retry_after=fault.retry_after)
        if status == 401:
            message, code = "Incorrect API key provided: sk-fake******1234.", code or "invalid_api_key"
        elif status == 404:
            message, code = "The model does not exist or you do not have access to it.", code or "model_not_found"
        elif status == 429 and code == "insufficient_quota":
            return openai_error(429, _QUOTA_ERROR, type_=code, code=code, retry_after=fault.retry_after)
        elif status == 429:
            message = "Rate limit reached for requests. Please try again later."
            return openai_error(
                429, message, type_="requests", code=code or "rate_limit_exceeded", retry_after=fault.retry_after
            )
        elif status == 500:
            message = _SERVER_ERROR
        elif status == 503:
            message = "The server is overloaded or not ready yet."
        else:
            message = status_phrase(status)
        return openai_error(status, message, code=code, retry_after=fault.retry_after)

    def _validate(self, body: Any) -> Response | None:
        if not isinstance(body, dict):
            return openai_error(400, "you must provide a model parameter")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return openai_error(400, "you must provide a model parameter")
        if not isinstance(body.get("messages"), list):
            return openai_error(
                400, "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
            )
        if self._known_models is not None and body["model"] not in self._known_models:
            message = f'model "{body["model"]}" not found, try pulling it first'
            return openai_error(404, message, type_="api_error")
        return None

    # -- endpoints ---------------------------------------------------------------------------

    async def chat(self, request: Request, body: Any) -> Response:
        invalid = self._validate(body)
        if invalid is not None:
            return invalid
        if not self._core.begin(body["messages"]):
            return openai_error(400, _PREFILL_REFUSED, param="messages")
        stream = bool(body.get("stream"))
        fault, error = await self._core.open_answer(request, stream, self.fault_error)
        if error is not None:
            return error
        model = self._core.response_model(body.get("model"), self._default_model)
        usage = self._usage(body)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:29]}"
        created = int(time.time())
        headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
        call = self._tool_call(body)
        reply = self._reply(body)
        if stream:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            plan = self._stream_plan(completion_id, created, model, usage if include_usage else None, call, reply)
            return StreamingResponse(self._core.stream(fault, plan), media_type="text/event-stream", headers=headers)
        message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None}
        if call is not None:
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "stop" if call is None else "tool_calls",
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }
        return JSONResponse(completion, headers=headers)

    async def embeddings(self, request: Request, body: Any) -> Response:
        texts = embedding_texts(body.get("input")) if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return openai_error(400, "you must provide a model parameter")
        if texts is None:
            return openai_error(400, "'$.input' is invalid. Please check the API reference.", param="input")
        if self._known_models is not None and body["model"] not in self._known_models:
            return openai_error(404, f'model "{body["model"]}" not found, try pulling it first', type_="api_error")
        _, error = await self._core.open_answer(request, False, self.fault_error)
        if error is not None:
            return error
        model = self._core.response_model(body.get("model"), self._default_model)
        dimensions = None if self._floats_only else body.get("dimensions")
        base64 = body.get("encoding_format") == "base64" and not self._floats_only
        data = []
        for index, text in enumerate(texts):
            vector = fake_vector(model, text, dimensions)
            data.append(
                {"object": "embedding", "index": index, "embedding": base64_vector(vector) if base64 else vector}
            )
        tokens = sum(count_words(text) for text in texts)
        answer = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JSONResponse(answer, headers={"x-request-id": f"req_{uuid.uuid4().hex}"})

    async def list_models(self, request: Request, body: Any) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_object(m) for m in self._models()]})

    async def get_model(self, request: Request, body: Any) -> Response:
        model = request.path_params["model"]
        if model not in self._models():
            message = f"The model `{model}` does not exist or you do not have access to it."
            return openai_error(404, message, code="model_not_found")
        return JSONResponse(self._model_object(model))

    # -- helpers -----------------------------------------------------------------------------

    def _models(self) -> list[str]:
        if self._known_models is not None:
            return list(self._known_models)
        return [self._core.model or self._default_model]

    def _model_object(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1700000000, "owned_by": self._owned_by}

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        prompt = prompt_words(body.get("messages"))
        completion = count_words(self._core.reply)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The call of the request's first tool, when the fake calls tools and none has answered yet."""
        tools = body.get("tools")
        messages = body.get("messages")
        if not self._core.call_tools or not isinstance(tools, list) or not tools or not isinstance(messages, list):
            return None
        if any(isinstance(m, dict) and m.get("role") == "tool" for m in messages):
            return None
        function = tools[0].get("function") if isinstance(tools[0], dict) else None
        if not isinstance(function, dict):
            return None
        arguments = json_bytes(tool_arguments(function.get("parameters"))).decode()
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        return {"id": call_id, "type": "function", "function": {"name": function.get("name"), "arguments": arguments}}

    def _reply(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        results = [m.get("content") for m in messages or () if isinstance(m, dict) and m.get("role") == "tool"]
        if not self._core.call_tools or not results:
            return self._core.reply
        return f"{self._core.reply} The tool said: {results[-1]}"

    def _stream_plan(
        self,
        completion_id: str,
        created: int,
        model: str,
        usage: dict[str, int] | None,
        call: dict[str, Any] | None = None,
        reply: str | None = None,
    ) -> StreamPlan:
        base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            extra = {"usage": None} if usage is not None else {}
            return sse({**base, "choices": [choice], **extra})

        epilogue = [chunk({}, "stop" if call is None else "tool_calls")]
        if usage is not None:
            epilogue.append(sse({**base, "choices": [], "usage": usage}))
        epilogue.append(b"data: [DONE]\n\n")
        error = {"error": {"message": _SERVER_ERROR, "type": "server_error", "param": None, "code": None}}
        return StreamPlan(
            preamble=[chunk({"role": "assistant", "content": "", "refusal": None})],
            content=self._content_chunks(chunk, call, reply),
            epilogue=epilogue,
            error_event=sse(error),
        )

    def _content_chunks(self, chunk: Any, call: dict[str, Any] | None, reply: str | None) -> list[bytes]:
        if call is None:
            pieces = split_reply(self._core.reply if reply is None else reply, self._core.chunks)
            return [chunk({"content": piece}) for piece in pieces]
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        head = {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        return [
            chunk({"tool_calls": [head]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}),
        ]


class FakeOpenAI(FakeServer):
    """A fake OpenAI API: ``POST /v1/chat/completions`` (JSON or SSE stream) and ``GET /v1/models``.

    Auth is ``Authorization: Bearer <api_key>`` when ``api_key`` is set. Responses report the
    requested model unless ``model`` is given; ``/v1/models`` lists ``model`` (default gpt-4o-mini).
    """

    default_name = "openai"

    def __init__(
        self,
        name: str = "openai",
        *,
        reply: str | None = None,
        chunks: int | None = None,
        model: str | None = None,
        port: int = 0,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name, reply=reply, chunks=chunks, model=model, port=port, api_key=api_key)
        self._wire = OpenAIWire(self._core, default_model="gpt-4o-mini")

    def _routes(self) -> list[BaseRoute]:
        return self._wire.routes()

    def _not_found(self, request: Request) -> Response:
        return self._wire.not_found(request)
