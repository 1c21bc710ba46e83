"""The error taxonomy and the OpenAI-shaped error bodies.

Two families, drawn once here:

    ProxyError                      answered to the client: status + OpenAI error body
    ├── InvalidRequest              400 invalid_request_error (bad JSON, bad messages, ...)
    ├── AuthenticationFailed        401 authentication_error (missing or wrong bearer key)
    ├── ModelNotFound               404 model_not_found (lists what exists)
    ├── PayloadTooLarge             413 request_too_large
    ├── HeadersTooLarge             431 request_header_fields_too_large
    ├── ClientRateLimited           429 rate_limit_exceeded (per client key: rate or open streams)
    ├── ServerOverloaded            503 server_overloaded + Retry-After (this worker is at its
    │                               ceiling of requests in flight: shed before any work)
    └── AllProvidersFailed          503 all_providers_failed (names each provider and why;
                                    says so when private work found no local provider);
                                    server_overloaded + Retry-After when the only reason was
                                    the proxy's own saturation (no free connection slot)

    ProviderError                   one upstream attempt failed; `.failure` is its class
                                    (a FailureClass) and decides which graph edge to follow;
                                    `.sent` and `.unanswered` say whether it may have reached
                                    the upstream (the quota refunds only calls never sent);
                                    `.message` is plain words for clients (in-band errors,
                                    503s), `.cause` the technical detail for the log line.

A `ProviderError` whose class is `client_error` is not fallback-worthy: the
request would fail everywhere, so the upstream's answer goes back to the client
unchanged in meaning (`UpstreamClientError` renders it). So does a
`content_filtered` refusal, unless the route opts in to falling back on it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import orjson


class FailureClass(enum.StrEnum):
    """Why an attempt failed or was skipped; graph edges are keyed by these values."""

    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    AUTH_ERROR = "auth_error"
    MISCONFIGURED = "misconfigured"  # the provider's own configuration is wrong (never the client's 400)
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"
    CONTENT_FILTERED = "content_filtered"
    # Skip reasons: decided before any network call.
    UNHEALTHY = "unhealthy"
    QUOTA_EXHAUSTED = "quota_exhausted"
    UNSUPPORTED = "unsupported"
    POLICY = "policy"
    # The proxy's own limit, not the provider's failure: every one of the provider's
    # connection slots (`max_connections`) stayed busy for its pool wait (nothing was
    # sent), or a deadline expired while this worker's event loop lagged (the answer
    # may have been waiting, unread). It never counts against the provider's health;
    # the walk goes on.
    PROXY_SATURATED = "proxy_saturated"
    # Not fallback-worthy: returned to the client at once.
    CLIENT_ERROR = "client_error"

    @property
    def is_skip(self) -> bool:
        return self in _SKIPS


_SKIPS = frozenset(
    {
        FailureClass.UNHEALTHY,
        FailureClass.QUOTA_EXHAUSTED,
        FailureClass.UNSUPPORTED,
        FailureClass.POLICY,
    }
)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """An OpenAI error body, as bytes ready to send."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class ProxyError(Exception):
    """An error the proxy answers itself, with an HTTP status and an OpenAI error body."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class AuthenticationFailed(ProxyError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class ModelNotFound(ProxyError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    param = "model"

    def __init__(self, model: str, routes: Sequence[str], providers: Sequence[str]) -> None:
        known = ", ".join(list(routes) + list(providers)) or "(none configured)"
        super().__init__(
            f"The model '{model}' does not exist on this proxy. "
            f"Routes: {', '.join(routes) or '(none)'}; providers: {', '.join(providers) or '(none)'}. "
            f"Use one of: {known}."
        )


class PayloadTooLarge(ProxyError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than this proxy's limit of {limit} bytes.")


class HeadersTooLarge(ProxyError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "request_header_fields_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request headers are larger than this proxy's limit of {limit} bytes.")


class ClientRateLimited(ProxyError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class ServerOverloaded(ProxyError):
    """This worker carries as many requests as it is configured to (`server.max_in_flight`):
    a new one is refused at once, before any work, so those in flight keep their pace."""

    status_code = 503
    error_type = "server_error"
    code = "server_overloaded"

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        super().__init__(
            f"This proxy worker is at its limit of {limit} requests in flight; retry shortly "
            "(another replica may have room)."
        )
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class ProviderError(Exception):
    """One upstream attempt failed. Raised only by adapters (after classification)
    and by the dispatcher for skips; `failure` picks the graph edge to follow.

    `sent` is False only when the call provably never left (the connection could
    not be made, or the request body could not be written); by default a failed
    call may have reached the upstream. `unanswered` is True when the exchange
    broke with no answer at all (the server went away, a reset): nobody can tell
    whether the upstream received the call. Both are decided by `classify`.

    `message` names the failure in plain words, for clients (the in-band error
    of a stream, the 503's listing); `cause` keeps what the operator needs to
    dig (the exception class and its text) and goes only to the log line."""

    def __init__(
        self,
        failure: FailureClass,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        body: bytes | None = None,
        provider: str = "",
        sent: bool = True,
        unanswered: bool = False,
        cause: str = "",
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message
        self.cause = cause
        self.status_code = status_code
        self.retry_after = retry_after
        self.body = body
        self.provider = provider
        self.sent = sent
        self.unanswered = unanswered

    def __repr__(self) -> str:
        return f"ProviderError({self.provider or '?'}={self.failure.value}, {self.message!r})"


class UpstreamClientError(ProxyError):
    """A provider's 4xx that would fail anywhere: returned to the client as is."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(error.message)
        self.status_code = error.status_code or 400
        self.upstream = error

    def body(self) -> bytes:
        body = self.upstream.body
        if body and _is_openai_error(body):
            return body
        return error_body(self.message, "invalid_request_error", None)


def _is_openai_error(body: bytes) -> bool:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


class Attempt:
    """The outcome of one provider on the walk: answered, failed or skipped."""

    __slots__ = ("cause", "detail", "ms", "outcome", "provider")

    def __init__(self, provider: str, outcome: str, ms: float, detail: str = "", cause: str = "") -> None:
        self.provider = provider
        self.outcome = outcome  # "ok" or a FailureClass value
        self.ms = ms
        self.detail = detail  # plain words: may reach the client (the 503's listing)
        self.cause = cause  # the technical detail (exception class and text): the log line only

    def __repr__(self) -> str:
        return f"Attempt({self.provider}={self.outcome}, {self.ms:.1f}ms)"


class AllProvidersFailed(ProxyError):
    status_code = 503
    error_type = "server_error"
    code = "all_providers_failed"

    def __init__(self, route: str, attempts: Sequence[Attempt], *, local_only: bool = False) -> None:
        parts = [f"{a.provider}: {a.outcome}" + (f" ({a.detail})" if a.detail else "") for a in attempts]
        listing = "; ".join(parts) or "no provider was eligible"
        prefix = "No local provider could answer this private request" if local_only else "Every provider failed"
        super().__init__(f"{prefix} on route '{route}': {listing}.")
        self.attempts = tuple(attempts)
        saturated = FailureClass.PROXY_SATURATED.value
        self.saturated = bool(attempts) and all(a.outcome == saturated for a in attempts)
        if self.saturated:
            # No provider failed: this proxy was too busy (no free connection, or its loop lagged).
            self.code = ServerOverloaded.code

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"} if self.saturated else {}
