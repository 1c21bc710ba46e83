"""The component schemas: OpenAI's request, answer, chunk, error and model shapes, and the admin ones."""

from __future__ import annotations

from proxy.openapi.apis import schemas as api_schemas
from proxy.openapi.builders import (
    FINISH_REASONS,
    ROLES,
    Schema,
    array,
    boolean,
    const,
    enum,
    integer,
    nullable,
    number,
    obj,
    ref,
    string,
)

# -- schemas ---------------------------------------------------------------------------


def all_schemas() -> dict[str, Schema]:
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
        "AdminProviders": admin_providers_schema(),
        "DisableRequest": obj({"reason": string("why, for the logs (first 200 characters kept)")}),
        "ProviderSwitch": provider_switch_schema(),
        "ReloadOutcome": reload_outcome_schema(),
        **api_schemas(),
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
            "messages": array(
                ref("Message"), minItems=1, description="at most `limits.max_messages` (2000 unless configured)"
            ),
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
            "image_url": obj(
                {"url": string("https URL or data: URL"), "detail": enum(("auto", "low", "high"))}, ("url",)
            ),
        },
        ("type", "image_url"),
    )
    audio = obj(
        {
            "type": const("input_audio"),
            "input_audio": obj({"data": string(), "format": enum(("wav", "mp3"))}, ("data", "format")),
        },
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
    health = obj(
        {
            "state": string("healthy, slow, degraded, offline, or disabled (the config leaves it out: no key)"),
            "breaker": string(),
            "reason": nullable(string()),
        }
    )
    load = obj(
        {
            "in_flight": integer("requests in flight in this worker (a stream until its last byte)"),
            "max_in_flight": nullable(integer("server.max_in_flight; null: no ceiling")),
            "overloaded": boolean(
                "not ready: in flight reached not_ready_at, and has not yet fallen to ready_again_at"
            ),
            "not_ready_at": nullable(integer()),
            "ready_again_at": nullable(integer()),
            "event_loop_lag_seconds": number("the worst event-loop lag of the last seconds"),
        },
        ("in_flight", "overloaded"),
    )
    return obj(
        {
            "ready": boolean(),
            "reason": string("why not ready, when overloaded"),
            "load": load,
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
            "state": string("healthy, slow, degraded, offline, or disabled (the config leaves it out: no key)"),
            "breaker": string(),
            "reason": nullable(string()),
            "disabled": boolean(),
            "ttft_s": nullable(number()),
            "local": boolean(),
            "quota": nullable({"type": "object"}),
        },
        ("state", "breaker", "disabled", "local"),
    )
    store_queue = obj(
        {
            "pending": integer("quota settles and lease releases waiting for the store to answer"),
            "replayed": integer("applied later, once the store answered"),
            "dropped": integer("given up: the queue was full, or the store closed"),
        },
        ("pending", "replayed", "dropped"),
    )
    return obj(
        {
            "config": config,
            "store": string("memory or redis"),
            "store_queue": {**store_queue, "description": "this worker process's replay queue"},
            "providers": {"type": "object", "additionalProperties": provider},
        },
        ("config", "store", "store_queue", "providers"),
    )


def admin_providers_schema() -> Schema:
    usage = obj(
        {"used": integer(minimum=0), "limit": nullable(integer()), "left": nullable(integer(minimum=0))},
        ("used", "limit", "left"),
    )
    quota = obj(
        {
            "day": string("the quota day (in `quotas.timezone`)"),
            "requests": usage,
            "tokens": usage,
            "error": string("the state store could not answer"),
        },
        ("day",),
    )
    last_error = obj(
        {
            "at": number("Unix time"),
            "outcome": string("the failure class"),
            "detail": string("what went wrong, in plain words"),
        },
        ("at", "outcome", "detail"),
    )
    provider = obj(
        {
            "state": enum(("healthy", "slow", "degraded", "offline")),
            "breaker": enum(("closed", "open", "half_open")),
            "reason": nullable(string("why the state is not healthy")),
            "disabled": boolean("switched off by an operator"),
            "local": boolean(),
            "ttft_s": nullable(number("smoothed time to first token")),
            "last_error": nullable({**last_error, "description": "the last failure this process saw"}),
            "quota": nullable({**quota, "description": "null: the provider has no quota"}),
        },
        ("state", "breaker", "reason", "disabled", "local", "ttft_s", "last_error", "quota"),
    )
    return obj(
        {"store": string("memory or redis"), "providers": {"type": "object", "additionalProperties": provider}},
        ("store", "providers"),
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
