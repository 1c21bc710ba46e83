"""Headers, shared responses and security schemes."""

from __future__ import annotations

from proxy.openapi.builders import (
    ADMIN_BASIC,
    ADMIN_BEARER,
    BEARER,
    Schema,
    integer,
    json_content,
    ref,
    response,
    string,
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
        "x-proxy-trimmed": (
            "oldest messages dropped to fit the answering provider's context window",
            integer(minimum=1),
        ),
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
        "x-proxy-route",
        "x-proxy-provider",
        "x-proxy-attempts",
        "x-proxy-fallbacks",
        "x-proxy-trimmed",
        "x-request-id",
        required=("x-proxy-route", "x-proxy-provider", "x-proxy-attempts", "x-request-id"),
    )


def chat_error_headers(*more: str) -> Schema:
    """On a chat error: the request id always; the route headers once `model` resolved."""
    return header_set(
        "x-request-id", "x-proxy-route", "x-proxy-attempts", "x-proxy-fallbacks", *more, required=("x-request-id",)
    )


def error_response(description: str, headers: Schema | None = None) -> Schema:
    return response(description, json_content(ref("ErrorBody")), headers)


def shared_responses() -> dict[str, Schema]:
    return {
        "Unauthorized": error_response(
            "missing or wrong bearer key (`authentication_error`, code `invalid_api_key`)",
            header_set("www-authenticate"),
        ),
        "AdminOff": error_response(
            "the admin endpoints are off (no `server.admin_key`), or no such provider (code `not_found`)"
        ),
    }


def security_schemes() -> dict[str, Schema]:
    return {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "one of `auth.keys`; when no keys are configured the proxy is open",
        },
        ADMIN_BEARER: {"type": "http", "scheme": "bearer", "description": "`server.admin_key`"},
        ADMIN_BASIC: {
            "type": "http",
            "scheme": "basic",
            "description": "any user name, `server.admin_key` as the password (a browser asks for them)",
        },
    }
