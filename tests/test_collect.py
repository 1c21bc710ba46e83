"""A non-stream answer read from an OpenAI-format stream (`parsed_reads` +
`collect`), against real aiohttp servers on 127.0.0.1: the body is exactly what
the `Chunk` path assembles, the first-token and idle deadlines bound it, and
every way a stream goes wrong is a classified failure of the provider, never a
partial answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.adapters import AttemptLimits, openai_compat
from proxy.adapters.base import AdapterHooks
from proxy.adapters.openai_compat import OpenAICompatAdapter
from proxy.config import ProviderConfig, parse_config
from proxy.errors import FailureClass, ProviderError
from proxy.service import open_session
from proxy.stream.assemble import Assembler
from proxy.stream.live import collect
from tests.test_openai_compat import BODY, completion_bytes, upstream

LIMITS = AttemptLimits(connect=2, read=None)
MAX_BYTES = LIMITS.max_bytes


class Hooks(AdapterHooks):
    def __init__(self) -> None:
        self.malformed_payloads: list[bytes] = []

    def malformed(self, provider: str, payload: bytes) -> None:
        self.malformed_payloads.append(payload)


def provider(url: str, first_token: float = 5, idle: float = 5) -> ProviderConfig:
    config = parse_config(
        {
            "providers": {
                "p": {
                    "model": "openai/m",
                    "api_base": url + "/v1",
                    "api_key": "k",
                    "timeout": {"first_token": first_token, "idle": idle, "total": 30},
                }
            },
            "routes": {"r": ["p"]},
        },
        environ={},
    )
    return config.providers["p"]


def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m-2024",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
PLAIN = [
    event({"role": "assistant", "content": "", "refusal": None}),
    event({"content": "Hel"}),
    event({"content": "lo"}),
    event({}, "stop"),
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m-2024","choices":[],"usage":'
    + orjson.dumps(USAGE)
    + b"}\n\n",
    b"data: [DONE]\n\n",
]
TOOLS = [
    event({"role": "assistant", "content": None}),
    event(
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    ),
    event({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
    event({}, "tool_calls"),
    b"data: [DONE]\n\n",
]
TWO_CHOICES = [
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "delta": {"content": "a"}, "finish_reason": None},
                {"index": 1, "delta": {"content": "b"}, "finish_reason": None},
            ],
        }
    )
    + b"\n\n",
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"},
                {"index": 1, "delta": {}, "finish_reason": "length"},
            ],
        }
    )
    + b"\n\n",
    b"data: [DONE]\n\n",
]
REFUSAL = [event({"role": "assistant", "refusal": "I can't"}), event({}, "stop"), b"data: [DONE]\n\n"]
LOGPROBS = [
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "x"},
                    "logprobs": {"content": [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}]},
                    "finish_reason": "stop",
                }
            ],
        }
    )
    + b"\n\n",
    b"data: [DONE]\n\n",
]


def sse(events: list[bytes], *, pause_after: int | None = None, pause: float = 0.0, split: bool = True) -> Any:
    """A handler streaming `events`, one write each (or all in one), optionally
    pausing (connection open) after the first `pause_after` of them."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if not split:
            await response.write(b"".join(events))
            return response
        for index, data in enumerate(events):
            if pause_after is not None and index == pause_after:
                await asyncio.sleep(pause)
            await response.write(data)
        return response

    return handler


async def collected(
    handler: Any, *, first_token: float = 5, idle: float = 5, hooks: AdapterHooks | None = None
) -> dict[str, Any]:
    async with upstream(handler) as url, open_session() as session:
        config = provider(url, first_token, idle)
        adapter = OpenAICompatAdapter(config, session, hooks)
        deadline = asyncio.get_running_loop().time() + 30
        completion = await collect(adapter.parsed_reads, config, BODY, deadline, MAX_BYTES)
    parsed: dict[str, Any] = orjson.loads(completion.body)
    return parsed


async def assembled_from_chunks(handler: Any) -> dict[str, Any]:
    """What the `Chunk` path (`stream` + `Assembler.add`) makes of the same stream."""
    async with upstream(handler) as url, open_session() as session:
        adapter = OpenAICompatAdapter(provider(url), session)
        assembler = Assembler()
        async for chunk in adapter.stream(BODY, LIMITS):
            assembler.add(chunk)
    parsed: dict[str, Any] = orjson.loads(assembler.completion().body)
    return parsed


@pytest.mark.asyncio
async def test_a_plain_answer_is_the_exact_completion() -> None:
    body = await collected(sse(PLAIN))
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "m-2024",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "system_fingerprint": "fp_1",
    }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "events", [PLAIN, TOOLS, TWO_CHOICES, REFUSAL, LOGPROBS], ids=["plain", "tools", "n2", "refusal", "logprobs"]
)
@pytest.mark.parametrize("split", [True, False], ids=["a-write-each", "one-write"])
async def test_the_body_is_what_the_chunk_path_assembles(events: list[bytes], split: bool) -> None:
    assert await collected(sse(events, split=split)) == await assembled_from_chunks(sse(events, split=split))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "malformed", [b"{not json", b"[1, 2]", b'{"id": "x", "choices": 5}', b'{"id": "x", "choices": {"0": {}}}']
)
async def test_a_malformed_chunk_is_skipped_and_counted(malformed: bytes) -> None:
    """Not JSON, not an object, `choices` that is no list: skipped, never a bug's 500."""
    hooks = Hooks()
    events = [*PLAIN[:2], b"data: " + malformed + b"\n\n", *PLAIN[2:]]
    body = await collected(sse(events), hooks=hooks)
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert hooks.malformed_payloads == [malformed]


@pytest.mark.asyncio
async def test_an_in_band_error_after_some_text_fails_the_whole_answer() -> None:
    error = b'data: {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}\n\n'
    with pytest.raises(ProviderError) as caught:
        await collected(sse([*PLAIN[:3], error]))
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "overloaded" in caught.value.message


@pytest.mark.asyncio
async def test_an_end_with_neither_finish_nor_done_is_incomplete() -> None:
    with pytest.raises(ProviderError) as caught:
        await collected(sse(PLAIN[:3]))
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "ended" in caught.value.message


@pytest.mark.asyncio
async def test_done_without_a_finish_reason_is_a_whole_answer() -> None:
    body = await collected(sse([*PLAIN[:3], b"data: [DONE]\n\n"]))
    assert body["choices"][0]["message"]["content"] == "Hello"


@pytest.mark.asyncio
async def test_a_server_that_ignores_stream_true_gives_its_whole_answer() -> None:
    async def ignores_stream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=completion_bytes("whole"), content_type="application/json")

    body = await collected(ignores_stream)
    assert body["choices"][0]["message"]["content"] == "whole"
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_an_answer_over_the_size_cap_is_a_failure() -> None:
    async with upstream(sse(PLAIN)) as url, open_session() as session:
        config = provider(url)
        reads = OpenAICompatAdapter(config, session).parsed_reads
        with pytest.raises(ProviderError) as caught:
            await collect(reads, config, BODY, asyncio.get_running_loop().time() + 30, 300)
    assert caught.value.failure is FailureClass.SERVER_ERROR
    assert "max_upstream_bytes (300)" in caught.value.message


@pytest.mark.asyncio
async def test_a_provider_silent_after_its_role_chunk_is_left_at_the_first_token_deadline() -> None:
    """The role chunk is no token: the first-token deadline still runs."""
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await collected(sse(PLAIN, pause_after=1, pause=10), first_token=0.5, idle=5)
    assert caught.value.failure is FailureClass.TIMEOUT
    assert "no first token within 0.5s" in caught.value.message
    assert time.monotonic() - started < 4


@pytest.mark.asyncio
async def test_a_stream_stalled_after_its_first_token_is_left_at_the_idle_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await collected(sse(PLAIN, pause_after=2, pause=10), first_token=5, idle=0.5)
    assert caught.value.failure is FailureClass.TIMEOUT
    assert "stalled past the idle" in caught.value.message
    assert time.monotonic() - started < 4


@pytest.mark.asyncio
async def test_a_slow_answer_that_keeps_coming_is_not_cut_by_the_first_token_deadline() -> None:
    """Once the first token is here, the first-token deadline is over: a slow
    answer within its idle deadline is whole however long it takes."""
    events = [PLAIN[0], PLAIN[1]] + [event({"content": "."}) for _ in range(6)] + PLAIN[3:]

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in events:
            await response.write(data)
            await asyncio.sleep(0.15)
        return response

    body = await collected(slow, first_token=0.5, idle=2)
    assert body["choices"][0]["message"]["content"] == "Hel......"


@pytest.mark.asyncio
async def test_a_tool_call_is_a_first_token() -> None:
    body = await collected(sse(TOOLS, pause_after=2, pause=1.0), first_token=0.5, idle=3)
    assert body["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


@pytest.mark.asyncio
async def test_a_failed_status_is_classified_before_anything_is_read() -> None:
    async def limited(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow down", "type": "rate_limit"}}, status=429)

    with pytest.raises(ProviderError) as caught:
        await collected(limited)
    assert caught.value.failure is FailureClass.RATE_LIMITED


@pytest.mark.asyncio
async def test_the_connection_goes_back_to_the_pool_after_a_whole_answer() -> None:
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return await sse(PLAIN)(request)

    async with upstream(handler) as url, open_session() as session:
        config = provider(url)
        adapter = OpenAICompatAdapter(config, session)
        for _ in range(3):
            await collect(adapter.parsed_reads, config, BODY, asyncio.get_running_loop().time() + 30, MAX_BYTES)
            await asyncio.sleep(0.05)
    assert len(peers) == 1


# --- polled reads: once the first token is here, a non-stream answer is read when
# its body ends or fails, or every `_POLL_SECONDS`, not token by token


def paced(events: list[bytes], interval: float, *, end: str = "close") -> Any:
    """A token-by-token upstream: one write every `interval`. `end`: "close" (the
    body's end follows the last event), "hold" (the body stays open 5 s after
    it), "drop" (the connection is cut after the events, the body unfinished)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in events:
            await response.write(data)
            await asyncio.sleep(interval)
        if end == "hold":
            await asyncio.sleep(5)
        elif end == "drop":
            assert request.transport is not None
            request.transport.abort()
        return response

    return handler


async def collected_reads(handler: Any, *, idle: float = 5) -> tuple[dict[str, Any], int, float]:
    """The answer, how many reads the adapter handed over, and how long it took."""
    reads = 0
    async with upstream(handler) as url, open_session() as session:
        config = provider(url, first_token=5, idle=idle)
        adapter = OpenAICompatAdapter(config, session)

        async def counted(body: dict[str, object], limits: AttemptLimits) -> Any:
            nonlocal reads
            generator = adapter.parsed_reads(body, limits)
            sent = None
            try:
                while True:
                    read = await generator.asend(sent)
                    reads += 1
                    sent = yield read
            except StopAsyncIteration:
                return
            finally:
                await generator.aclose()

        started = time.monotonic()
        completion = await collect(counted, config, BODY, asyncio.get_running_loop().time() + 30, MAX_BYTES)
    return orjson.loads(completion.body), reads, time.monotonic() - started


TOKENS = [PLAIN[0]] + [event({"content": f"t{i} "}) for i in range(60)] + PLAIN[3:]
TOKENS_TEXT = "".join(f"t{i} " for i in range(60))


@pytest.mark.asyncio
async def test_a_token_by_token_answer_is_read_in_polls_not_token_by_token() -> None:
    """60 tokens 10 ms apart: the whole answer, handed over in a few polls of
    many tokens each (token by token it was 60+ reads: one wakeup per token)."""
    body, reads, _ = await collected_reads(paced(TOKENS, 0.01))
    assert body["choices"][0]["message"]["content"] == TOKENS_TEXT
    assert body["usage"] == USAGE
    assert reads <= 20, f"{reads} reads for 60 tokens"


@pytest.mark.asyncio
async def test_a_polled_answer_ends_with_its_body_not_at_the_next_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of the body wakes the reader: a finished answer is not held for
    a poll (made 30 s long here, so that waiting for it would show)."""
    monkeypatch.setattr(openai_compat, "_POLL_SECONDS", 30.0)
    body, reads, took = await collected_reads(paced(TOKENS, 0.01))
    assert body["choices"][0]["message"]["content"] == TOKENS_TEXT
    assert reads <= 3  # the first token's read, then one at the end of the body
    assert took < 10


@pytest.mark.asyncio
async def test_done_with_the_body_still_open_ends_a_polled_answer() -> None:
    """`[DONE]` whose body's end does not follow (the server holds it 5 s):
    the answer is whole at the next poll, not when the server lets go."""
    body, _, took = await collected_reads(paced(TOKENS, 0.005, end="hold"))
    assert body["choices"][0]["message"]["content"] == TOKENS_TEXT
    assert took < 4


@pytest.mark.asyncio
async def test_a_connection_cut_mid_answer_is_a_failure_when_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut after 30 of 60 tokens (the body unfinished): a classified failure of
    the provider (to fall back on), never the 30 tokens as a whole answer, and
    at once, not at the next poll (made 30 s long here)."""
    monkeypatch.setattr(openai_compat, "_POLL_SECONDS", 30.0)
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await collected_reads(paced(TOKENS[:31], 0.005, end="drop"))
    assert caught.value.failure in (FailureClass.CONNECTION_ERROR, FailureClass.SERVER_ERROR)
    assert time.monotonic() - started < 10


@pytest.mark.asyncio
async def test_a_stall_after_tokens_is_left_at_the_idle_deadline_when_polled() -> None:
    """20 tokens, then the body held open 5 s: left at `idle` (0.5 s), a poll late at most."""
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await collected_reads(paced(TOKENS[:20], 0.01, end="hold"), idle=0.5)
    assert caught.value.failure is FailureClass.TIMEOUT
    assert "stalled past the idle" in caught.value.message
    assert time.monotonic() - started < 4


@pytest.mark.asyncio
async def test_an_answer_larger_than_the_client_buffer_is_whole_when_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 MB as fast as the server can write it, after the first token: aiohttp
    pauses the socket at 128 KiB unread, so the body's end cannot come to wake
    the reader before the poll; a poll that brought a lot reads again at once,
    so the answer costs about two polls (made 2 s long here), not one per
    128 KiB it could take (~6 polls, 12 s)."""
    monkeypatch.setattr(openai_compat, "_POLL_SECONDS", 2.0)
    big = [event({"content": "x" * 2000}) for _ in range(1500)]
    events = [PLAIN[0], PLAIN[1], *big, *PLAIN[3:]]
    body, _, took = await collected_reads(paced(events, 0.0))
    assert body["choices"][0]["message"]["content"] == "Hel" + "x" * 3_000_000
    assert took < 8
