"""One provider's live stream: held until its first real token, then read
chunk by chunk under the idle and total deadlines.

`first_token` opens a stream and holds its chunks until the first one that
carries content (or a clean empty end), so any failure before it is the
provider's and invisible to the client. `LiveStream.next_read` bounds every
later read (and hands over all the chunks that read brought); one `Deadline`
timer serves every read of the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.adapters.base import Adapter, AttemptLimits, Chunk, Completion
from proxy.config import ProviderConfig
from proxy.deadline import Deadline
from proxy.errors import FailureClass, ProviderError
from proxy.observe import StreamHooks
from proxy.quota import Reservation
from proxy.stream.assemble import Assembler

# An adapter's `parsed_reads` (`OpenAICompatAdapter`): the answer's chunks as parsed dicts (or, for a
# plain content chunk, its text), read by read; it is sent True once the caller has had a token (the
# reads may then be polled).
ParsedReads = Callable[[dict[str, object], AttemptLimits], AsyncGenerator[list[dict[str, Any] | str], bool | None]]


@dataclass(slots=True)
class LiveStream:
    """A provider's stream whose first token has arrived."""

    head: list[Chunk]
    rest: AsyncIterator[Chunk]
    provider: ProviderConfig
    deadline: float  # loop time by which the whole stream must end
    reservation: Reservation | None = None
    hide_usage: bool = False  # usage was asked for the quota, not by the client
    trace: StreamHooks | None = None  # the attempt's span, when traces are on: it ends with the stream
    _reads: Deadline | None = field(default=None, repr=False)  # one timer for every read's deadline
    _failure: ProviderError | None = field(default=None, repr=False)  # raised by the rest of a read, for the next

    def take_head(self) -> list[Chunk]:
        """The chunks held back until the first token (once)."""
        head, self.head = self.head, []
        return head

    async def next_read(self) -> list[Chunk] | None:
        """The chunks of the next upstream read (at least one, the rest of the
        read marked `Chunk.more` by the adapter), within the idle and total
        deadlines; None at the end."""
        failure = self._failure
        if failure is not None:  # raised by the rest of the last read: its chunks went first
            self._failure = None
            raise failure
        reads = self._reads
        if reads is None:
            reads = self._reads = Deadline()
        reads.enter(min(reads.now() + self.provider.timeout.idle, self.deadline))
        try:
            chunks = [await self.rest.__anext__()]
            if chunks[0].more:  # guarded too: an adapter that marks `more` and then waits is still bounded
                await self._rest_of_read(chunks)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not reads.expired():
                raise
            raise ProviderError(
                FailureClass.TIMEOUT, "the stream stalled past the idle or total timeout", provider=self.provider.name
            ) from None
        except ProviderError as exc:
            exc.provider = self.provider.name
            raise
        finally:
            reads.leave()
        return chunks

    async def _rest_of_read(self, chunks: list[Chunk]) -> None:
        """Append the chunks that follow in the same upstream read (already here:
        no wait on the network); a failure among them is kept for the next read,
        after these chunks have gone out."""
        rest = self.rest
        chunk = chunks[-1]
        try:
            while chunk.more:
                chunk = await rest.__anext__()
                chunks.append(chunk)
        except StopAsyncIteration:
            return
        except ProviderError as exc:
            exc.provider = self.provider.name
            self._failure = exc

    async def close(self) -> None:
        if self._reads is not None:
            self._reads.close()
        await close_stream(self.rest)


async def first_token(
    adapter: Adapter, provider: ProviderConfig, body: dict[str, object], deadline: float, max_bytes: int
) -> LiveStream:
    """Open a stream and hold its chunks until the first real token (or a clean
    empty end); any failure before that is the provider's and stays invisible."""
    first_deadline = min(asyncio.get_running_loop().time() + provider.timeout.first_token, deadline)
    stream = adapter.stream(body, _first_token_limits(provider, first_deadline, max_bytes))
    live = LiveStream(head=[], rest=stream, provider=provider, deadline=deadline)
    head = live.head
    started = False
    first = Deadline()  # as `asyncio.timeout_at`, for a fraction of its cost
    try:
        first.enter(first_deadline)
        while (chunk := await anext(stream, None)) is not None:
            head.append(chunk)
            if chunk.has_content or chunk.finish_reason is not None:
                break
        if head and head[-1].more:  # the first token's read goes on: the rest of it belongs to the head
            await live._rest_of_read(head)
        started = True
    except asyncio.CancelledError:
        if not first.expired():
            raise
        raise ProviderError(FailureClass.TIMEOUT, f"no first token within {provider.timeout.first_token:g}s") from None
    finally:
        first.close()
        if not started:  # failed, timed out or cancelled: close the upstream now
            await close_stream(stream)
    return live


async def collect(
    parsed_reads: ParsedReads, provider: ProviderConfig, body: dict[str, object], deadline: float, max_bytes: int
) -> Completion:
    """A whole answer for a non-stream request, from a provider's parsed reads
    (`OpenAICompatAdapter.parsed_reads`, opened by the first read), under the
    deadlines of a stream: `first_token` until a chunk carries a token or a
    finish, then `idle` for each read, `deadline` for all. One timer for every
    read; the upstream is closed however this ends."""
    timer = Deadline()
    first = min(timer.now() + provider.timeout.first_token, deadline)
    reads = parsed_reads(body, _first_token_limits(provider, first, max_bytes))
    idle = provider.timeout.idle
    assembler = Assembler()
    started = False
    try:
        while True:
            timer.enter(min(timer.now() + idle, deadline) if started else first)
            try:
                read = await reads.asend(started or None)  # True once a token came: the reads may then be polled
            except StopAsyncIteration:
                break
            finally:
                timer.leave()
            if assembler.add_read(read):
                started = True
    except asyncio.CancelledError:
        if not timer.expired():
            raise
        if not started:
            raise ProviderError(
                FailureClass.TIMEOUT, f"no first token within {provider.timeout.first_token:g}s"
            ) from None
        raise ProviderError(
            FailureClass.TIMEOUT, "the stream stalled past the idle or total timeout", provider=provider.name
        ) from None
    finally:
        timer.close()
        await close_stream(reads)
    return assembler.completion()


def _first_token_limits(provider: ProviderConfig, first_deadline: float, max_bytes: int) -> AttemptLimits:
    """An attempt's network limits until its first token. No read limit for the
    adapter: the first-token deadline and then each read's bound every read; a
    second timer per read would be work done twice."""
    return AttemptLimits(
        connect=min(provider.timeout.connect, first_deadline - asyncio.get_running_loop().time()),
        read=None,
        max_bytes=max_bytes,
    )


async def close_stream(stream: AsyncIterator[object]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
