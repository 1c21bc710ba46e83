"""Hedged requests: a slow first choice races the next candidate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI("cloud") as cloud, FakeOpenAI("backup") as backup, FakeOpenAI("last") as last:
        yield cloud, backup, last


@pytest.fixture
def sdk(serve: Callable[..., ServedApp], fakes: tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]) -> Iterator[openai.OpenAI]:
    cloud, backup, last = fakes
    proxy = serve(
        {
            "providers": {
                "cloud": openai_provider(
                    cloud.url, quota={"requests_per_day": 1}, timeout={"first_token": 2.5, "total": 2.5}
                ),
                "backup": openai_provider(backup.url),
                "last": openai_provider(last.url),
            },
            "routes": {"default": {"chain": ["cloud", "backup", "last"], "hedge_after_ms": 150}},
        }
    )
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_slow_first_choice_is_hedged_and_its_call_stays_counted(
    sdk: openai.OpenAI, fakes: tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI], stream: bool
) -> None:
    cloud, _backup, _ = fakes
    cloud.set_fault("slow", first_token_delay=2)
    started = time.perf_counter()
    if stream:
        with sdk.chat.completions.with_streaming_response.create(
            model="default", messages=MESSAGES, stream=True
        ) as response:
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
            headers = response.headers
    else:
        raw = sdk.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
        text, headers = raw.parse().choices[0].message.content or "", raw.headers
    assert time.perf_counter() - started < 1.5  # the slow cloud was not waited for
    assert text == "Hello from backup."
    assert headers["x-proxy-provider"] == "backup" and headers["x-proxy-fallbacks"] == "cloud=timeout"
    assert cloud.request_count == 1
    cloud.clear_fault()
    # The cancelled call had reached cloud (it may bill it): it stays counted, so cloud's
    # quota of one request is spent and the next request is skipped to backup without a call.
    answered = sdk.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert answered.headers["x-proxy-provider"] == "backup"
    assert answered.headers["x-proxy-fallbacks"] == "cloud=quota_exhausted"
    assert cloud.request_count == 1


def test_a_fast_first_choice_starts_no_hedge(
    sdk: openai.OpenAI, fakes: tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]
) -> None:
    _cloud, backup, _ = fakes
    assert sdk.chat.completions.create(model="default", messages=MESSAGES).choices[0].message.content == (
        "Hello from cloud."
    )
    assert backup.request_count == 0


def test_when_both_racers_fail_the_walk_goes_on(
    sdk: openai.OpenAI, fakes: tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]
) -> None:
    cloud, backup, _last = fakes
    cloud.set_fault("hang")  # times out after 2.5 s, well after the hedge started at 0.15 s
    backup.set_fault("status", status=503)
    raw = sdk.chat.completions.with_raw_response.create(model="default", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "Hello from last."
    fallbacks = dict(pair.split("=") for pair in raw.headers["x-proxy-fallbacks"].split(","))
    assert fallbacks == {"cloud": "timeout", "backup": "server_error"}
    assert cloud.request_count == backup.request_count == 1
