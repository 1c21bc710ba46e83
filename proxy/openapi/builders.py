"""Small pure builders of OpenAPI schema fragments, and the constants they share."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

VERSION = "0.1.0"
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, `data: <ChatCompletionChunk JSON>` each. Headers are held until "
    "the first real token, so a failure before it falls back invisibly. A failure after it either continues on "
    'the next provider or ends with one in-band `data: {"error": {...}}` event (the OpenAI error object). '
    "The stream always ends with `data: [DONE]`."
)
BEARER = "bearerAuth"
ADMIN_BEARER = "adminBearerAuth"
ADMIN_BASIC = "adminBasicAuth"


# -- small builders ---------------------------------------------------------------------


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema` or JSON null (OpenAPI 3.1 has no `nullable`)."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    """An object schema. Properties beyond those named are allowed: the proxy
    passes what it does not know on, and OpenAI adds fields to its answers."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def string(description: str = "", **constraints: Any) -> Schema:
    return _described({"type": "string", **constraints}, description)


def integer(description: str = "", **constraints: Any) -> Schema:
    return _described({"type": "integer", **constraints}, description)


def number(description: str = "", **constraints: Any) -> Schema:
    return _described({"type": "number", **constraints}, description)


def boolean(description: str = "") -> Schema:
    return _described({"type": "boolean"}, description)


def const(value: str) -> Schema:
    return {"type": "string", "const": value}


def enum(values: tuple[str, ...]) -> Schema:
    return {"type": "string", "enum": list(values)}


def array(items: Schema, **constraints: Any) -> Schema:
    return {"type": "array", "items": items, **constraints}


def _described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description} if description else schema


def json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def response(description: str, content: Schema | None = None, headers: Schema | None = None) -> Schema:
    answer: Schema = {"description": description}
    if headers:
        answer["headers"] = headers
    if content:
        answer["content"] = content
    return answer


def operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: Schema,
    *,
    security: list[Schema] | None = None,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
) -> Schema:
    """One operation; `security=None` means open (no key needed)."""
    op: Schema = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    op["responses"] = responses
    op["security"] = security if security is not None else []
    return op


def path_parameter(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": string()}


def header_parameter(name: str, description: str) -> Schema:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": string()}
