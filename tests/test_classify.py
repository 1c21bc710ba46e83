"""Foreign errors become our failure classes in one place."""

from __future__ import annotations

import aiohttp
import httpx
import orjson
import pytest

from proxy.adapters import classify
from proxy.errors import FailureClass


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
        (529, orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
         FailureClass.SERVER_ERROR),
        (400, openai_error("This model's maximum context length is 8192 tokens", "context_length_exceeded"),
         FailureClass.CONTEXT_WINDOW_EXCEEDED),
        (400, orjson.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "prompt is too long: 210000 tokens > 200000"}}),
         FailureClass.CONTEXT_WINDOW_EXCEEDED),
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


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("refused"), FailureClass.CONNECTION_ERROR),
        (httpx.ConnectTimeout("slow connect"), FailureClass.TIMEOUT),
        (httpx.ReadTimeout("slow read"), FailureClass.TIMEOUT),
        (httpx.RemoteProtocolError("peer closed"), FailureClass.CONNECTION_ERROR),
        (TimeoutError(), FailureClass.TIMEOUT),
        # httpx-aiohttp reports a refused connection as ConnectTimeout; the cause tells the truth.
        (_wrapped(httpx.ConnectTimeout("x"), aiohttp.ClientConnectionError("refused")), FailureClass.CONNECTION_ERROR),
        (_wrapped(httpx.ConnectTimeout("x"), aiohttp.ServerDisconnectedError()), FailureClass.CONNECTION_ERROR),
        (_wrapped(httpx.ReadTimeout("x"), aiohttp.SocketTimeoutError()), FailureClass.TIMEOUT),
    ],
)
def test_transport_exceptions(exc: Exception, expected: FailureClass) -> None:
    assert classify.from_exception(exc).failure is expected


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
