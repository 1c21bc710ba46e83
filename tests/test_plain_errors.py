"""What a client reads when providers fail names the failure in plain words
(the in-band error of a cut stream, the 503's listing); the exception class and
its text stay in the log line, for the operator. End to end, with the official
SDK against the fakes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider, request_log

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
TECHNICAL = ("Error", "Exception", "aiohttp", "payload", "<", "Errno")


def test_a_cut_stream_says_so_in_plain_words_and_the_log_keeps_the_exception(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = serve(
        {
            "providers": {"cloud": openai_provider(cloud.url), "backup": openai_provider(backup.url)},
            "routes": {"default": {"chain": ["cloud", "backup"], "continuation": False}},
        }
    )
    cloud.set_fault("die_midstream", after_chunks=2)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.APIError) as caught:
            for _chunk in sdk.chat.completions.create(model="default", messages=MESSAGES, stream=True):
                pass
    message = caught.value.message
    assert message == (
        "The provider 'cloud' failed mid-stream (connection_error): the provider's connection broke mid-answer. "
        "The answer above is incomplete."
    )
    [line] = request_log(caplog)
    assert line["interrupted"] == "connection_error" and line["outcome"] == "stream_interrupted"
    assert line["interruption"]["provider"] == "cloud"
    assert line["interruption"]["detail"] == "the provider's connection broke mid-answer"
    assert line["interruption"]["cause"].startswith("ClientPayloadError: Response payload is not completed")


def test_the_503_lists_each_failure_in_plain_words(
    serve: Callable[..., ServedApp], cloud: FakeOpenAI, backup: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = serve(
        {
            "providers": {
                "cloud": openai_provider(cloud.url),
                "backup": openai_provider(backup.url, stream_upstream=False),  # one plain exchange
            },
            "routes": {"default": ["cloud", "backup"]},
        }
    )
    cloud.stop()  # connection refused
    backup.set_fault("die_midstream", after_chunks=0)  # the connection closes with no answer
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.chat.completions.create(model="default", messages=MESSAGES)
    assert caught.value.status_code == 503
    message = caught.value.response.json()["error"]["message"]
    assert "cloud: connection_error (could not connect to the provider (connection refused))" in message
    assert "backup: connection_error (the provider closed the connection without answering)" in message
    assert not [word for word in TECHNICAL if word in message], message
    [line] = request_log(caplog)
    causes = [attempt["cause"] for attempt in line["attempts"]]
    assert causes[0].startswith("ClientConnectorError: Cannot connect to host 127.0.0.1")
    assert causes[1].startswith("ServerDisconnectedError")
    assert [attempt["detail"] for attempt in line["attempts"]] == [
        "could not connect to the provider (connection refused)",
        "the provider closed the connection without answering",
    ]
