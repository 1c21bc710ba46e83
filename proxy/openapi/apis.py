"""The Responses API and embeddings: their operations and OpenAI's shapes for them."""

from __future__ import annotations

from proxy.openapi.builders import (
    BEARER,
    Schema,
    array,
    boolean,
    const,
    enum,
    header_parameter,
    integer,
    json_content,
    nullable,
    number,
    obj,
    operation,
    ref,
    response,
    string,
)
from proxy.openapi.responses import answer_headers, chat_error_headers, error_response

_RESPONSES_SSE = (
    "With `stream: true`: server-sent events `event: <type>` / `data: <event JSON>`: `response.created`, "
    "`response.in_progress`, `response.output_item.added`, `response.content_part.added`, "
    "`response.output_text.delta` ... `.done`, `response.function_call_arguments.delta` ... `.done`, "
    "`response.output_item.done`, then `response.completed` (`response.incomplete` when cut by "
    "`max_output_tokens` or a content filter). A failure after the first event ends the stream with "
    "`response.failed` (its `response.error` says why), never `response.completed`. No `[DONE]`."
)


def paths() -> dict[str, Schema]:
    return {
        "/v1/responses": {"post": responses_operation()},
        "/v1/embeddings": {"post": embeddings_operation()},
    }


def schemas() -> dict[str, Schema]:
    return {
        "ResponsesRequest": responses_request_schema(),
        "Response": response_schema(),
        "ResponseStreamEvent": response_event_schema(),
        "EmbeddingsRequest": embeddings_request_schema(),
        "EmbeddingList": embedding_list_schema(),
    }


def _errors(what: str) -> dict[str, Schema]:
    return {
        "400": error_response(f"bad JSON or a malformed field; {what}", chat_error_headers()),
        "401": error_response(
            "missing or wrong bearer key (code `invalid_api_key`)", chat_error_headers("www-authenticate")
        ),
        "404": error_response(
            "unknown `model` (code `model_not_found`, listing routes and providers)", chat_error_headers()
        ),
        "413": error_response(
            "the body is over `server.max_body_bytes` (code `request_too_large`)", chat_error_headers()
        ),
        "429": error_response(
            "this client key is over its limits (code `rate_limit_exceeded`)", chat_error_headers("retry-after")
        ),
        "431": error_response("the request's headers are too large", chat_error_headers()),
        "4XX": error_response("a plain client error from a provider, passed back as is", chat_error_headers()),
        "503": error_response(
            "every candidate failed (code `all_providers_failed`, naming each and why)", chat_error_headers()
        ),
    }


def _parameters() -> list[Schema]:
    return [
        header_parameter("x-request-id", "your id for this request, echoed back and logged (printable, ≤ 128)"),
        header_parameter("x-proxy-local-only", "`1`, `true` or `yes`: only local providers may answer"),
    ]


def responses_operation() -> Schema:
    content = {
        "application/json": {"schema": ref("Response")},
        "text/event-stream": {"schema": _sse_schema()},
    }
    responses = {
        "200": response("the first provider that could answer did", content, answer_headers()),
        **_errors(
            "or what needs a stored state or OpenAI's own tools (`previous_response_id`, `conversation`, "
            "`store: true`, `background: true`, `prompt`, built-in tools, `item_reference`), named in "
            "`error.param` (code `unsupported_parameter`)"
        ),
    }
    summary = "Create a response (translated to a chat completion for each provider), falling back along the route"
    body = {"required": True, "content": json_content(ref("ResponsesRequest"))}
    return operation(
        "createResponse", summary, "chat", responses, security=[{BEARER: []}], parameters=_parameters(), body=body
    )


def _sse_schema() -> Schema:
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": ref("ResponseStreamEvent")}
    schema = obj({"event": string(), "data": data}, ("data",))
    schema["description"] = _RESPONSES_SSE
    return schema


def embeddings_operation() -> Schema:
    responses = {
        "200": response(
            "the first provider of the route's embedding space that could answer did",
            json_content(ref("EmbeddingList")),
            answer_headers(),
        ),
        **_errors("`input` must be a string, strings, a token array or token arrays"),
    }
    responses["503"] = error_response(
        "every provider of the route's embedding space failed (code `all_providers_failed`); providers of "
        "other spaces are never tried",
        chat_error_headers(),
    )
    summary = "Create embeddings, falling back only within the route's embedding space"
    body = {"required": True, "content": json_content(ref("EmbeddingsRequest"))}
    return operation(
        "createEmbedding",
        summary,
        "embeddings",
        responses,
        security=[{BEARER: []}],
        parameters=_parameters(),
        body=body,
    )


def responses_request_schema() -> Schema:
    item = {"type": "object", "description": "a message, function_call or function_call_output item"}
    return obj(
        {
            "model": string("a route name or one provider's name", minLength=1),
            "input": {"anyOf": [string(), array(item)]},
            "instructions": nullable(string("a system message before the input")),
            "stream": nullable(boolean()),
            "tools": array(
                obj({"type": const("function"), "name": string(), "parameters": {"type": "object"}}, ("type", "name"))
            ),
            "tool_choice": {"anyOf": [enum(("auto", "none", "required")), {"type": "object"}]},
            "text": obj({"format": {"type": "object"}, "verbosity": string()}),
            "max_output_tokens": nullable(integer(minimum=1)),
            "temperature": nullable(number()),
            "top_p": nullable(number()),
            "parallel_tool_calls": nullable(boolean()),
            "metadata": nullable({"type": "object", "additionalProperties": string()}),
            "reasoning": nullable(obj({"effort": nullable(string())})),
            "user": string(),
            "store": nullable(boolean("only `false`: nothing is stored")),
            "previous_response_id": {"type": "null", "description": "not supported: no store"},
        },
        ("model", "input"),
    )


def _usage() -> Schema:
    return obj(
        {
            "input_tokens": integer(),
            "input_tokens_details": obj({"cached_tokens": integer()}),
            "output_tokens": integer(),
            "output_tokens_details": obj({"reasoning_tokens": integer()}),
            "total_tokens": integer(),
        },
        ("input_tokens", "output_tokens", "total_tokens"),
    )


def response_schema() -> Schema:
    item = obj({"id": string(), "type": enum(("message", "function_call", "reasoning")), "status": string()}, ("type",))
    return obj(
        {
            "id": string(pattern="^resp_"),
            "object": const("response"),
            "created_at": number(),
            "status": enum(("completed", "incomplete", "in_progress", "failed")),
            "error": nullable(obj({"code": string(), "message": string()}, ("code", "message"))),
            "incomplete_details": nullable(obj({"reason": enum(("max_output_tokens", "content_filter"))})),
            "model": string("the model that really answered"),
            "output": array(item),
            "usage": nullable(_usage()),
            "previous_response_id": {"type": "null"},
            "store": boolean(),
        },
        ("id", "object", "created_at", "status", "model", "output"),
    )


def response_event_schema() -> Schema:
    return obj({"type": string(), "sequence_number": integer(minimum=0)}, ("type", "sequence_number"))


def embeddings_request_schema() -> Schema:
    tokens = array(integer(minimum=0), minItems=1)
    return obj(
        {
            "model": string("a route name or one provider's name", minLength=1),
            "input": {
                "anyOf": [
                    string(minLength=1),
                    array(string(minLength=1), minItems=1, maxItems=2048),
                    tokens,
                    array(tokens, minItems=1, maxItems=2048),
                ]
            },
            "encoding_format": enum(("float", "base64")),
            "dimensions": integer(minimum=1),
            "user": string(),
        },
        ("model", "input"),
    )


def embedding_list_schema() -> Schema:
    vector = {"anyOf": [array(number()), string("base64 of little-endian float32")]}
    entry = obj(
        {"object": const("embedding"), "index": integer(), "embedding": vector}, ("object", "index", "embedding")
    )
    usage = obj({"prompt_tokens": integer(), "total_tokens": integer()}, ("prompt_tokens", "total_tokens"))
    return obj(
        {"object": const("list"), "data": array(entry), "model": string(), "usage": usage},
        ("object", "data", "model", "usage"),
    )
