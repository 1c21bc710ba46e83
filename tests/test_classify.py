"""Foreign errors become our failure classes in one place."""

from __future__ import annotations

import aiohttp
import httpx
import orjson
import pytest

from proxy.adapters import classify
from proxy.errors import FailureClass
from proxy.litellm_import import load_litellm


def openai_error(message: str, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}})


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, openai_error("Rate limit reached"), FailureClass.RATE_LIMITED),
        (401, openai_error("Incorrect API key"), FailureClass.AUTH_ERROR),
        (403, b"forbidden", FailureClass.AUTH_ERROR),
        (408, b"", FailureClass.TIMEOUT),
        (500, openai_error("boom"), FailureClass.SERVER_ERROR),
        (
            529,
            orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            FailureClass.SERVER_ERROR,
        ),
        (
            400,
            openai_error("This model's maximum context length is 8192 tokens", "context_length_exceeded"),
            FailureClass.CONTEXT_WINDOW_EXCEEDED,
        ),
        (
            400,
            orjson.dumps(
                {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000"},
                }
            ),
            FailureClass.CONTEXT_WINDOW_EXCEEDED,
        ),
        (400, openai_error("blocked", "content_filter"), FailureClass.CONTENT_FILTERED),
        (404, orjson.dumps({"error": 'model "qwen2.5:7b" not found, try pulling it first'}), FailureClass.SERVER_ERROR),
        (400, openai_error("'temperature' must be a number"), FailureClass.CLIENT_ERROR),
        (422, b"unprocessable", FailureClass.CLIENT_ERROR),
    ],
)
def test_status_classes(status: int, body: bytes, expected: FailureClass) -> None:
    error = classify.from_status(status, body)
    assert error.failure is expected
    assert error.status_code == status


def test_retry_after_seconds_ms_and_date() -> None:
    assert classify.parse_retry_after({"retry-after": "7"}) == 7.0
    assert classify.parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert classify.parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert classify.parse_retry_after({"retry-after": "soon"}) is None
    assert classify.from_status(429, b"{}", {"retry-after": "3"}).retry_after == 3.0


def test_message_is_extracted_from_each_provider_shape() -> None:
    assert classify.message_of({"error": {"message": "m1"}}) == "m1"
    assert classify.message_of({"type": "error", "error": {"type": "overloaded_error", "message": "m2"}}) == "m2"
    assert classify.message_of({"error": "m3"}) == "m3"
    assert classify.message_of([{"error": {"code": 429, "message": "m4", "status": "RESOURCE_EXHAUSTED"}}]) == "m4"


def _wrapped(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


class _ConnectionKey:
    host, port, ssl = "127.0.0.1", 1, False


def _connector(error: type[aiohttp.ClientConnectorError], os_error: OSError) -> aiohttp.ClientConnectorError:
    return error(_ConnectionKey(), os_error)  # type: ignore[arg-type]  # any object with host, port, ssl


REFUSED = _connector(aiohttp.ClientConnectorError, ConnectionRefusedError(111, "Connection refused"))
UNWRITTEN = aiohttp.ClientOSError(None, "Can not write request body for http://127.0.0.1:1/v1/chat/completions")

# sent: False only when the call provably never left; unanswered: the exchange broke
# with no answer at all, so nobody knows whether the upstream received the call.
TIMEOUT, CONNECTION = FailureClass.TIMEOUT, FailureClass.CONNECTION_ERROR


@pytest.mark.parametrize(
    ("exc", "expected", "sent", "unanswered"),
    [
        (httpx.ConnectError("refused"), CONNECTION, False, False),
        (httpx.ConnectTimeout("slow connect"), TIMEOUT, False, False),
        (httpx.PoolTimeout("no free connection"), TIMEOUT, False, False),
        (httpx.ReadTimeout("slow read"), TIMEOUT, True, False),
        (httpx.RemoteProtocolError("peer closed"), CONNECTION, True, True),
        (httpx.ReadError("reset"), CONNECTION, True, True),
        (httpx.WriteError("broken pipe"), CONNECTION, True, True),
        (TimeoutError(), TIMEOUT, True, False),
        (REFUSED, CONNECTION, False, False),
        (
            _connector(aiohttp.ClientConnectorDNSError, OSError(-2, "Name or service not known")),
            CONNECTION,
            False,
            False,
        ),
        (_connector(aiohttp.ClientConnectorSSLError, OSError(1, "TLS handshake failed")), CONNECTION, False, False),
        (aiohttp.ConnectionTimeoutError("connect"), TIMEOUT, False, False),
        (aiohttp.ServerDisconnectedError(), CONNECTION, True, True),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), CONNECTION, True, True),
        (aiohttp.ClientPayloadError("Response payload is not completed"), CONNECTION, True, False),
        (aiohttp.SocketTimeoutError("read"), TIMEOUT, True, False),
        (UNWRITTEN, CONNECTION, False, False),
        # httpx-aiohttp reports a refused connection as ConnectTimeout; the cause tells the truth.
        (_wrapped(httpx.ConnectTimeout("x"), REFUSED), CONNECTION, False, False),
        (_wrapped(httpx.ConnectTimeout("x"), UNWRITTEN), CONNECTION, False, False),
        (_wrapped(httpx.ConnectTimeout("x"), aiohttp.ClientConnectionError("refused")), CONNECTION, True, False),
        (_wrapped(httpx.ConnectTimeout("x"), aiohttp.ServerDisconnectedError()), CONNECTION, True, True),
        (_wrapped(httpx.ReadTimeout("x"), aiohttp.SocketTimeoutError()), TIMEOUT, True, False),
    ],
)
def test_transport_exceptions(exc: Exception, expected: FailureClass, sent: bool, unanswered: bool) -> None:
    error = classify.from_exception(exc)
    assert (error.failure, error.sent, error.unanswered) == (expected, sent, unanswered)


def test_an_answer_or_a_refused_translation_says_whether_the_call_was_sent() -> None:
    answered = classify.from_status(503, b"busy")
    assert answered.sent and not answered.unanswered

    class APIConnectionError(Exception):
        status_code = 500

    refused = _wrapped(APIConnectionError("litellm could not connect"), httpx.ConnectError("refused"))
    assert not classify.from_litellm(refused).sent
    reset = _wrapped(APIConnectionError("litellm lost the connection"), httpx.ReadError("reset"))
    assert classify.from_litellm(reset).sent and not classify.from_litellm(reset).unanswered  # it has a status

    class BadRequestError(Exception):
        status_code = 400

    untranslatable = classify.untranslatable(BadRequestError("tools are not supported"))
    assert untranslatable.failure is FailureClass.UNSUPPORTED and not untranslatable.sent


def test_litellm_exceptions_by_name_without_importing_litellm() -> None:
    class ContextWindowExceededError(Exception):
        status_code = 400

    class RateLimitError(Exception):
        status_code = 429

    class BadRequestError(Exception):
        status_code = 400

    assert classify.from_litellm(ContextWindowExceededError("too long")).failure is FailureClass.CONTEXT_WINDOW_EXCEEDED
    assert classify.from_litellm(RateLimitError("slow down")).failure is FailureClass.RATE_LIMITED
    assert classify.from_litellm(BadRequestError("bad temperature")).failure is FailureClass.CLIENT_ERROR
    assert classify.from_litellm(BadRequestError("prompt is too long")).failure is (
        FailureClass.CONTEXT_WINDOW_EXCEEDED
    )


def test_in_stream_errors_are_server_errors() -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    error = classify.from_stream_error(overloaded)
    assert error.failure is FailureClass.SERVER_ERROR and "Overloaded" in error.message
    assert classify.incomplete_stream().failure is FailureClass.SERVER_ERROR


@pytest.mark.litellm
@pytest.mark.asyncio
async def test_litellms_complaint_about_a_providers_own_config_is_misconfigured_not_the_clients() -> None:
    litellm = load_litellm()  # offline: no fetch of the model map

    with pytest.raises(litellm.BadRequestError) as caught:  # a model string litellm cannot place
        await litellm.acompletion(model="no-such-provider/x", messages=[{"role": "user", "content": "q"}], api_key="k")
    error = classify.from_litellm(caught.value)
    assert error.failure is FailureClass.MISCONFIGURED and not error.sent
    assert classify.untranslatable(caught.value).failure is FailureClass.MISCONFIGURED


_CUT = aiohttp.ClientPayloadError(
    "Response payload is not completed: <TransferEncodingError: 400, message='Not enough data to satisfy transfer "
    "length header.'>"
)


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (_CUT, "the provider's connection broke mid-answer"),
        (aiohttp.ServerDisconnectedError(), "the provider closed the connection without answering"),
        (
            aiohttp.ClientOSError(104, "Connection reset by peer"),
            "the connection to the provider failed (connection reset by peer)",
        ),
        (REFUSED, "could not connect to the provider (connection refused)"),
        (
            _connector(aiohttp.ClientConnectorDNSError, OSError(-2, "Name or service not known")),
            "could not connect to the provider (its host name did not resolve)",
        ),
        (
            _connector(aiohttp.ClientConnectorSSLError, OSError(1, "TLS handshake failed")),
            "could not connect to the provider (the TLS handshake failed)",
        ),
        (aiohttp.ConnectionTimeoutError("connect"), "could not connect to the provider in time"),
        (aiohttp.SocketTimeoutError("read"), "the provider did not answer in time"),
        (UNWRITTEN, "could not send the request to the provider"),
        (httpx.ConnectError("refused"), "could not connect to the provider"),
        (httpx.ReadTimeout("slow read"), "the provider did not answer in time"),
        (
            httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
            "the provider's connection broke mid-answer",
        ),
        (httpx.ReadError("reset"), "the connection to the provider broke"),
        (TimeoutError(), "the provider did not answer in time"),
        (_wrapped(httpx.ConnectTimeout("x"), REFUSED), "could not connect to the provider (connection refused)"),
        (OSError(113, "No route to host"), "the connection to the provider failed (no route to host)"),
        (RuntimeError("something odd"), "the connection to the provider failed"),
    ],
)
def test_transport_failures_in_plain_words_with_the_exception_kept_for_the_log(exc: Exception, words: str) -> None:
    error = classify.from_exception(exc)
    assert error.message == words
    assert error.cause.startswith(type(exc).__name__)
    assert "Error" not in error.message and "<" not in error.message


def test_the_cause_follows_the_chain_on_one_line() -> None:
    error = classify.from_exception(_wrapped(httpx.ConnectTimeout("x"), REFUSED))
    assert error.cause.startswith("ConnectTimeout: x <- ClientConnectorError: Cannot connect to host 127.0.0.1:1")
    assert "\n" not in classify.describe_exception(ValueError("two\nlines"))


def test_litellm_failures_in_plain_words() -> None:
    class RateLimitError(Exception):
        status_code = 429

    class BadRequestError(Exception):
        status_code = 400

    class APIConnectionError(Exception):
        pass

    limited = classify.from_litellm(
        RateLimitError('litellm.RateLimitError: AnthropicException - {"error": "slow down"}')
    )
    assert limited.message == 'the provider is rate limiting our requests: {"error": "slow down"}'
    assert limited.cause.startswith("RateLimitError: litellm.RateLimitError: AnthropicException")
    client = classify.from_litellm(BadRequestError("litellm.BadRequestError: OllamaException - temperature is bad"))
    assert (client.failure, client.message) == (FailureClass.CLIENT_ERROR, "temperature is bad")
    cut = classify.from_litellm(_wrapped(APIConnectionError("litellm.APIConnectionError: boom"), httpx.ReadError("x")))
    assert cut.message == "the connection to the provider broke" and "APIConnectionError" in cut.cause
    unsupported = classify.untranslatable(BadRequestError("litellm.BadRequestError: tools are not supported"))
    assert unsupported.message == "cannot put the request into this provider's format: tools are not supported"
    assert (
        classify.incomplete_stream().message == "the provider's stream ended without a finish: the answer is incomplete"
    )
    unreadable = classify.unreadable(ValueError("Expecting value: line 1 column 1"))
    assert unreadable.message == "the provider's answer could not be read" and "ValueError" in unreadable.cause


def test_a_wait_for_a_connection_slot_that_runs_out_is_the_proxys_saturation() -> None:
    error = classify.no_connection_slot(4, 1.0)
    assert (error.failure, error.sent) == (FailureClass.PROXY_SATURATED, False)
    assert "4 connection slots" in error.message
