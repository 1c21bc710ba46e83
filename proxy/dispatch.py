"""The attempt loop: walk a route's graph, call each provider under its
deadlines, retry within the route's budget, follow the edge for each failure.

Non-streaming requests end with a `Completion`. Streaming requests end with a
`StreamStart`: the chunks held back until the first real token, plus the
rest of the upstream stream; the caller (app + relay) sends headers only then,
so any failure before the first token is invisible to the client.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry

from proxy.adapters.base import Adapter, Chunk, Completion, Embeddings, Limits, Usage
from proxy.background import Background
from proxy.config import Config, ProviderConfig, Route
from proxy.deadline import Deadline
from proxy.errors import AllProvidersFailed, FailureClass, ProviderError, UpstreamClientError
from proxy.health import Decision, Health, HealthBoard
from proxy.observe import Metrics, RequestRecord
from proxy.quota import QuotaGate, Reservation, maybe_received, never_sent
from proxy.routing import Walk, next_node
from proxy.shaping import Needs, Shaper, eligibility

T = TypeVar("T")
Call = Callable[[Adapter, ProviderConfig, dict[str, Any], float], Awaitable[T]]

RETRYABLE = frozenset(
    {FailureClass.TIMEOUT, FailureClass.CONNECTION_ERROR, FailureClass.RATE_LIMITED, FailureClass.SERVER_ERROR}
)
BACKOFF_BASE = 0.25
BACKOFF_CAP = 4.0


@dataclass(slots=True)
class StreamStart:
    """A stream whose first token has arrived."""

    head: list[Chunk]
    rest: AsyncIterator[Chunk]
    provider: ProviderConfig
    deadline: float  # loop time by which the whole stream must end
    reservation: Reservation | None = None
    hide_usage: bool = False  # usage was asked for the quota, not by the client
    _reads: Deadline | None = field(default=None, repr=False)  # one timer for every read's deadline
    _more: bool = field(default=False, repr=False)  # the last chunk had more of its upstream read behind it

    async def next_chunk(self) -> Chunk | None:
        """The next chunk within the idle and total deadlines; None at the end."""
        if self._more:  # the rest of an upstream read: no wait on the network, nothing to guard
            try:
                chunk = await self.rest.__anext__()
            except StopAsyncIteration:
                return None
            except ProviderError as exc:
                exc.provider = self.provider.name
                raise
            self._more = chunk.more
            return chunk
        reads = self._reads
        if reads is None:
            reads = self._reads = Deadline()
        reads.enter(min(reads.now() + self.provider.timeout.idle, self.deadline))
        try:
            chunk_or_end = await anext(self.rest, None)
            self._more = chunk_or_end is not None and chunk_or_end.more
            return chunk_or_end
        except asyncio.CancelledError:
            if not reads.expired():
                raise
            raise ProviderError(
                FailureClass.TIMEOUT, "stream stalled past the idle or total timeout", provider=self.provider.name
            ) from None
        except ProviderError as exc:
            exc.provider = self.provider.name
            raise
        finally:
            reads.leave()

    async def close(self) -> None:
        if self._reads is not None:
            self._reads.close()
        await _close(self.rest)


CONTINUE_INSTRUCTION = (
    "Your previous message was cut off. Continue it exactly where it stops: do not repeat any of it, "
    "do not start over and do not comment on the interruption."
)


def continuation_body(body: dict[str, Any], partial: str) -> dict[str, Any]:
    """Ask the next provider to go on with a partial answer."""
    messages = [
        *body["messages"],
        {"role": "assistant", "content": partial},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    return {**body, "messages": messages}


class StreamSession:
    """One client stream, answered by one provider, or by several when a
    provider fails after its first token and the next one continues."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        record: RequestRecord,
        walk: Walk,
    ) -> None:
        self.dispatcher = dispatcher
        self.route = route
        self.body = body
        self.needs = needs
        self.record = record
        self.walk = walk
        self.start: StreamStart
        self.providers: list[str] = []  # who answered: the first, then any that continued

    @property
    def continued(self) -> list[str]:
        return self.providers[1:]

    async def continue_after(self, failure: ProviderError, partial: str) -> StreamStart | None:
        """The stream's provider failed after `partial`: the next provider on the
        graph continues it, or None when continuation is off or no one can."""
        failed = self.start
        self.dispatcher.stream_ended(failed, None, failure)
        if not self.route.continuation or not partial:
            return None
        self.walk.follow(failure.failure.value)
        try:
            self.start = await self.dispatcher._open(self, continuation_body(self.body, partial))
        except (AllProvidersFailed, UpstreamClientError):
            return None
        self.dispatcher.metrics.continuations.labels(
            self.route.name, failed.provider.name, self.start.provider.name, failure.failure.value
        ).inc()
        return self.start

    def ended(self, failure: ProviderError | None) -> None:
        self.dispatcher.stream_ended(self.start, self.record.usage, failure)


def backoff(attempt: int, retry_after: float | None, rng: Callable[[], float]) -> float:
    """Full-jitter exponential backoff, at least what the provider asked for."""
    delay: float = rng() * min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)
    return max(delay, retry_after or 0.0)


@dataclass(slots=True)
class Answered(Generic[T]):
    """The result of a walk: what the provider gave and what it counted."""

    result: T
    provider: ProviderConfig
    reservation: Reservation | None
    trimmed: int = 0


class Dispatcher:
    """Walks routes for requests; one per app."""

    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, Adapter],
        health: HealthBoard,
        quota: QuotaGate,
        *,
        shaper: Shaper | None = None,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.adapters = adapters
        self.health = health
        self.quota = quota
        self.shaper = shaper or Shaper()
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.background = Background()
        self._sleep = sleep
        self._rng = rng

    async def complete(self, route: Route, body: dict[str, Any], needs: Needs, record: RequestRecord) -> Completion:
        async def call(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> Completion:
            limits = _limits(provider, deadline, self.config.limits.max_upstream_bytes)
            try:
                async with asyncio.timeout_at(deadline):
                    return await adapter.complete(body, limits)
            except TimeoutError:
                raise ProviderError(FailureClass.TIMEOUT, f"no answer within {provider.timeout.total:g}s") from None

        answered = await self._walk(route, body, needs, record, call)
        completion = answered.result
        self.health.success(answered.provider.name)
        if answered.reservation is not None:
            self.background.spawn(self.quota.settle(answered.reservation, completion.usage, None))
        record.model = completion.model
        record.usage = completion.usage
        return completion

    async def embed(self, route: Route, body: dict[str, Any], needs: Needs, record: RequestRecord) -> Embeddings:
        """An embeddings request along the route: the same walk as `complete`;
        `needs.embedding_space` keeps it within one vector space."""

        async def call(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> Embeddings:
            limits = _limits(provider, deadline, self.config.limits.max_upstream_bytes)
            try:
                async with asyncio.timeout_at(deadline):
                    return await adapter.embed(body, limits)
            except TimeoutError:
                raise ProviderError(FailureClass.TIMEOUT, f"no answer within {provider.timeout.total:g}s") from None

        answered = await self._walk(route, body, needs, record, call)
        embeddings = answered.result
        self.health.success(answered.provider.name)
        if answered.reservation is not None:
            self.background.spawn(self.quota.settle(answered.reservation, embeddings.usage, None))
        record.model = embeddings.model
        record.usage = embeddings.usage
        return embeddings

    async def open_stream(
        self, route: Route, body: dict[str, Any], needs: Needs, record: RequestRecord
    ) -> StreamSession:
        session = StreamSession(self, route, body, needs, record, Walk(route))
        session.start = await self._open(session, body)
        record.ttft_ms = record.elapsed_ms()
        return session

    async def _open(self, session: StreamSession, body: dict[str, Any]) -> StreamStart:
        async def call(
            adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float
        ) -> StreamStart:
            return await _first_token(
                adapter, provider, _for_stream(provider, body), deadline, self.config.limits.max_upstream_bytes
            )

        started = time.perf_counter()
        answered = await self._walk(session.route, body, session.needs, session.record, call, session.walk)
        start = answered.result
        start.reservation = answered.reservation
        start.hide_usage = not _wants_usage(body)
        session.providers.append(answered.provider.name)
        self.health.success(answered.provider.name, ttft=time.perf_counter() - started)
        for chunk in start.head:
            session.record.model = chunk.model or session.record.model
        return start

    def stream_ended(self, start: StreamStart, usage: Usage | None, failure: ProviderError | None) -> None:
        """Account for one provider's stream once it is over: a failure after the
        first token counts against its health; usage settles its quota."""
        if failure is not None:
            self.health.failure(start.provider.name, failure.failure, failure.retry_after)
        if start.reservation is not None:
            self.background.spawn(self.quota.settle(start.reservation, usage, None))

    async def _walk(
        self,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        record: RequestRecord,
        call: Call[T],
        walk: Walk | None = None,
    ) -> Answered[T]:
        loop = asyncio.get_running_loop()
        walk_deadline = loop.time() + route.budget if route.budget else math.inf
        walk = walk or Walk(route)
        while (node := walk.current) is not None:
            provider = self.config.providers[node]
            if walk.can_defer and self.health.view(node).state is Health.SLOW:
                walk.defer()
                continue
            started = loop.time()
            try:
                if route.hedge_after_ms is None:
                    answered = await self._visit(provider, route, body, needs, call, walk_deadline)
                else:
                    node, answered = await self._hedged(walk, route, body, needs, record, call, walk_deadline)
            except ProviderError as exc:
                node = walk.current or node  # a hedge, when one was started, is the node that failed last
                exc.provider = node
                record.attempt(node, exc.failure.value, (loop.time() - started) * 1000, exc.message)
                if exc.failure is FailureClass.CLIENT_ERROR:
                    raise UpstreamClientError(exc) from exc
                walk.follow(exc.failure.value)
            else:
                record.attempt(node, "ok", (loop.time() - started) * 1000)
                record.provider = node
                record.trimmed = answered.trimmed
                return answered
        raise AllProvidersFailed(route.name, record.attempts, local_only=route.local_only or needs.local_only)

    async def _hedged(
        self,
        walk: Walk,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        record: RequestRecord,
        call: Call[T],
        walk_deadline: float,
    ) -> tuple[str, Answered[T]]:
        """Visit the walk's node; if it has not answered (a first token, for
        streams) within `hedge_after_ms`, start the node its timeout edge leads
        to as well. The first answer wins; the other is cancelled and its quota
        reservation returned. When both fail, the walk goes on from the hedge."""
        loop = asyncio.get_running_loop()
        primary = walk.current
        assert primary is not None and route.hedge_after_ms is not None

        def visit(node: str) -> asyncio.Task[Answered[T]]:
            provider = self.config.providers[node]
            return asyncio.ensure_future(self._visit(provider, route, body, needs, call, walk_deadline))

        started = loop.time()
        first = visit(primary)
        done, _ = await asyncio.wait({first}, timeout=route.hedge_after_ms / 1000)
        hedge = None if done else next_node(route, primary, FailureClass.TIMEOUT.value, visited=walk.visited)
        if hedge is None:
            return primary, await first
        walk.jump(hedge)
        racing = {first: primary, visit(hedge): hedge}
        failures: dict[str, ProviderError] = {}
        try:
            while racing:
                done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: racing[t] != primary):
                    node = racing.pop(task)
                    error = task.exception()
                    if error is None:
                        if node == hedge:
                            record.attempt(
                                primary,
                                FailureClass.TIMEOUT.value,
                                (loop.time() - started) * 1000,
                                f"no answer within {route.hedge_after_ms} ms; the hedge answered first",
                            )
                        return node, task.result()
                    if not isinstance(error, ProviderError):
                        raise error
                    failures[node] = error
                    if node == primary:
                        error.provider = node
                        record.attempt(node, error.failure.value, (loop.time() - started) * 1000, error.message)
            # Both failed: the walk goes on from the hedge, with the hedge's failure.
            raise failures[hedge]
        finally:
            for task in racing:
                task.cancel()
            for task in racing:
                await self._discard(task)

    async def _discard(self, task: asyncio.Task[Answered[T]]) -> None:
        """Wait out a hedge that lost; a stream it opened anyway is closed, and
        its quota keeps the request (the provider received it) but not the tokens."""
        try:
            answered = await task
        except (asyncio.CancelledError, ProviderError):
            return  # _attempt already settled what it had reserved
        if isinstance(answered.result, StreamStart):
            await answered.result.close()
        self.background.spawn(self.quota.settle(answered.reservation, None, FailureClass.CONNECTION_ERROR))

    async def _visit(
        self,
        provider: ProviderConfig,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        call: Call[T],
        walk_deadline: float,
    ) -> Answered[T]:
        """One node of the walk: skip it (policy, capability, breaker, context,
        quota) or call it with the request shaped for it."""
        skip = eligibility(provider, route, needs)
        if skip is not None:
            raise skip
        if self.health.decide(provider.name) is Decision.SKIP:
            health = self.health.view(provider.name)
            raise ProviderError(FailureClass.UNHEALTHY, f"breaker open ({health.reason}); not called")
        shaped = await self.shaper.shape(provider, body)
        try:
            result, reservation = await self._attempt(provider, shaped.body, call, walk_deadline)
        except ProviderError as exc:
            if exc.failure not in (FailureClass.CLIENT_ERROR, FailureClass.QUOTA_EXHAUSTED):
                self.health.failure(provider.name, exc.failure, exc.retry_after)
            raise
        return Answered(result, provider, reservation, shaped.trimmed)

    async def _attempt(
        self, provider: ProviderConfig, body: dict[str, Any], call: Call[T], walk_deadline: float
    ) -> tuple[T, Reservation | None]:
        """One provider, with its optional retries, never past the walk's budget.
        Each call is admitted by the quota on its own; when a retry is not
        admitted, the visit ends with the failure that called for it."""
        adapter = self.adapters[provider.name]
        loop = asyncio.get_running_loop()
        failed: ProviderError | None = None
        for retry in range(provider.retries + 1):
            deadline = min(loop.time() + provider.timeout.total, walk_deadline)
            if deadline <= loop.time():
                raise failed or ProviderError(FailureClass.TIMEOUT, "route time budget spent")
            try:
                reservation = await self.quota.admit(provider, body)
            except ProviderError as refused:
                if failed is None:
                    raise
                raise failed from refused
            try:
                return await call(adapter, provider, body, deadline), reservation
            except ProviderError as exc:
                uncertain = exc.message if maybe_received(exc) else None
                self._unreserve(reservation, exc.failure, sent=not never_sent(exc), uncertain=uncertain)
                if retry >= provider.retries or exc.failure not in RETRYABLE:
                    raise
                failed = exc
            except asyncio.CancelledError:  # lost a hedge race, or the client went away
                self._unreserve(reservation, FailureClass.CONNECTION_ERROR, sent=True, uncertain="cancelled")
                raise
            delay = backoff(retry, failed.retry_after, self._rng)
            if loop.time() + delay >= walk_deadline:
                raise failed
            await self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _unreserve(
        self, reservation: Reservation | None, failure: FailureClass, *, sent: bool, uncertain: str | None = None
    ) -> None:
        """A call that failed: its tokens go back; its request only if it was never
        sent. A call the upstream may or may not have received stays counted, and
        is reported (`quota_uncertain`), so that the counters can be reconciled."""
        if reservation is None:
            return
        self.background.spawn(self.quota.settle(reservation, None, failure, sent=sent, uncertain=uncertain))

    async def aclose(self) -> None:
        await self.background.drain(timeout=2.0)


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _for_stream(provider: ProviderConfig, body: dict[str, Any]) -> dict[str, Any]:
    """A token quota needs the real usage of streams too: ask for it (the
    relay hides the usage chunk from a client that did not)."""
    if provider.quota is None or provider.quota.tokens_per_day is None or _wants_usage(body):
        return body
    options = body.get("stream_options")
    return {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


def _limits(provider: ProviderConfig, deadline: float, max_bytes: int) -> Limits:
    remaining = max(0.001, deadline - asyncio.get_running_loop().time())
    return Limits(connect=min(provider.timeout.connect, remaining), read=remaining, max_bytes=max_bytes)


async def _first_token(
    adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float, max_bytes: int
) -> StreamStart:
    """Open a stream and hold its chunks until the first real token (or a clean
    empty end); any failure before that is the provider's and stays invisible."""
    loop = asyncio.get_running_loop()
    first_deadline = min(loop.time() + provider.timeout.first_token, deadline)
    limits = Limits(
        connect=min(provider.timeout.connect, first_deadline - loop.time()),
        read=provider.timeout.idle,
        max_bytes=max_bytes,
    )
    stream = adapter.stream(body, limits)
    head: list[Chunk] = []
    started = False
    first = Deadline()  # as `asyncio.timeout_at`, for a fraction of its cost
    try:
        first.enter(first_deadline)
        while (chunk := await anext(stream, None)) is not None:
            head.append(chunk)
            if chunk.has_content or chunk.finish_reason is not None:
                break
        started = True
    except asyncio.CancelledError:
        if not first.expired():
            raise
        raise ProviderError(FailureClass.TIMEOUT, f"no first token within {provider.timeout.first_token:g}s") from None
    finally:
        first.close()
        if not started:  # failed, timed out or cancelled: close the upstream now
            await _close(stream)
    more = bool(head) and head[-1].more
    return StreamStart(head=head, rest=stream, provider=provider, deadline=deadline, _more=more)


async def _close(stream: AsyncIterator[Chunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
