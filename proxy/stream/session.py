"""One client stream, from its first token to its end: the one owner of the flow.

`StreamSession.open` walks the route until a provider produces a first token
(failures before it are invisible). `serve` then sends the held chunks and the
rest of the upstream stream through the client's `Encoder`, one write per
upstream read. When the provider fails after its first token, the next node
of the walk continues the answer from where the client is (see `splice`):
repeated text is dropped, a fresh start with different text is refused, and
when no one can continue the stream ends in-band (`Encoder.failed`). Every
provider's end is accounted for here: health for a failure after the first
token, quota for its real usage.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from proxy.adapters.base import Chunk
from proxy.config import Route
from proxy.errors import AllProvidersFailed, ProviderError, UpstreamClientError
from proxy.observe import RequestRecord
from proxy.routing import Walk
from proxy.shaping import Needs
from proxy.stream.encoders import Encoder
from proxy.stream.live import LiveStream
from proxy.stream.splice import Restarted, Splice

if TYPE_CHECKING:
    from proxy.dispatch import Dispatcher

CLIENT_DISCONNECTED = "client_disconnected"
INTERNAL_ERROR = "internal_error"  # a bug ended the stream: its traceback is logged
OnEnd = Callable[[str, ProviderError | None], None]


class _Sent:
    """What the client has been sent: the answer's text so far (to continue
    it), whether it holds tool calls (which are never continued), and how many
    content chunks (about one token each) it took. The text is kept as UTF-8 in
    one growing buffer: no object per piece (~50 bytes of overhead each), no
    copy of what came before when a piece is added."""

    __slots__ = ("_text", "chunks", "tool_calls")

    def __init__(self) -> None:
        self._text = bytearray()
        self.tool_calls = False
        self.chunks = 0

    def note(self, chunk: Chunk) -> None:
        if chunk.text:
            self._text += chunk.text.encode()
            self.chunks += 1
        if chunk.tool_calls:
            self.tool_calls = True

    @property
    def text(self) -> str:
        return self._text.decode()


def continuable(body: dict[str, Any]) -> bool:
    """Whether a request's answer can be continued as text elsewhere: one choice, no logprobs."""
    n = body.get("n")
    return (n is None or n == 1) and not body.get("logprobs")


class StreamSession:
    """One client stream, answered by one provider, or by several when a
    provider fails after its first token and the next one continues."""

    def __init__(
        self, dispatcher: Dispatcher, route: Route, body: dict[str, Any], needs: Needs, record: RequestRecord
    ) -> None:
        self.dispatcher = dispatcher
        self.route = route
        self.body = body
        self.needs = needs
        self.record = record
        self.walk = Walk(route)
        self.live: LiveStream
        self.providers: list[str] = []  # who answered: the first, then any that continued

    @property
    def continued(self) -> list[str]:
        return self.providers[1:]

    async def open(self) -> None:
        """Walk the route to a first token; raises `AllProvidersFailed` or `UpstreamClientError`."""
        self.live = await self.dispatcher.open_stream(self.route, self.body, self.needs, self.record, self.walk)
        self.providers.append(self.live.provider.name)
        self.record.ttft_ms = self.record.elapsed_ms()

    async def serve(
        self, encoder: Encoder, on_end: OnEnd, cut_by: Callable[[], str] | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The bytes sent to the client. Closing this generator (the client went
        away) closes the upstream; `on_end` is called once with the outcome ("ok",
        "stream_interrupted", or, when the stream is cut short, what `cut_by`
        says) and the first failure after the first token. The held chunks go out
        as one write, and so do the chunks of one upstream read."""
        record, live, sent = self.record, self.live, _Sent()
        splice: Splice | None = None
        outcome: str | None = None
        failure: ProviderError | None = None
        batch: list[bytes] = []

        def emit(chunks: list[Chunk]) -> None:
            for chunk in chunks:
                if chunk.usage is not None:
                    record.usage = chunk.usage
                    if live.hide_usage and not chunk.has_content and chunk.finish_reason is None:
                        continue  # usage the client did not ask for (the quota did)
                sent.note(chunk)
                batch.append(encoder.chunk(chunk, splice is not None))

        ending = b""
        try:
            opening = encoder.opening()
            if opening:
                batch.append(opening)
            while outcome is None:
                try:
                    read: list[Chunk] | None = live.take_head()
                    while read is not None:
                        if splice is None:
                            emit(read)
                        else:
                            for chunk in read:
                                emit(splice.feed(chunk))
                                del chunk
                        if batch and not (read and read[-1].more):  # `more` on the last: the end is here too
                            yield batch[0] if len(batch) == 1 else b"".join(batch)
                            batch.clear()
                        read = None  # what was sent is not held while the next read waits (memory per open stream)
                        read = await live.next_read()
                    if splice is not None:
                        emit(splice.end())
                    outcome = "ok"
                except (ProviderError, Restarted) as exc:
                    if batch:  # what came before the failure in its read: sent before any wait
                        yield b"".join(batch)
                        batch.clear()
                    await live.close()
                    if isinstance(exc, Restarted):  # the model's choice, not the provider's failure
                        self.dispatcher.stream_ended(live, None, None)
                        record.attempt(live.provider.name, "restarted", 0.0, str(exc))
                    else:
                        self.dispatcher.stream_ended(live, None, exc)
                        failure = failure or _interrupted(record, exc)
                    assert failure is not None
                    resumed = await self._continue(failure, sent)
                    if resumed is None:
                        outcome = "stream_interrupted"
                        ending = encoder.failed(failure, self.providers)
                    else:
                        live, splice = resumed, Splice(sent.text)
            if outcome == "ok":
                self.dispatcher.stream_ended(live, record.usage, None)
                ending = encoder.finished(record.usage, self.providers)
            yield b"".join(batch) + ending if batch else ending
        except Exception:
            outcome = INTERNAL_ERROR  # a bug: logged with its traceback by the app
            raise
        finally:
            await live.close()
            if outcome is None or outcome == INTERNAL_ERROR:  # cut short: what it used is settled all the same
                self.dispatcher.stream_ended(live, record.usage, None)
            on_end(outcome or (cut_by() if cut_by is not None else CLIENT_DISCONNECTED), failure)

    async def _continue(self, failure: ProviderError, sent: _Sent) -> LiveStream | None:
        """The next node on the walk continues the answer, or None when the route
        does not allow it, the answer cannot be continued as text, or no one can."""
        if not self.route.continuation or sent.tool_calls or not sent.text or not continuable(self.body):
            return None
        failed = self.providers[-1]
        if self.walk.current is None:  # the walk had run out: a last resort answered, and no one is left
            return None
        self.walk.follow(failure.failure.value)
        if self.record.trace is not None:
            self.record.trace.on_continuation(failed, failure)
        try:
            live = await self.dispatcher.open_stream(
                self.route, self.body, self.needs, self.record, self.walk, continue_from=(sent.text, sent.chunks)
            )
        except (AllProvidersFailed, UpstreamClientError):
            return None
        self.providers.append(live.provider.name)
        self.dispatcher.metrics.continuations.labels(
            self.route.name, failed, live.provider.name, failure.failure.value
        ).inc()
        return live


def _interrupted(record: RequestRecord, failure: ProviderError) -> ProviderError:
    record.interrupted = failure.failure.value
    return failure
