"""Google AI Studio (Gemini API) embeddings: ``POST /v1beta/models/{model}:batchEmbedContents``."""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from ._core import fake_vector
from ._fault import Fault
from ._server import FakeServer

_DEFAULT_MODEL: Final = "text-embedding-004"
_STATUS_NAMES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def gemini_error(status: int, message: str) -> JSONResponse:
    """A Google API error: ``{"error": {"code", "message", "status"}}``."""
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
    return JSONResponse(body, status_code=status)


class FakeGemini(FakeServer):
    """A fake Gemini API for embeddings: ``batchEmbedContents`` (one vector per request, its
    ``outputDimensionality`` honoured) and ``GET /v1beta/models``. Auth is ``x-goog-api-key``
    when ``api_key`` is set. Vectors depend on the model and the text, as in the other fakes."""

    default_name = "gemini"

    def _routes(self) -> list[BaseRoute]:
        checks = [self._check_auth]
        route = self._core.route
        return [
            route("/v1beta/models", self._list_models, ["GET"], checks, self._bad_json),
            route("/v1beta/models/{target:path}", self._call, ["POST"], checks, self._bad_json),
        ]

    def _not_found(self, request: Request) -> Response:
        return gemini_error(404, f"Requested entity was not found: {request.url.path}")

    def _bad_json(self) -> Response:
        return gemini_error(400, "Invalid JSON payload received.")

    def _check_auth(self, request: Request) -> Response | None:
        key = self._core.api_key
        if key is None or request.headers.get("x-goog-api-key") == key:
            return None
        return gemini_error(400, "API key not valid. Please pass a valid API key.")

    def _fault_error(self, fault: Fault) -> Response:
        message = {429: "Resource has been exhausted (e.g. check quota).", 503: "The model is overloaded."}
        return gemini_error(fault.status, message.get(fault.status, "An internal error has occurred."))

    async def _list_models(self, request: Request, body: Any) -> Response:
        model = self._core.model or _DEFAULT_MODEL
        return JSONResponse({"models": [{"name": f"models/{model}", "supportedGenerationMethods": ["embedContent"]}]})

    async def _call(self, request: Request, body: Any) -> Response:
        model, _, method = request.path_params["target"].partition(":")
        if method != "batchEmbedContents":
            return self._not_found(request)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return gemini_error(400, "* BatchEmbedContentsRequest.requests: must not be empty")
        texts = []
        for entry in requests:
            parts = entry.get("content", {}).get("parts") if isinstance(entry, dict) else None
            if entry.get("model") != f"models/{model}" or not isinstance(parts, list):
                return gemini_error(400, "* BatchEmbedContentsRequest.requests: model or content is malformed")
            texts.append(" ".join(str(part.get("text", "")) for part in parts if isinstance(part, dict)))
        _, error = await self._core.open_answer(request, False, self._fault_error)
        if error is not None:
            return error
        served = self._core.model or model
        dimensions = requests[0].get("outputDimensionality")
        vectors = [fake_vector(served, text, dimensions if isinstance(dimensions, int) else None) for text in texts]
        return JSONResponse({"embeddings": [{"values": vector} for vector in vectors]})
