"""How an SSE response ends when it cannot run to its end, in process with
hand-written `receive`/`send`: the server cancels it (shutdown grace over), the
client goes away, or the client stops reading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from proxy.sse import DONE
from proxy.stream import ChatEncoder, SSEResponse

pytestmark = pytest.mark.asyncio

SCOPE: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


class Client:
    """`receive` and `send` of one connection; sends can be made to block."""

    def __init__(self, block_after: int | None = None) -> None:
        self.bodies: list[tuple[bytes, bool]] = []
        self.gone = asyncio.Event()
        self.block_after = block_after  # block the send of body number N (never returns)
        self.body_sent = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        if self.block_after is not None and len(self.bodies) == self.block_after:
            self.block_after = None
            await asyncio.Event().wait()  # a client that stopped reading
        self.bodies.append((message["body"], message["more_body"]))
        self.body_sent.set()


class Source:
    """One event, then an upstream that stalls; notes whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            yield b'data: {"n":1}\n\n'
            yield b'data: {"n":2}\n\n'
            await asyncio.sleep(60)
            yield DONE
        finally:
            self.closed = True


def sse_response(chunks: AsyncGenerator[bytes, None], write_timeout: float = 30.0) -> SSEResponse:
    encoder = ChatEncoder()
    return SSEResponse(
        chunks,
        {},
        shutdown=encoder.shutting_down,
        final=encoder.final,
        write_timeout=write_timeout,
        broken=encoder.broken,
    )


async def started(response: SSEResponse, client: Client) -> asyncio.Task[None]:
    task = asyncio.create_task(response(SCOPE, client.receive, client.send))
    await asyncio.wait_for(client.body_sent.wait(), 2)
    await asyncio.sleep(0.01)
    return task


async def test_a_response_cancelled_by_the_server_ends_in_band_and_returns() -> None:
    source, client = Source(), Client()
    response = sse_response(source.chunks())
    task = await started(response, client)
    task.cancel()  # what uvicorn does when the shutdown grace period is over
    await asyncio.wait_for(task, 2)  # ended on its own terms: not cancelled
    assert not task.cancelled()
    body, more = client.bodies[-1]
    assert not more and body.endswith(DONE)
    error = json.loads(body.removesuffix(DONE).removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error" and error["code"] == "server_shutting_down"
    assert [b for b, _ in client.bodies[:-1]] == [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n']
    assert source.closed and response.cut_reason == "server_shutting_down"


async def test_a_response_cancelled_while_its_send_is_blocked_still_ends_in_band() -> None:
    source, client = Source(), Client(block_after=1)
    response = sse_response(source.chunks())
    task = await started(response, client)
    task.cancel()
    await asyncio.wait_for(task, 2)
    assert client.bodies[-1][0].endswith(DONE) and b"server_shutting_down" in client.bodies[-1][0]
    assert source.closed


async def test_a_client_that_goes_away_gets_nothing_more() -> None:
    source, client = Source(), Client()
    response = sse_response(source.chunks())
    task = await started(response, client)
    client.gone.set()
    await asyncio.wait_for(task, 2)
    assert not task.cancelled()
    assert all(b"server_shutting_down" not in body for body, _ in client.bodies)
    assert source.closed and response.cut_reason == "client_disconnected"


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    source, client = Source(), Client(block_after=1)
    response = sse_response(source.chunks(), write_timeout=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    task = asyncio.create_task(response(SCOPE, client.receive, client.send))
    await asyncio.wait_for(task, 2)
    assert 0.15 < loop.time() - began < 1.0
    assert len(client.bodies) == 1 and source.closed
    assert response.cut_reason == "client_disconnected"
    current = asyncio.current_task()
    assert not task.cancelled() and current is not None and current.cancelling() == 0


async def test_a_stream_that_ends_sends_done_as_the_end_of_its_last_write() -> None:
    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b'data: {"n":1}\n\n'
        yield DONE

    client = Client()
    await asyncio.wait_for(sse_response(chunks())(SCOPE, client.receive, client.send), 2)
    assert client.bodies == [(b'data: {"n":1}\n\n', True), (DONE, False)]


async def cut_by_a_bug() -> tuple[SSEResponse, Client]:
    """A stream whose source raises (a bug) after its first event; the bug must reach the caller."""

    async def buggy() -> AsyncGenerator[bytes, None]:
        yield b'data: {"n":1}\n\n'
        raise KeyError("a bug")

    client = Client()
    response = sse_response(buggy())
    with pytest.raises(KeyError):
        await asyncio.wait_for(response(SCOPE, client.receive, client.send), 2)
    return response, client


async def test_a_bug_in_the_stream_is_not_reported_as_a_shutdown() -> None:
    response, client = await cut_by_a_bug()
    assert response.cut_reason == "internal_error"
    assert all(b"server_shutting_down" not in body for body, _ in client.bodies)


async def test_a_bug_in_the_stream_ends_it_in_band_and_is_raised_all_the_same() -> None:
    """The client gets an error event and the end of the stream, not a broken
    connection; the bug still reaches the app, to be logged with its traceback."""
    _, client = await cut_by_a_bug()
    (first, more), (last, more_after) = client.bodies
    assert first == b'data: {"n":1}\n\n' and more and not more_after
    error_event, done = last.split(b"\n\n", 1)
    assert json.loads(error_event.removeprefix(b"data: "))["error"]["code"] == "internal_error"
    assert done == DONE


class ScriptedClient(Client):
    """A client whose `send` of body number N does what the script says: `gone` raises the
    OSError of a closed socket; `block` never returns. `receive` first hands over the rest
    of the request body (a message that is no disconnect)."""

    def __init__(self, script: dict[int, str], block_start: bool = False) -> None:
        super().__init__()
        self.script = script
        self.block_start = block_start
        self.received = 0

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        if self.received == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        return await super().receive()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if self.block_start:
                await asyncio.Event().wait()  # the client's socket is full before the headers went out
            return
        action = self.script.get(len(self.bodies))
        if action == "gone":
            raise ConnectionResetError("the client went away")
        if action == "block":
            self.body_sent.set()
            await asyncio.Event().wait()
        await super().send(message)


async def test_a_client_gone_while_a_body_is_sent_ends_the_response_quietly() -> None:
    source, client = Source(), ScriptedClient({1: "gone"})
    response = sse_response(source.chunks())
    await asyncio.wait_for(response(SCOPE, client.receive, client.send), 2)
    assert [b for b, _ in client.bodies] == [b'data: {"n":1}\n\n']
    assert response.cut_reason == "client_disconnected" and source.closed


async def test_a_response_cancelled_before_its_headers_went_out_stays_cancelled() -> None:
    source, client = Source(), ScriptedClient({}, block_start=True)
    response = sse_response(source.chunks())
    task = asyncio.create_task(response(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.05)  # the scenario: the headers' send is under way, blocked
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert client.bodies == []


async def test_a_client_gone_during_the_shutdown_write_ends_the_response_quietly() -> None:
    source, client = Source(), ScriptedClient({2: "gone"})  # bodies 0 and 1, then the in-band end fails
    response = sse_response(source.chunks())
    task = await started(response, client)
    task.cancel()  # the server is stopping
    await asyncio.wait_for(task, 2)
    assert not task.cancelled() and len(client.bodies) == 2 and source.closed
    assert client.received == 2  # the request's last body message was no disconnect: it waited on


async def test_a_shutdown_write_the_client_does_not_take_is_given_up_at_its_deadline() -> None:
    source, client = Source(), ScriptedClient({2: "block"})
    response = sse_response(source.chunks(), write_timeout=0.1)
    task = await started(response, client)
    task.cancel()
    await asyncio.wait_for(task, 2)  # bounded by the write deadline, then over: not cancelled
    assert not task.cancelled() and len(client.bodies) == 2 and source.closed


async def test_a_second_cancel_during_the_shutdown_write_is_obeyed() -> None:
    source, client = Source(), ScriptedClient({2: "block"})
    response = sse_response(source.chunks())
    task = await started(response, client)
    task.cancel()
    await asyncio.sleep(0.05)  # the scenario: the in-band end is being written, blocked
    task.cancel()  # the server insists
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert source.closed
