"""The deadlines of a stream's reads, in process: one timer per stream, moved
per chunk, with the semantics of `asyncio.timeout` around each read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.adapters import Chunk
from proxy.config import ProviderConfig, parse_config
from proxy.deadline import Deadline
from proxy.errors import FailureClass, ProviderError
from proxy.stream import LiveStream, first_token

pytestmark = pytest.mark.asyncio


def provider(idle: float, total: float = 60, first_token: float | None = None) -> ProviderConfig:
    config = parse_config(
        {
            "providers": {
                "p": {
                    "model": "openai/m",
                    "api_base": "http://127.0.0.1:9/v1",
                    "api_key": "k",
                    "timeout": {"idle": idle, "total": total, "first_token": first_token or total},
                }
            },
            "routes": {"r": ["p"]},
            "health": {"probe_interval_seconds": 0},
        },
        environ={},
    )
    return config.providers["p"]


def chunk(text: str) -> Chunk:
    return Chunk(payload=b'{"x":1}', has_content=True, text=text)


class Upstream:
    """Chunks at given gaps (seconds); notes whether it was closed."""

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps
        self.closed = False

    async def stream(self) -> AsyncIterator[Chunk]:
        try:
            for index, gap in enumerate(self.gaps):
                await asyncio.sleep(gap)
                yield chunk(str(index))
        finally:
            self.closed = True


def start_of(upstream: Upstream, idle: float, total: float = 60) -> LiveStream:
    loop = asyncio.get_running_loop()
    return LiveStream(head=[], rest=upstream.stream(), provider=provider(idle, total), deadline=loop.time() + total)


async def read_all(start: LiveStream) -> list[str]:
    texts = []
    while (read := await start.next_read()) is not None:
        texts += [chunk.text for chunk in read]
    return texts


async def test_chunks_within_the_idle_timeout_pass_however_long_the_stream() -> None:
    # 12 gaps of 0.05 s: 0.6 s in all, three times the idle timeout.
    start = start_of(Upstream([0.05] * 12), idle=0.2)
    assert await read_all(start) == [str(i) for i in range(12)]
    await start.close()


async def test_a_stall_past_the_idle_timeout_is_the_providers_timeout() -> None:
    upstream = Upstream([0.01, 0.01, 5])
    start = start_of(upstream, idle=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(ProviderError) as caught:
        await read_all(start)
    assert caught.value.failure is FailureClass.TIMEOUT and caught.value.provider == "p"
    assert "idle" in caught.value.message
    assert 0.2 <= loop.time() - began < 1.0
    await start.close()
    assert upstream.closed
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # nothing left over


async def test_the_total_deadline_ends_a_stream_that_never_stalls() -> None:
    start = start_of(Upstream([0.05] * 100), idle=1, total=0.3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(ProviderError) as caught:
        await read_all(start)
    assert caught.value.failure is FailureClass.TIMEOUT
    assert 0.25 <= loop.time() - began < 0.8
    await start.close()


async def test_time_spent_between_reads_does_not_count_against_the_idle_timeout() -> None:
    start = start_of(Upstream([0, 0, 0]), idle=0.1)
    assert (await start.next_read()) is not None
    await asyncio.sleep(0.3)  # the client is slow to take it: not the provider's stall
    assert (await start.next_read()) is not None
    assert (await start.next_read()) is not None
    assert (await start.next_read()) is None
    await start.close()


async def test_someone_elses_cancellation_is_not_turned_into_a_timeout() -> None:
    upstream = Upstream([0.01, 5])
    start = start_of(upstream, idle=0.2)
    reader = asyncio.create_task(read_all(start))
    await asyncio.sleep(0.05)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await start.close()


async def test_a_cancellation_racing_the_deadline_still_propagates() -> None:
    start = start_of(Upstream([0.01, 5]), idle=0.1)
    reader = asyncio.create_task(read_all(start))
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, reader.cancel)  # about when the idle deadline fires
    with pytest.raises(asyncio.CancelledError):
        await reader
    await start.close()


async def test_a_deadline_moved_later_fires_at_its_new_time() -> None:
    deadline = Deadline()
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline.enter(began + 0.1)
    await asyncio.sleep(0.05)
    deadline.leave()
    deadline.enter(loop.time() + 0.2)  # moved on: the first timer must not cancel this await
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert deadline.expired()
    assert 0.24 <= loop.time() - began < 0.6
    deadline.close()


async def test_a_deadline_moved_earlier_fires_at_its_new_time() -> None:
    deadline = Deadline()
    loop = asyncio.get_running_loop()
    deadline.enter(loop.time() + 10)
    deadline.leave()
    began = loop.time()
    deadline.enter(began + 0.05)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert deadline.expired()
    assert loop.time() - began < 0.5
    deadline.close()


async def test_a_closed_deadline_cancels_nothing() -> None:
    deadline = Deadline()
    deadline.enter(asyncio.get_running_loop().time() + 0.05)
    deadline.close()
    await asyncio.sleep(0.1)
    assert not deadline.expired()


class OneRead:
    """The chunks of one upstream read (all but the last marked `more`), then
    either a failure in the same read or a stall of `stall` seconds."""

    def __init__(self, texts: list[str], fail: bool = False, stall: float = 0) -> None:
        self.texts, self.fail, self.stall = texts, fail, stall

    async def stream(self) -> AsyncIterator[Chunk]:
        for index, text in enumerate(self.texts):
            piece = chunk(text)
            piece.more = self.fail or index < len(self.texts) - 1
            yield piece
        if self.fail:
            raise ProviderError(FailureClass.SERVER_ERROR, "malformed stream event")
        await asyncio.sleep(self.stall)


async def test_a_failure_in_the_rest_of_a_read_is_the_providers() -> None:
    loop = asyncio.get_running_loop()
    start = LiveStream(
        head=[], rest=OneRead(["a", "b"], fail=True).stream(), provider=provider(idle=1), deadline=loop.time() + 60
    )
    read = await start.next_read()
    assert read is not None and [chunk.text for chunk in read] == ["a", "b"]  # what came before it goes out first
    with pytest.raises(ProviderError) as caught:
        await start.next_read()
    assert caught.value.failure is FailureClass.SERVER_ERROR and caught.value.provider == "p"
    await start.close()


async def test_the_read_after_a_reads_last_chunk_is_guarded_again() -> None:
    loop = asyncio.get_running_loop()
    start = LiveStream(
        head=[], rest=OneRead(["a", "b", "c"], stall=5).stream(), provider=provider(idle=0.2), deadline=loop.time() + 60
    )
    began = loop.time()
    read = await start.next_read()
    assert read is not None and [chunk.text for chunk in read] == ["a", "b", "c"]  # one read, handed over whole
    with pytest.raises(ProviderError) as caught:
        await start.next_read()
    assert caught.value.failure is FailureClass.TIMEOUT and loop.time() - began < 1.0
    await start.close()


class Silent:
    """An adapter whose stream opens and then says nothing; notes whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def stream(self, body: object, limits: object) -> AsyncIterator[Chunk]:
        try:
            await asyncio.sleep(60)
            yield chunk("late")
        finally:
            self.closed = True


async def test_no_first_token_in_time_is_the_providers_timeout_and_closes_the_upstream() -> None:
    silent, loop = Silent(), asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(ProviderError) as caught:
        await first_token(silent, provider(idle=5, first_token=0.1), {}, began + 60, 1 << 20)  # type: ignore[arg-type]
    assert caught.value.failure is FailureClass.TIMEOUT and "no first token within 0.1s" in caught.value.message
    assert 0.1 <= loop.time() - began < 1.0 and silent.closed


async def test_a_cancelled_wait_for_the_first_token_stays_a_cancellation() -> None:
    silent = Silent()
    waiting = asyncio.create_task(
        first_token(silent, provider(idle=5), {}, asyncio.get_running_loop().time() + 60, 1 << 20)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert silent.closed


async def test_an_adapter_that_marks_more_and_then_waits_is_still_bounded_by_the_idle_timeout() -> None:
    async def broken_promise() -> AsyncIterator[Chunk]:
        promised = chunk("a")
        promised.more = True  # "the rest of this read is here" ...
        yield promised
        await asyncio.sleep(5)  # ... and then it waits on the network
        yield chunk("b")

    loop = asyncio.get_running_loop()
    start = LiveStream(head=[], rest=broken_promise(), provider=provider(idle=0.2), deadline=loop.time() + 60)
    began = loop.time()
    with pytest.raises(ProviderError) as caught:
        await start.next_read()
    assert caught.value.failure is FailureClass.TIMEOUT and loop.time() - began < 1.0
    await start.close()
