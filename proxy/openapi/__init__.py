"""The proxy's own API description (OpenAPI 3.1), served at `GET /openapi.json`.

It describes what this proxy answers, in OpenAI's shapes: the chat-completions
request it accepts (unknown fields pass through to the provider), the
`ChatCompletion` and SSE chunk answers with the `x-proxy-*` headers, the
OpenAI error body on every error, and the operational and admin endpoints.
Built from small pure helpers that return schema fragments; nothing here does
I/O, and the document is the same for every config.
"""

from __future__ import annotations

from typing import Any

from proxy.openapi.builders import VERSION, Schema
from proxy.openapi.paths import all_paths
from proxy.openapi.responses import security_schemes, shared_responses
from proxy.openapi.schemas import all_schemas

__all__ = ["openapi_spec"]


def openapi_spec() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": _info(),
        "servers": [{"url": "/", "description": "this proxy"}],
        "tags": [
            {"name": "chat", "description": "OpenAI-compatible chat completions and responses, with fallback"},
            {"name": "embeddings", "description": "OpenAI-compatible embeddings, with fallback within one space"},
            {"name": "models", "description": "the routes and providers a client may name as `model`"},
            {"name": "operations", "description": "health, readiness, metrics and this document"},
            {"name": "admin", "description": "behind `server.admin_key`; 404 when it is not set"},
        ],
        "paths": all_paths(),
        "components": {
            "schemas": all_schemas(),
            "responses": shared_responses(),
            "securitySchemes": security_schemes(),
        },
    }


def _info() -> Schema:
    return {
        "title": "fallback-proxy",
        "version": VERSION,
        "summary": "An OpenAI-compatible reverse proxy that keeps LLM answers flowing when a provider fails.",
        "license": {"name": "MIT", "identifier": "MIT"},
    }
