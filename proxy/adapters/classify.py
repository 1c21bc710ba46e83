"""The one place where foreign errors become our `ProviderError` classes.

Inputs are HTTP statuses with their bodies and headers (any mapping: httpx's
`Headers`, aiohttp's `CIMultiDictProxy`), transport exceptions (aiohttp's
own, httpx's, and the aiohttp errors that httpx-aiohttp wraps), in-band stream
errors and litellm exceptions. Everything here is pure: it inspects and returns.

Besides the failure class, a transport failure says whether the call may have
reached the upstream (`ProviderError.sent`, `.unanswered`): the quota refunds
only a call that provably never left.

A foreign exception's class and text (`ClientPayloadError: Response payload is
not completed: <TransferEncodingError…>`) mean something to an operator, not to
a client: `ProviderError.message` names the failure in plain words, and
`ProviderError.cause` keeps the exception for the log line.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import httpx
import orjson

from proxy.errors import FailureClass, ProviderError

_CONTEXT_HINTS = (
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "context window",
    "prompt is too long",
    "too many tokens",
    "exceeds the context",
    "input is too long",
    "reduce the length",
)
_FILTER_HINTS = ("content_filter", "content_policy", "content policy", "safety system", "responsibleai")
# What litellm says, before any call, when a provider's own configuration is wrong.
_MISCONFIGURED_HINTS = (
    "llm provider not provided",
    "unmapped llm provider",
    "api_base is required",
    "missing api_base",
    "api base is required",
    "invalid model name passed in",
)


def from_status(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> ProviderError:
    """Classify an upstream HTTP error response."""
    message = _error_message(body) or f"HTTP {status}"
    retry_after = parse_retry_after(headers or {})
    failure = _failure_for_status(status, message.lower(), body)
    return ProviderError(
        failure,
        f"HTTP {status}: {message}"[:500],
        status_code=status,
        retry_after=retry_after,
        body=body[:65536],
    )


def _failure_for_status(status: int, message: str, body: bytes) -> FailureClass:
    if status == 429:
        return FailureClass.RATE_LIMITED
    if status in (401, 403):
        return FailureClass.AUTH_ERROR
    if status == 408:
        return FailureClass.TIMEOUT
    if status >= 500:
        return FailureClass.SERVER_ERROR
    lowered = body[:4096].decode("utf-8", "replace").lower()
    if any(hint in message or hint in lowered for hint in _CONTEXT_HINTS):
        return FailureClass.CONTEXT_WINDOW_EXCEEDED
    if any(hint in message or hint in lowered for hint in _FILTER_HINTS):
        return FailureClass.CONTENT_FILTERED
    if status == 404:
        # The provider does not have the configured model (e.g. an Ollama tag not
        # pulled): our configuration's fault, not the client's, so fall back.
        return FailureClass.SERVER_ERROR
    return FailureClass.CLIENT_ERROR


def _error_message(body: bytes) -> str:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace").strip()
    return message_of(parsed)


def message_of(parsed: Any) -> str:
    """The human message inside an OpenAI, Anthropic, Gemini or Ollama error object."""
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, str):
            return error
        if isinstance(error, dict):
            for key in ("message", "type", "status"):
                value = error.get(key)
                if isinstance(value, str) and value:
                    return value
    if isinstance(parsed, list) and parsed:
        return message_of(parsed[0])
    return ""


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def from_exception(exc: BaseException) -> ProviderError:
    """Classify a transport failure (no usable HTTP response)."""
    if isinstance(exc, ProviderError):
        return exc
    failure = _transport_failure(exc)
    sent, unanswered = _delivery(exc)
    return ProviderError(
        failure, plain_words(exc, failure), sent=sent, unanswered=unanswered, cause=describe_exception(exc)
    )


def describe_exception(exc: BaseException) -> str:
    """The exception as an operator reads it: class and text, then its causes."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        text = " ".join(str(seen).split())
        parts.append(f"{type(seen).__name__}: {text}" if text else type(seen).__name__)
        seen = seen.__cause__
    return " <- ".join(parts)[:500]


def plain_words(exc: BaseException, failure: FailureClass) -> str:
    """What went wrong with the exchange, in words a client understands."""
    cause = _transport_cause(exc) or exc
    for kinds, words in _PLAIN_WORDS:
        if isinstance(cause, kinds):
            return words(cause)
    if failure is FailureClass.TIMEOUT:
        return "the provider did not answer in time"
    if isinstance(cause, OSError) and cause.strerror:
        return f"the connection to the provider failed ({cause.strerror.lower()})"
    return "the connection to the provider failed"


def _connect_words(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "could not connect to the provider (its host name did not resolve)"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "could not connect to the provider (the TLS handshake failed)"
    if isinstance(os_error, ConnectionRefusedError):
        return "could not connect to the provider (connection refused)"
    return "could not connect to the provider"


def _os_words(exc: BaseException) -> str:
    if "Can not write request body" in str(exc):
        return "could not send the request to the provider"
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        return f"the connection to the provider failed ({strerror.lower()})"
    return "the connection to the provider failed"


def _fixed(words: str) -> Callable[[BaseException], str]:
    return lambda _exc: words


# Most specific first: several aiohttp classes derive from one another.
_PLAIN_WORDS: tuple[
    tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[BaseException], str]], ...
] = (
    (aiohttp.ClientPayloadError, _fixed("the provider's connection broke mid-answer")),
    (aiohttp.ServerDisconnectedError, _fixed("the provider closed the connection without answering")),
    (
        (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout, httpx.PoolTimeout),
        _fixed("could not connect to the provider in time"),
    ),
    ((aiohttp.ServerTimeoutError, httpx.TimeoutException, TimeoutError), _fixed("the provider did not answer in time")),
    (aiohttp.ClientConnectorError, _connect_words),
    (httpx.ConnectError, _fixed("could not connect to the provider")),
    (httpx.RemoteProtocolError, _fixed("the provider's connection broke mid-answer")),
    (aiohttp.ClientOSError, _os_words),
    ((httpx.ReadError, httpx.WriteError), _fixed("the connection to the provider broke")),
    (aiohttp.ClientResponseError, _fixed("the provider's answer could not be read")),
)


def _delivery(exc: BaseException) -> tuple[bool, bool]:
    """(sent, unanswered) for a failed exchange. Not sent: the connection could not
    be made (refused, DNS, TLS, connect or pool timeout) or the request body could
    not be written. Unanswered: the connection broke with no answer at all (the
    server went away, a reset), so the upstream may or may not have received the
    call. Anything else (a timeout while reading, a body cut short) was sent."""
    cause = _transport_cause(exc)
    if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return False, False
    if isinstance(cause, aiohttp.ClientOSError) and "Can not write request body" in str(cause):
        return False, False
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return False, False
    unanswered = isinstance(
        cause,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | httpx.RemoteProtocolError
        | httpx.ReadError
        | httpx.WriteError,
    )
    return True, unanswered


def _transport_cause(exc: BaseException) -> BaseException | None:
    """The first aiohttp error down the cause chain, else the innermost httpx one:
    httpx-aiohttp maps every aiohttp connection error (a refused connection, a
    reset) to `ConnectTimeout`, so the aiohttp error underneath decides."""
    seen: BaseException | None = exc
    found: BaseException | None = None
    while seen is not None:
        if isinstance(seen, aiohttp.ClientError):
            return seen
        if isinstance(seen, httpx.HTTPError):
            found = seen
        seen = seen.__cause__
    return found


def _transport_failure(exc: BaseException) -> FailureClass:
    """Timeouts (connect, pool, socket read: aiohttp's `ServerTimeoutError`
    family and `TimeoutError`, httpx's `TimeoutException`) are `timeout`; every
    other failure of the exchange (refused, reset, DNS, a body cut short:
    `ClientConnectorError`, `ServerDisconnectedError`, `ClientPayloadError`,
    `ClientOSError`, httpx's `ConnectError`/`RemoteProtocolError`, `OSError`)
    is `connection_error`."""
    cause = exc.__cause__
    # httpx-aiohttp maps every aiohttp ClientConnectionError, refused connections
    # included, to ConnectTimeout: look at the original error first.
    if isinstance(cause, (aiohttp.ServerTimeoutError, TimeoutError)):
        return FailureClass.TIMEOUT
    if isinstance(cause, aiohttp.ClientError):
        return FailureClass.CONNECTION_ERROR
    if isinstance(exc, (httpx.TimeoutException, aiohttp.ServerTimeoutError, TimeoutError)):
        return FailureClass.TIMEOUT
    return FailureClass.CONNECTION_ERROR


def no_connection_slot(limit: int, waited: float) -> ProviderError:
    """Every one of a provider's `max_connections` slots stayed busy for the pool
    wait: the proxy's own limit (`proxy_saturated`), not the provider's failure.
    Nothing was sent."""
    return ProviderError(
        FailureClass.PROXY_SATURATED,
        f"all {limit} connection slots (max_connections) stayed busy for {waited:.2g}s; not called",
        sent=False,
    )


def lagged(timeout: ProviderError, lag: float) -> ProviderError:
    """A timeout that expired while this worker's event loop ran `lag` seconds
    late: the proxy's saturation (`proxy_saturated`), not the provider's failure.
    The walk goes on; when every attempt was so, the client gets 503
    `server_overloaded` with Retry-After, never `all_providers_failed`."""
    return ProviderError(
        FailureClass.PROXY_SATURATED,
        f"{timeout.message}, while this proxy's event loop ran {lag:.1f}s late (the proxy's overload)",
        provider=timeout.provider,
        sent=timeout.sent,
        unanswered=timeout.unanswered,
        cause=timeout.cause,
    )


def from_stream_error(error: Any) -> ProviderError:
    """An error event inside a 200 stream: the provider failed."""
    message = message_of(error) or "error event inside the stream"
    lowered = message.lower()
    failure = FailureClass.SERVER_ERROR
    if any(hint in lowered for hint in _CONTEXT_HINTS):
        failure = FailureClass.CONTEXT_WINDOW_EXCEEDED
    return ProviderError(failure, f"in-stream error: {message}"[:300])


def incomplete_stream() -> ProviderError:
    return ProviderError(
        FailureClass.SERVER_ERROR,
        "the provider's stream ended without a finish: the answer is incomplete",
        cause="no finish_reason and no [DONE]",
    )


_LITELLM_CLASSES = {
    "ContextWindowExceededError": FailureClass.CONTEXT_WINDOW_EXCEEDED,
    "ContentPolicyViolationError": FailureClass.CONTENT_FILTERED,
    "RateLimitError": FailureClass.RATE_LIMITED,
    "Timeout": FailureClass.TIMEOUT,
    "APIConnectionError": FailureClass.CONNECTION_ERROR,
    "AuthenticationError": FailureClass.AUTH_ERROR,
    "PermissionDeniedError": FailureClass.AUTH_ERROR,
    "ServiceUnavailableError": FailureClass.SERVER_ERROR,
    "InternalServerError": FailureClass.SERVER_ERROR,
    "APIError": FailureClass.SERVER_ERROR,
    "NotFoundError": FailureClass.SERVER_ERROR,
    "BadRequestError": FailureClass.CLIENT_ERROR,
    "UnprocessableEntityError": FailureClass.CLIENT_ERROR,
}


def from_litellm(exc: BaseException) -> ProviderError:
    """Classify an exception raised inside litellm's translation code, by its class
    name and status so that litellm is never imported here. A complaint about the
    provider's own configuration (no provider for the model string, no api_base)
    is `misconfigured`: never sent, and never the client's error."""
    if _misconfigured(exc):
        return ProviderError(
            FailureClass.MISCONFIGURED,
            f"the provider's configuration is wrong: {provider_reason(exc)}"[:300],
            sent=False,
            cause=describe_exception(exc),
        )
    for klass in type(exc).__mro__:
        failure = _LITELLM_CLASSES.get(klass.__name__)
        if failure is not None:
            break
    else:
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and status >= 400:
            body = str(getattr(exc, "message", exc)).encode()
            return from_status(status, body)
        return from_exception(exc)
    if failure is FailureClass.CLIENT_ERROR:
        text = str(exc).lower()
        if any(hint in text for hint in _CONTEXT_HINTS):
            failure = FailureClass.CONTEXT_WINDOW_EXCEEDED
    status = getattr(exc, "status_code", None)
    sent, unanswered = _delivery(exc)
    if _unreached(exc, failure):
        failure, sent, unanswered, status = FailureClass.CONNECTION_ERROR, False, False, None
    return ProviderError(
        failure,
        _litellm_words(exc, failure),
        status_code=status if isinstance(status, int) else None,
        sent=sent,
        unanswered=unanswered and not isinstance(status, int),
        cause=describe_exception(exc),
    )


# What litellm's HTTP layer says when it never reached the provider (it wraps the
# transport's error in an `InternalServerError` without a cause to look at).
_UNREACHED_HINTS = ("cannot connect to host", "connection refused", "name or service not known", "connecterror")


def _unreached(exc: BaseException, failure: FailureClass) -> bool:
    if failure not in (FailureClass.SERVER_ERROR, FailureClass.CONNECTION_ERROR):
        return False
    text = str(exc).lower()
    return any(hint in text for hint in _UNREACHED_HINTS)


def _misconfigured(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(hint in text for hint in _MISCONFIGURED_HINTS)


_CLASS_WORDS = {
    FailureClass.CONTEXT_WINDOW_EXCEEDED: "the prompt is too long for the provider's context window",
    FailureClass.CONTENT_FILTERED: "the provider's content filter refused the request",
    FailureClass.RATE_LIMITED: "the provider is rate limiting our requests",
    FailureClass.AUTH_ERROR: "the provider rejected our key",
    FailureClass.SERVER_ERROR: "the provider failed to answer",
}


def _litellm_words(exc: BaseException, failure: FailureClass) -> str:
    """Plain words for a litellm exception. A client error keeps the provider's
    own reason (the client must fix its request), without litellm's prefixes."""
    if failure in (FailureClass.TIMEOUT, FailureClass.CONNECTION_ERROR):
        return plain_words(exc, failure)
    reason = provider_reason(exc)
    if failure is FailureClass.CLIENT_ERROR:
        return reason or "the provider refused the request"
    words = _CLASS_WORDS.get(failure, "the provider failed to answer")
    return f"{words}: {reason}"[:300] if reason else words


def provider_reason(exc: BaseException) -> str:
    """The provider's own words inside a litellm exception's text, without
    litellm's `litellm.RateLimitError: AnthropicException - ` prefixes."""
    text = str(exc).strip()
    head, sep, rest = text.partition(": ")
    if sep and head.rsplit(".", 1)[-1] == type(exc).__name__:
        text = rest
    head, sep, rest = text.partition(" - ")
    if sep and head.endswith("Exception") and " " not in head:
        text = rest
    return text.strip()[:300]


def untranslatable(exc: BaseException) -> ProviderError:
    """litellm could not put the request into the provider's format, before any
    network call. A missing key is still about our key (`auth_error`); any other
    refusal means this provider cannot take this request while another may:
    `unsupported`, which costs the provider no health. Either way nothing was sent."""
    error = from_litellm(exc)
    if error.failure in (FailureClass.AUTH_ERROR, FailureClass.CONTEXT_WINDOW_EXCEEDED, FailureClass.MISCONFIGURED):
        error.sent, error.unanswered = False, False
        return error
    return ProviderError(
        FailureClass.UNSUPPORTED,
        f"cannot put the request into this provider's format: {provider_reason(exc)}"[:300],
        sent=False,
        cause=error.cause,
    )


def unreadable(exc: BaseException) -> ProviderError:
    """litellm could not read a provider's 2xx answer or stream event. Unless it
    recognised what the answer says (filtered, rate limited, ...), the provider
    sent something malformed: `server_error` (never the client's fault)."""
    error = from_litellm(exc)
    if error.failure not in (FailureClass.CLIENT_ERROR, FailureClass.CONNECTION_ERROR):
        return error
    return ProviderError(FailureClass.SERVER_ERROR, "the provider's answer could not be read", cause=error.cause)
