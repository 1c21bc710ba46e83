"""Ollama native API (``/api/*``) plus its OpenAI-compatible ``/v1`` endpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from ._core import StreamPlan, count_words, embedding_texts, fake_vector, format_seconds, json_bytes, prompt_words
from ._fault import Fault
from ._openai import OpenAIWire
from ._server import FakeServer

_DEFAULT_MODEL: Final = "qwen2.5:7b"
_NDJSON: Final = "application/x-ndjson"
_MODIFIED_AT: Final = "2025-06-01T12:00:00.000000000Z"


def ollama_error(status: int, message: str) -> JSONResponse:
    """An Ollama-style error: ``{"error": "<message>"}``."""
    return JSONResponse({"error": message}, status_code=status)


def _now() -> str:
    """Ollama's ``created_at``: RFC 3339 UTC with a ``Z`` suffix."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _full_name(model: str) -> str:
    """Ollama names without a tag mean ``:latest``."""
    return model if ":" in model else f"{model}:latest"


def _details() -> dict[str, Any]:
    """The ``details`` object of a model (plausible values for a 7B Qwen 2.5)."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "qwen2",
        "families": ["qwen2"],
        "parameter_size": "7.6B",
        "quantization_level": "Q4_K_M",
    }


def _line(data: Any) -> bytes:
    return json_bytes(data) + b"\n"


def _stats(prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
    """Plausible timing stats (nanoseconds) for a finished generation."""
    load, prompt_ns, eval_ns = 2_000_000, prompt_tokens * 1_000_000, eval_tokens * 20_000_000
    return {
        "total_duration": load + prompt_ns + eval_ns + 1_000_000,
        "load_duration": load,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_tokens,
        "eval_duration": eval_ns,
    }


class FakeOllama(FakeServer):
    """A fake Ollama daemon: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``, ``/api/show``, ``/api/version``,
    ``GET /`` ("Ollama is running"), and the OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``.

    It has one model (``model``, default ``qwen2.5:7b``); requests for other models get Ollama's
    404. ``/api/chat`` and ``/api/generate`` stream NDJSON unless ``"stream": false``; an empty
    ``/api/generate`` prompt is a load (warm-up) request. ``api_key`` (Bearer) is optional, as
    for an Ollama behind an authenticating proxy.
    """

    default_name = "ollama"

    def __init__(
        self,
        name: str = "ollama",
        *,
        reply: str | None = None,
        chunks: int | None = None,
        model: str | None = None,
        port: int = 0,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name, reply=reply, chunks=chunks, model=model or _DEFAULT_MODEL, port=port, api_key=api_key)
        self._model = model or _DEFAULT_MODEL
        self._openai = OpenAIWire(
            self._core, default_model=self._model, owned_by="library", known_models=[self._model], floats_only=True
        )

    @property
    def model(self) -> str:
        return self._model

    def _routes(self) -> list[BaseRoute]:
        checks = [self._check_auth]
        route = self._core.route
        return [
            route("/", self._root, ["GET"], [], self._bad_json),
            route("/api/version", self._version, ["GET"], checks, self._bad_json),
            route("/api/tags", self._tags, ["GET"], checks, self._bad_json),
            route("/api/show", self._show, ["POST"], checks, self._bad_json),
            route("/api/chat", self._chat, ["POST"], checks, self._bad_json),
            route("/api/generate", self._generate, ["POST"], checks, self._bad_json),
            route("/api/embed", self._embed, ["POST"], checks, self._bad_json),
            *self._openai.routes(),
        ]

    # -- checks and errors -------------------------------------------------------------------

    def _bad_json(self) -> Response:
        return ollama_error(400, "invalid character looking for beginning of value")

    def _check_auth(self, request: Request) -> Response | None:
        if self._core.api_key is None or request.headers.get("authorization") == f"Bearer {self._core.api_key}":
            return None
        return ollama_error(401, "unauthorized")

    def _fault_error(self, fault: Fault) -> Response:
        if fault.error_code == "context_length_exceeded":
            message = "the input length exceeds the context length"
        elif fault.error_code:
            message = fault.error_code
        elif fault.status == 503:
            message = "server busy, please try again.  maximum pending requests exceeded"
        elif fault.status == 500:
            message = "llama runner process has terminated: exit status 2"
        elif fault.status == 404:
            message = f'model "{self._model}" not found, try pulling it first'
        else:
            message = {400: "invalid request", 401: "unauthorized", 429: "too many requests"}.get(fault.status, "error")
        response = ollama_error(fault.status, message)
        if fault.retry_after is not None:
            response.headers["retry-after"] = format_seconds(fault.retry_after)
        return response

    def _check_model(self, body: Any) -> Response | None:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return ollama_error(400, "model is required")
        if _full_name(body["model"]) != _full_name(self._model):
            return ollama_error(404, f'model "{body["model"]}" not found, try pulling it first')
        return None

    # -- metadata endpoints ------------------------------------------------------------------

    async def _root(self, request: Request, body: Any) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request, body: Any) -> Response:
        return JSONResponse({"version": "0.12.6"})

    async def _tags(self, request: Request, body: Any) -> Response:
        digest = hashlib.sha256(self._model.encode()).hexdigest()
        entry = {
            "name": self._model,
            "model": self._model,
            "modified_at": _MODIFIED_AT,
            "size": 4683087332,
            "digest": digest,
            "details": _details(),
        }
        return JSONResponse({"models": [entry]})

    async def _show(self, request: Request, body: Any) -> Response:
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or _full_name(name) != _full_name(self._model):
            return ollama_error(404, f"model '{name}' not found")
        return JSONResponse(
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {self._model}\n',
                "parameters": 'stop                           "<|im_start|>"\nstop                           "<|im_end|>"',
                "template": "{{- if .Tools }}<tools>{{ range .Tools }}{{ . }}{{ end }}</tools>{{ end }}{{ .Prompt }}",
                "details": _details(),
                "model_info": {
                    "general.architecture": "qwen2",
                    "general.parameter_count": 7615616512,
                    "qwen2.context_length": 32768,
                    "qwen2.embedding_length": 3584,
                },
                "capabilities": ["completion", "tools"],
                "modified_at": _MODIFIED_AT,
            }
        )

    # -- generation endpoints ----------------------------------------------------------------

    async def _chat(self, request: Request, body: Any) -> Response:
        invalid = self._check_model(body)
        if invalid is not None:
            return invalid
        stream = body.get("stream", True) is not False
        messages = body.get("messages")
        if not messages:
            return await self._load(request, body, {"message": {"role": "assistant", "content": ""}})
        if not self._core.begin(messages):
            return JSONResponse({"error": "the last message must not be from the assistant"}, status_code=400)
        fault, error = await self._core.open_answer(request, stream, self._fault_error)
        if error is not None:
            return error
        prompt_tokens = prompt_words(messages)
        if stream:
            plan = self._plan(lambda piece: {"message": {"role": "assistant", "content": piece}}, prompt_tokens)
            return StreamingResponse(self._core.stream(fault, plan), media_type=_NDJSON)
        final = self._final({"message": {"role": "assistant", "content": self._core.reply}}, prompt_tokens)
        return JSONResponse(final)

    async def _generate(self, request: Request, body: Any) -> Response:
        invalid = self._check_model(body)
        if invalid is not None:
            return invalid
        prompt = body.get("prompt")
        if not prompt and not body.get("images"):
            return await self._load(request, body, {"response": ""})
        stream = body.get("stream", True) is not False
        fault, error = await self._core.open_answer(request, stream, self._fault_error)
        if error is not None:
            return error
        prompt_tokens = count_words(prompt if isinstance(prompt, str) else "")
        if stream:
            plan = self._plan(lambda piece: {"response": piece}, prompt_tokens, final_extra={"context": [1, 2, 3]})
            return StreamingResponse(self._core.stream(fault, plan), media_type=_NDJSON)
        final = self._final({"response": self._core.reply, "context": [1, 2, 3]}, prompt_tokens)
        return JSONResponse(final)

    async def _embed(self, request: Request, body: Any) -> Response:
        """``POST /api/embed``: ``input`` a string or a list of strings; ``dimensions`` honoured."""
        invalid = self._check_model(body)
        if invalid is not None:
            return invalid
        value = body.get("input")
        texts = embedding_texts(value)
        if texts is None or not all(isinstance(v, str) for v in (value if isinstance(value, list) else [value])):
            return ollama_error(400, "invalid input type")
        _, error = await self._core.open_answer(request, False, self._fault_error)
        if error is not None:
            return error
        dimensions = body.get("dimensions") if isinstance(body.get("dimensions"), int) else None
        vectors = [fake_vector(self._model, text, dimensions) for text in texts]
        tokens = sum(count_words(text) for text in texts)
        stats = {"total_duration": 14_143_917, "load_duration": 1_019_500, "prompt_eval_count": tokens}
        return JSONResponse({"model": self._model, "embeddings": vectors, **stats})

    async def _load(self, request: Request, body: dict[str, Any], empty: dict[str, Any]) -> Response:
        """An empty chat/generate request only loads the model (``keep_alive: 0`` unloads it)."""
        _, error = await self._core.open_answer(request, False, self._fault_error)
        if error is not None:
            return error
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s", "0m") else "load"
        return JSONResponse({"model": self._model, "created_at": _now(), **empty, "done_reason": reason, "done": True})

    # -- answer builders ---------------------------------------------------------------------

    def _final(self, payload: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        head = {"model": self._model, "created_at": _now(), **payload}
        return {**head, "done": True, "done_reason": "stop", **_stats(prompt_tokens, count_words(self._core.reply))}

    def _plan(
        self,
        piece_payload: Callable[[str], dict[str, Any]],
        prompt_tokens: int,
        final_extra: dict[str, Any] | None = None,
    ) -> StreamPlan:
        created = _now()
        content = [
            _line({"model": self._model, "created_at": created, **piece_payload(piece), "done": False})
            for piece in self._core.pieces()
        ]
        final = self._final({**piece_payload(""), **(final_extra or {})}, prompt_tokens)
        return StreamPlan(
            preamble=[],
            content=content,
            epilogue=[_line(final)],
            error_event=_line({"error": "an error was encountered while running the model: unexpected EOF"}),
        )
