"""The operations, one builder per endpoint."""

from __future__ import annotations

from proxy.openapi.apis import paths as api_paths
from proxy.openapi.builders import (
    ADMIN_BASIC,
    ADMIN_BEARER,
    BEARER,
    SSE_DESCRIPTION,
    Schema,
    const,
    header_parameter,
    integer,
    json_content,
    obj,
    operation,
    path_parameter,
    ref,
    response,
    string,
)
from proxy.openapi.responses import answer_headers, chat_error_headers, error_response

# -- paths -----------------------------------------------------------------------------


def all_paths() -> dict[str, Schema]:
    chat = {"post": chat_operation("createChatCompletion")}
    chat_alias = {"post": chat_operation("createChatCompletionWithoutV1")}
    return {
        "/v1/chat/completions": chat,
        "/chat/completions": chat_alias,
        **api_paths(),
        "/v1/models": {"get": list_models_operation()},
        "/v1/models/{model}": {"get": retrieve_model_operation()},
        "/healthz": {"get": healthz_operation()},
        "/readyz": {"get": readyz_operation()},
        "/metrics": {"get": metrics_operation()},
        "/openapi.json": {"get": openapi_operation()},
        "/admin/status": {"get": admin_status_operation()},
        "/admin/providers": {"get": admin_providers_operation()},
        "/status": {"get": status_page_operation()},
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
        "400": error_response(
            "bad JSON, a missing or malformed field, or a provider's 400 passed back as is", chat_error_headers()
        ),
        "401": error_response(
            "missing or wrong bearer key (code `invalid_api_key`)", chat_error_headers("www-authenticate")
        ),
        "404": error_response(
            "unknown `model` (code `model_not_found`, listing routes and providers)", chat_error_headers()
        ),
        "413": error_response(
            "the body is over `server.max_body_bytes` (code `request_too_large`)", chat_error_headers()
        ),
        "422": error_response("a provider's 422 (not about context) passed back as is", chat_error_headers()),
        "429": error_response(
            "this client key is over `limits.requests_per_minute` or `limits.concurrent_streams` "
            "(`rate_limit_error`, code `rate_limit_exceeded`)",
            chat_error_headers("retry-after"),
        ),
        "431": error_response(
            "the request's headers are over `limits.max_header_bytes` (code `request_header_fields_too_large`)",
            chat_error_headers(),
        ),
        "4XX": error_response(
            "another plain client error from a provider, passed back as is (no fallback)", chat_error_headers()
        ),
        "503": error_response(
            "every candidate failed (code `all_providers_failed`, naming each and why); or this worker is at "
            "`server.max_in_flight`, or every provider's connection slots stayed busy (code `server_overloaded`, "
            "with Retry-After: send it again, another replica may have room)",
            chat_error_headers("retry-after"),
        ),
    }
    summary = "Create a chat completion, falling back along the route's graph"
    return operation(
        operation_id, summary, "chat", responses, security=[{BEARER: []}], parameters=parameters, body=body
    )


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
    schema["description"] = SSE_DESCRIPTION
    return schema


def list_models_operation() -> Schema:
    responses = {"200": response("routes, then providers", json_content(ref("ModelList")))}
    responses["401"] = ref("Unauthorized", "responses")
    summary = "The routes and providers a client may name as `model`"
    return operation("listModels", summary, "models", responses, security=[{BEARER: []}])


def retrieve_model_operation() -> Schema:
    responses = {
        "200": response("the route or provider", json_content(ref("Model"))),
        "401": ref("Unauthorized", "responses"),
        "404": error_response("no route or provider of that name (code `model_not_found`)"),
    }
    parameters = [path_parameter("model", "a route or provider name")]
    return operation(
        "retrieveModel", "One route or provider", "models", responses, security=[{BEARER: []}], parameters=parameters
    )


def healthz_operation() -> Schema:
    responses = {"200": response("the process is alive", json_content(ref("Health")))}
    return operation("healthz", "Liveness", "operations", responses)


def readyz_operation() -> Schema:
    responses = {
        "200": response("config loaded; the state store's status", json_content(ref("Ready"))),
        "503": response(
            "starting or draining, or overloaded (in flight above 90% of `server.max_in_flight`, until back "
            "below 70%): `reason` says which",
            json_content(ref("Ready")),
        ),
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


def admin_providers_operation() -> Schema:
    ok = response(
        "per provider: health state, breaker, last error, quota used and left today, disabled",
        json_content(ref("AdminProviders")),
    )
    summary = "Each provider's health, breaker, last error and quota today"
    return operation("adminProviders", summary, "admin", _admin_responses(ok), security=[{ADMIN_BEARER: []}])


def status_page_operation() -> Schema:
    html = {"text/html": {"schema": {"type": "string", "description": "an HTML page; no scripts"}}}
    challenge = {
        "www-authenticate": {
            "description": '`Basic realm="fallback-proxy status", charset="UTF-8"` (a browser then asks for '
            "the admin key), or `Bearer` when a wrong bearer key was sent",
            "required": True,
            "schema": string(),
        }
    }
    refresh = {
        "name": "refresh",
        "in": "query",
        "required": False,
        "description": "seconds between automatic reloads of the page (default 5; 0: none; at most 3600)",
        "schema": integer(minimum=0),
    }
    responses = {
        "200": response("every route's graph, each provider's health, quota and last error, recent failovers", html),
        "401": error_response("no or a wrong admin key (code `invalid_api_key`)", challenge),
        "404": ref("AdminOff", "responses"),
    }
    summary = "The status page for operators (HTML, reloads itself)"
    security: list[Schema] = [{ADMIN_BASIC: []}, {ADMIN_BEARER: []}]
    return operation("statusPage", summary, "admin", responses, security=security, parameters=[refresh])


def admin_switch_operation(action: str) -> Schema:
    ok = response(f"the provider is {action}d", json_content(ref("ProviderSwitch")))
    parameters = [path_parameter("name", "a provider name")]
    body = None
    if action == "disable":
        note = "optional; a body that is not this JSON object is ignored (the reason is then `drill`)"
        body = {"required": False, "description": note, "content": json_content(ref("DisableRequest"))}
    summary = f"{action.capitalize()} a provider (drills); the health state machine keeps running"
    return operation(
        f"admin{action.capitalize()}Provider",
        summary,
        "admin",
        _admin_responses(ok),
        security=[{ADMIN_BEARER: []}],
        parameters=parameters,
        body=body,
    )


def admin_reload_operation() -> Schema:
    responses = _admin_responses(response("the new config is serving", json_content(ref("ReloadOutcome"))))
    responses["422"] = response("the config was not reloaded; `problems` says why", json_content(ref("ReloadOutcome")))
    summary = "Load the config file again; swap it in if valid, else keep serving the old one"
    return operation("adminReload", summary, "admin", responses, security=[{ADMIN_BEARER: []}])
