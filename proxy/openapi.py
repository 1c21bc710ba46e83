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

Schema = dict[str, Any]

VERSION = "0.1.0"
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
_SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, `data: <ChatCompletionChunk JSON>` each. Headers are held until "
    "the first real token, so a failure before it falls back invisibly. A failure after it either continues on "
    "the next provider or ends with one in-band `data: {\"error\": {...}}` event (the OpenAI error object). "
    "The stream always ends with `data: [DONE]`."
)
BEARER = "bearerAuth"
ADMIN_BEARER = "adminBearerAuth"


def openapi_spec() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": _info(),
        "servers": [{"url": "/", "description": "this proxy"}],
        "tags": [
            {"name": "chat", "description": "OpenAI-compatible chat completions, with fallback"},
            {"name": "models", "description": "the routes and providers a client may name as `model`"},
            {"name": "operations", "description": "health, readiness, metrics and this document"},
            {"name": "admin", "description": "behind `server.admin_key`; 404 when it is not set"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _shared_responses(),
            "securitySchemes": _security_schemes(),
        },
    }


def _info() -> Schema:
    return {
        "title": "fallback-proxy",
        "version": VERSION,
        "summary": "An OpenAI-compatible reverse proxy that keeps LLM answers flowing when a provider fails.",
        "license": {"name": "MIT", "identifier": "MIT"},
    }


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


# -- schemas ---------------------------------------------------------------------------


def _schemas() -> dict[str, Schema]:
    return {
        "ErrorBody": error_body_schema(),
        "ChatCompletionRequest": chat_request_schema(),
        "Message": message_schema(),
        "ContentPart": content_part_schema(),
        "Tool": tool_schema(),
        "ToolCall": tool_call_schema(),
        "ChatCompletion": chat_completion_schema(),
        "ChatCompletionChunk": chat_chunk_schema(),
        "Usage": usage_schema(),
        "Model": model_schema(),
        "ModelList": obj({"object": const("list"), "data": array(ref("Model"))}, ("object", "data")),
        "Health": obj({"status": const("ok")}, ("status",)),
        "Ready": ready_schema(),
        "AdminStatus": admin_status_schema(),
        "DisableRequest": obj({"reason": string("why, for the logs (first 200 characters kept)")}),
        "ProviderSwitch": provider_switch_schema(),
        "ReloadOutcome": reload_outcome_schema(),
    }


def error_body_schema() -> Schema:
    """OpenAI's error object: every error this proxy answers has this body."""
    detail = obj(
        {
            "message": string("what went wrong, for a human"),
            "type": string("invalid_request_error, authentication_error, server_error, ..."),
            "param": nullable(string("the request field at fault")),
            "code": nullable(string("invalid_api_key, model_not_found, request_too_large, all_providers_failed, ...")),
        },
        ("message", "type", "param", "code"),
    )
    return obj({"error": detail}, ("error",))


def chat_request_schema() -> Schema:
    schema = obj(
        {
            "model": string("a route name or one provider's name (that provider alone, no fallback)", minLength=1),
            "messages": array(ref("Message"), minItems=1,
                              description="at most `limits.max_messages` (2000 unless configured)"),
            "stream": nullable(boolean("answer as server-sent events")),
            "stream_options": nullable(obj({"include_usage": boolean("send a last chunk with usage")})),
            **_sampling_properties(),
            **_tool_properties(),
            "response_format": nullable(response_format_schema()),
            "user": string("an end-user id, passed on"),
            "seed": nullable(integer()),
            "metadata": nullable({"type": "object", "additionalProperties": string()}),
            "store": nullable(boolean()),
            "reasoning_effort": nullable(enum(("minimal", "low", "medium", "high"))),
            "service_tier": nullable(string()),
        },
        ("model", "messages"),
    )
    schema["description"] = "OpenAI's chat completions request. Fields not named here are passed to the provider."
    return schema


def _sampling_properties() -> dict[str, Schema]:
    return {
        "max_tokens": nullable(integer("deprecated by OpenAI in favour of max_completion_tokens")),
        "max_completion_tokens": nullable(integer()),
        "temperature": nullable(number(minimum=0, maximum=2)),
        "top_p": nullable(number(minimum=0, maximum=1)),
        "n": nullable(integer(minimum=1, maximum=128)),
        "stop": nullable({"anyOf": [string(), array(string(), maxItems=4)]}),
        "presence_penalty": nullable(number(minimum=-2, maximum=2)),
        "frequency_penalty": nullable(number(minimum=-2, maximum=2)),
        "logit_bias": nullable({"type": "object", "additionalProperties": integer()}),
        "logprobs": nullable(boolean()),
        "top_logprobs": nullable(integer(minimum=0, maximum=20)),
    }


def _tool_properties() -> dict[str, Schema]:
    named_function = obj(
        {"type": const("function"), "function": obj({"name": string()}, ("name",))}, ("type", "function")
    )
    return {
        "tools": array(ref("Tool")),
        "tool_choice": {"anyOf": [enum(("none", "auto", "required")), named_function]},
        "parallel_tool_calls": boolean(),
        "functions": array(function_schema(), description="deprecated by OpenAI in favour of tools"),
        "function_call": {"anyOf": [enum(("none", "auto")), obj({"name": string()}, ("name",))]},
    }


def response_format_schema() -> Schema:
    json_schema = obj(
        {"name": string(), "description": string(), "schema": {"type": "object"}, "strict": nullable(boolean())},
        ("name",),
    )
    return obj({"type": enum(("text", "json_object", "json_schema")), "json_schema": json_schema}, ("type",))


def function_schema() -> Schema:
    return obj(
        {"name": string(), "description": string(), "parameters": {"type": "object"}, "strict": nullable(boolean())},
        ("name",),
    )


def tool_schema() -> Schema:
    return obj({"type": const("function"), "function": function_schema()}, ("type", "function"))


def tool_call_schema() -> Schema:
    function = obj({"name": string(), "arguments": string("JSON text")}, ("name", "arguments"))
    return obj({"id": string(), "type": const("function"), "function": function}, ("id", "type", "function"))


def message_schema() -> Schema:
    content = {"anyOf": [string(), array(ref("ContentPart")), {"type": "null"}]}
    schema = obj(
        {
            "role": enum(ROLES),
            "content": content,
            "name": string(),
            "tool_calls": array(ref("ToolCall")),
            "tool_call_id": string(),
            "refusal": nullable(string()),
        },
        ("role",),
    )
    schema["description"] = "One message; the proxy checks the role and the content's type, the provider the rest."
    return schema


def content_part_schema() -> Schema:
    text = obj({"type": const("text"), "text": string()}, ("type", "text"))
    image = obj(
        {
            "type": const("image_url"),
            "image_url": obj({"url": string("https URL or data: URL"), "detail": enum(("auto", "low", "high"))},
                             ("url",)),
        },
        ("type", "image_url"),
    )
    audio = obj(
        {"type": const("input_audio"), "input_audio": obj({"data": string(), "format": enum(("wav", "mp3"))},
                                                           ("data", "format"))},
        ("type", "input_audio"),
    )
    file = obj(
        {"type": const("file"), "file": obj({"file_data": string(), "file_id": string(), "filename": string()})},
        ("type", "file"),
    )
    return {"anyOf": [text, image, audio, file], "description": "a part of a message's content"}


def usage_schema() -> Schema:
    return obj(
        {"prompt_tokens": integer(), "completion_tokens": integer(), "total_tokens": integer()},
        ("prompt_tokens", "completion_tokens", "total_tokens"),
    )


def chat_completion_schema() -> Schema:
    message = obj(
        {
            "role": const("assistant"),
            "content": nullable(string()),
            "refusal": nullable(string()),
            # null rather than absent when a translated provider (litellm) answered
            "tool_calls": nullable(array(ref("ToolCall"))),
            "function_call": nullable(obj({"name": string(), "arguments": string()})),
        },
        ("role",),
    )
    choice = obj(
        {"index": integer(), "message": message, "finish_reason": nullable(enum(FINISH_REASONS))},
        ("index", "message", "finish_reason"),
    )
    schema = obj(
        {
            "id": string(),
            "object": const("chat.completion"),
            "created": integer("Unix seconds"),
            "model": string("the model that really answered"),
            "choices": array(choice),
            "usage": ref("Usage"),
            "system_fingerprint": nullable(string()),
        },
        ("id", "object", "created", "model", "choices"),
    )
    return schema


def chat_chunk_schema() -> Schema:
    delta = obj(
        {
            "role": enum(("assistant",)),
            "content": nullable(string()),
            "refusal": nullable(string()),
            "tool_calls": array({"type": "object"}),
        }
    )
    choice = obj(
        {"index": integer(), "delta": delta, "finish_reason": nullable(enum(FINISH_REASONS))},
        ("index", "delta"),
    )
    return obj(
        {
            "id": string(),
            "object": const("chat.completion.chunk"),
            "created": integer(),
            "model": string(),
            "choices": array(choice),
            "usage": nullable(ref("Usage")),
        },
        ("id", "object", "created", "model", "choices"),
    )


def model_schema() -> Schema:
    return obj(
        {
            "id": string("a route or provider name"),
            "object": const("model"),
            "created": integer(),
            "owned_by": string("fallback-proxy:route or fallback-proxy:provider"),
        },
        ("id", "object", "created", "owned_by"),
    )


def ready_schema() -> Schema:
    store = obj({"kind": string("memory, redis or none"), "status": string()}, ("kind", "status"))
    health = obj({"state": string(), "breaker": string(), "reason": nullable(string())})
    return obj(
        {
            "ready": boolean(),
            "config": string("the config file, or (in memory)"),
            "routes": integer(),
            "providers": integer(),
            "store": store,
            "health": {"type": "object", "additionalProperties": health},
        },
        ("ready", "config", "routes", "providers", "store", "health"),
    )


def admin_status_schema() -> Schema:
    config = obj(
        {"source": nullable(string()), "sha256": nullable(string()), "routes": array(string())},
        ("source", "sha256", "routes"),
    )
    provider = obj(
        {
            "state": string("HEALTHY, SLOW, DEGRADED or OFFLINE"),
            "breaker": string(),
            "reason": nullable(string()),
            "disabled": boolean(),
            "ttft_s": nullable(number()),
            "local": boolean(),
            "quota": nullable({"type": "object"}),
        },
        ("state", "breaker", "disabled", "local"),
    )
    return obj(
        {"config": config, "store": string(), "providers": {"type": "object", "additionalProperties": provider}},
        ("config", "store", "providers"),
    )


def provider_switch_schema() -> Schema:
    return obj({"provider": string(), "disabled": boolean(), "reason": string()}, ("provider", "disabled"))


def reload_outcome_schema() -> Schema:
    return obj(
        {
            "reloaded": boolean(),
            "source": string(),
            "routes": array(string()),
            "providers": array(string()),
            "restart_needed": {"type": "array", "items": string()},
            "problems": array(string()),
        },
        ("reloaded",),
    )


# -- headers, shared responses, security -----------------------------------------------


def _header_docs() -> dict[str, tuple[str, Schema]]:
    """Each header this proxy sends: its description and value schema."""
    return {
        "x-proxy-route": ("the route (or single provider) the request named", string()),
        "x-proxy-provider": ("the provider that answered", string()),
        "x-proxy-attempts": ("how many providers were tried", integer(minimum=0)),
        "x-proxy-fallbacks": (
            "each provider that did not answer and why, e.g. `openai-4o=timeout,claude=quota_exhausted`; "
            "absent when the first choice answered",
            string(),
        ),
        "x-proxy-trimmed": ("oldest messages dropped to fit the answering provider's context window",
                            integer(minimum=1)),
        "x-request-id": ("the request's id (the client's `x-request-id` when printable, else generated)", string()),
        "www-authenticate": ("`Bearer`", string()),
        "retry-after": ("seconds until this client may send again", integer(minimum=0)),
    }


def header(name: str, *, required: bool = False) -> Schema:
    """A Header object (inline: a reference may not say `required`)."""
    description, schema = _header_docs()[name]
    return {"description": description, "required": required, "schema": schema}


def header_set(*names: str, required: tuple[str, ...] = ()) -> Schema:
    return {name: header(name, required=name in required) for name in names}


def answer_headers() -> Schema:
    """The `x-proxy-*` headers on every proxied answer, streaming or not."""
    return header_set(
        "x-proxy-route", "x-proxy-provider", "x-proxy-attempts", "x-proxy-fallbacks", "x-proxy-trimmed",
        "x-request-id", required=("x-proxy-route", "x-proxy-provider", "x-proxy-attempts", "x-request-id"),
    )


def chat_error_headers(*more: str) -> Schema:
    """On a chat error: the request id always; the route headers once `model` resolved."""
    return header_set("x-request-id", "x-proxy-route", "x-proxy-attempts", "x-proxy-fallbacks", *more,
                      required=("x-request-id",))


def error_response(description: str, headers: Schema | None = None) -> Schema:
    return response(description, json_content(ref("ErrorBody")), headers)


def _shared_responses() -> dict[str, Schema]:
    return {
        "Unauthorized": error_response(
            "missing or wrong bearer key (`authentication_error`, code `invalid_api_key`)",
            header_set("www-authenticate"),
        ),
        "AdminOff": error_response(
            "the admin endpoints are off (no `server.admin_key`), or no such provider (code `not_found`)"
        ),
    }


def _security_schemes() -> dict[str, Schema]:
    return {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "one of `auth.keys`; when no keys are configured the proxy is open",
        },
        ADMIN_BEARER: {"type": "http", "scheme": "bearer", "description": "`server.admin_key`"},
    }


# -- paths -----------------------------------------------------------------------------


def _paths() -> dict[str, Schema]:
    chat = {"post": chat_operation("createChatCompletion")}
    chat_alias = {"post": chat_operation("createChatCompletionWithoutV1")}
    return {
        "/v1/chat/completions": chat,
        "/chat/completions": chat_alias,
        "/v1/models": {"get": list_models_operation()},
        "/v1/models/{model}": {"get": retrieve_model_operation()},
        "/healthz": {"get": healthz_operation()},
        "/readyz": {"get": readyz_operation()},
        "/metrics": {"get": metrics_operation()},
        "/openapi.json": {"get": openapi_operation()},
        "/admin/status": {"get": admin_status_operation()},
        "/admin/providers/{name}/disable": {"post": admin_switch_operation("disable")},
        "/admin/providers/{name}/enable": {"post": admin_switch_operation("enable")},
        "/admin/reload": {"post": admin_reload_operation()},
    }


def chat_operation(operation_id: str) -> Schema:
    body = {"required": True, "content": json_content(ref("ChatCompletionRequest"))}
    parameters = [
        header_parameter("x-request-id", "your id for this request, echoed back and logged (printable, ≤ 128)"),
        header_parameter("x-proxy-local-only", "`1`, `true` or `yes`: only local providers may answer"),
    ]
    responses = {
        "200": response("the first provider that could answer did", chat_answer_content(), answer_headers()),
        "400": error_response("bad JSON, a missing or malformed field, or a provider's 400 passed back as is",
                              chat_error_headers()),
        "401": error_response("missing or wrong bearer key (code `invalid_api_key`)",
                              chat_error_headers("www-authenticate")),
        "404": error_response("unknown `model` (code `model_not_found`, listing routes and providers)",
                              chat_error_headers()),
        "413": error_response("the body is over `server.max_body_bytes` (code `request_too_large`)",
                              chat_error_headers()),
        "422": error_response("a provider's 422 (not about context) passed back as is", chat_error_headers()),
        "429": error_response("this client key is over `limits.requests_per_minute` or `limits.concurrent_streams` "
                              "(`rate_limit_error`, code `rate_limit_exceeded`)", chat_error_headers("retry-after")),
        "431": error_response("the request's headers are over `limits.max_header_bytes` "
                              "(code `request_header_fields_too_large`)", chat_error_headers()),
        "4XX": error_response("another plain client error from a provider, passed back as is (no fallback)",
                              chat_error_headers()),
        "503": error_response("every candidate failed (code `all_providers_failed`, naming each and why)",
                              chat_error_headers()),
    }
    summary = "Create a chat completion, falling back along the route's graph"
    return operation(operation_id, summary, "chat", responses, security=[{BEARER: []}], parameters=parameters,
                     body=body)


def chat_answer_content() -> Schema:
    stream = {"schema": sse_event_schema()}
    return {"application/json": {"schema": ref("ChatCompletion")}, "text/event-stream": stream}


def sse_event_schema() -> Schema:
    """One server-sent event of a streamed answer (OpenAPI 3.1 reads an event
    stream's `schema` as the schema of each event): its `data` is a chunk, an
    in-band error, or the final `[DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref("ChatCompletionChunk"), ref("ErrorBody")]},
    }
    schema = obj(
        {"event": string(), "id": string(), "retry": integer(), "data": {"anyOf": [const("[DONE]"), json_data]}},
        ("data",),
    )
    schema["description"] = _SSE_DESCRIPTION
    return schema


def list_models_operation() -> Schema:
    responses = {"200": response("routes, then providers", json_content(ref("ModelList")))}
    return operation("listModels", "The routes and providers a client may name as `model`", "models", responses)


def retrieve_model_operation() -> Schema:
    responses = {
        "200": response("the route or provider", json_content(ref("Model"))),
        "404": error_response("no route or provider of that name (code `model_not_found`)"),
    }
    parameters = [path_parameter("model", "a route or provider name")]
    return operation("retrieveModel", "One route or provider", "models", responses, parameters=parameters)


def healthz_operation() -> Schema:
    responses = {"200": response("the process is alive", json_content(ref("Health")))}
    return operation("healthz", "Liveness", "operations", responses)


def readyz_operation() -> Schema:
    responses = {
        "200": response("config loaded; the state store's status", json_content(ref("Ready"))),
        "503": response("starting or draining", json_content(ref("Ready"))),
    }
    return operation("readyz", "Readiness", "operations", responses)


def metrics_operation() -> Schema:
    content = {"text/plain": {"schema": {"type": "string", "description": "Prometheus text exposition format"}}}
    responses = {"200": response("fallback_proxy_* counters and histograms", content)}
    return operation("metrics", "Prometheus metrics", "operations", responses)


def openapi_operation() -> Schema:
    responses = {"200": response("this document", json_content({"type": "object"}))}
    return operation("openapi", "This OpenAPI document", "operations", responses)


def _admin_responses(ok: Schema) -> Schema:
    return {"200": ok, "401": ref("Unauthorized", "responses"), "404": ref("AdminOff", "responses")}


def admin_status_operation() -> Schema:
    responses = _admin_responses(response("health, breaker and quota per provider", json_content(ref("AdminStatus"))))
    return operation("adminStatus", "Health and quota state", "admin", responses, security=[{ADMIN_BEARER: []}])


def admin_switch_operation(action: str) -> Schema:
    ok = response(f"the provider is {action}d", json_content(ref("ProviderSwitch")))
    parameters = [path_parameter("name", "a provider name")]
    body = None
    if action == "disable":
        note = "optional; a body that is not this JSON object is ignored (the reason is then `drill`)"
        body = {"required": False, "description": note, "content": json_content(ref("DisableRequest"))}
    summary = f"{action.capitalize()} a provider (drills); the health state machine keeps running"
    return operation(f"admin{action.capitalize()}Provider", summary, "admin", _admin_responses(ok),
                     security=[{ADMIN_BEARER: []}], parameters=parameters, body=body)


def admin_reload_operation() -> Schema:
    responses = _admin_responses(response("the new config is serving", json_content(ref("ReloadOutcome"))))
    responses["422"] = response("the config was not reloaded; `problems` says why", json_content(ref("ReloadOutcome")))
    summary = "Load the config file again; swap it in if valid, else keep serving the old one"
    return operation("adminReload", summary, "admin", responses, security=[{ADMIN_BEARER: []}])
