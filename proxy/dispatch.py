"""The attempt loop: walk a route's graph, call each provider under its
deadlines, retry fast transient failures within the route's budget, follow the
edge for each failure, and try breaker-skipped nodes as a last resort.

Every call is streamed upstream. `complete` (a non-stream client) reads each
provider's stream whole and assembles the body, so the first-token and idle
deadlines bound it as they bound streams, and a provider that fails half-way
is replaced before the client has seen a byte. `open_stream` walks to a first
token and hands the live stream to its `StreamSession` (`proxy.stream`), which
owns it from there and asks here again for whoever continues it.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from prometheus_client import CollectorRegistry

from proxy.adapters import classify
from proxy.adapters.base import Adapter, AttemptLimits, Chunk, Completion, Embeddings, Usage
from proxy.background import Background
from proxy.config import Config, ProviderConfig, Route
from proxy.deadline import Deadline
from proxy.errors import AllProvidersFailed, FailureClass, ProviderError, UpstreamClientError
from proxy.health import Decision, Health, HealthBoard
from proxy.metrics import Metrics
from proxy.observe import RequestRecord
from proxy.quota import QuotaGate, Reservation, maybe_received, never_sent
from proxy.routing import Walk, next_node
from proxy.shaping import Needs, Shaper, eligibility
from proxy.stream.assemble import Assembler
from proxy.stream.live import LiveStream, collect, first_token
from proxy.stream.splice import INSTRUCTION, continuation_body

T = TypeVar("T")
Whole = TypeVar("Whole", Completion, Embeddings)  # an answer read whole
Call = Callable[[Adapter, ProviderConfig, dict[str, Any], float], Awaitable[T]]

# Fast, transient failures worth a retry on the same provider. A timeout is
# silence: the next node is tried at once rather than waiting out the same
# deadline again.
RETRYABLE: Final = frozenset({FailureClass.CONNECTION_ERROR, FailureClass.RATE_LIMITED, FailureClass.SERVER_ERROR})
SHORT_RETRY_AFTER: Final = 5.0  # a 429 asking to wait longer than this goes to the next node instead
BACKOFF_BASE: Final = 0.25
BACKOFF_CAP: Final = 4.0
LAST_RESORT: Final = "last resort: every other node failed, so this breaker-skipped one was tried anyway"


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
        """A non-stream answer: each provider's stream read whole under its deadlines
        (or, for `stream_upstream: false`, one plain call under its total deadline)."""
        max_bytes = self.config.limits.max_upstream_bytes

        async def call(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> Completion:
            if provider.stream_upstream:
                return await _collect(adapter, provider, body, deadline, max_bytes)
            limits = _limits(provider, deadline, max_bytes)
            timer = Deadline()  # as `asyncio.timeout_at`, for a fraction of its cost
            timer.enter(deadline)
            try:
                return await adapter.complete(body, limits)
            except asyncio.CancelledError:
                if not timer.expired():
                    raise
                raise ProviderError(FailureClass.TIMEOUT, f"no answer within {provider.timeout.total:g}s") from None
            finally:
                timer.close()

        return self._settled(await self._walk(route, body, needs, record, call, Walk(route)), record)

    async def embed(self, route: Route, body: dict[str, Any], needs: Needs, record: RequestRecord) -> Embeddings:
        """An embeddings request along the route: the same walk as `complete`;
        `needs.embedding_space` keeps it within one vector space. The whole answer
        is its first token: `first_token` bounds it (within `total`)."""

        async def call(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> Embeddings:
            deadline = min(deadline, asyncio.get_running_loop().time() + provider.timeout.first_token)
            limits = _limits(provider, deadline, self.config.limits.max_upstream_bytes)
            try:
                async with asyncio.timeout_at(deadline):
                    return await adapter.embed(body, limits)
            except TimeoutError:
                raise ProviderError(
                    FailureClass.TIMEOUT, f"no answer within {provider.timeout.first_token:g}s"
                ) from None

        return self._settled(await self._walk(route, body, needs, record, call, Walk(route)), record)

    async def open_stream(
        self,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        record: RequestRecord,
        walk: Walk,
        *,
        continue_from: tuple[str, int] | None = None,
    ) -> LiveStream:
        """Walk on from `walk.current` to a provider's first token. With
        `continue_from` (the text the client has, and about how many tokens it
        took), each provider is asked to continue it in the form it takes; a
        provider that refuses that request is passed over, never the client's error."""
        max_bytes = self.config.limits.max_upstream_bytes

        async def call(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> LiveStream:
            if continue_from is None:
                return await first_token(adapter, provider, _for_stream(provider, body), deadline, max_bytes)
            return await _continue_on(adapter, provider, body, continue_from, deadline, max_bytes)

        started = time.perf_counter()
        answered = await self._walk(route, body, needs, record, call, walk)
        live = answered.result
        live.reservation = answered.reservation
        live.hide_usage = not _wants_usage(body)
        self.health.success(answered.provider.name, ttft=time.perf_counter() - started)
        for chunk in live.head:
            record.model = chunk.model or record.model
        return live

    def stream_ended(self, live: LiveStream, usage: Usage | None, failure: ProviderError | None) -> None:
        """Account for one provider's stream once it is over: a failure after the
        first token counts against its health; usage settles its quota."""
        if live.trace is not None:
            trace, live.trace = live.trace, None
            trace.on_stream_end(usage, failure)
        if failure is not None:
            self.health.failure(live.provider.name, failure.failure, failure.retry_after)
        if live.reservation is not None:
            reservation, live.reservation = live.reservation, None
            self.background.spawn(self.quota.settle(reservation, usage, None))

    async def _walk(
        self,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        record: RequestRecord,
        call: Call[T],
        walk: Walk,
    ) -> Answered[T]:
        loop = asyncio.get_running_loop()
        walk_deadline = loop.time() + route.budget if route.budget else math.inf
        skipped: list[str] = []  # passed over for an open breaker: the last resort
        if record.trace is not None:  # each provider call becomes an attempt span
            call = record.trace.traced(call)
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
                record.attempt(node, exc.failure.value, (loop.time() - started) * 1000, exc.message, exc.cause)
                if record.trace is not None:  # skips and the fallback reason
                    record.trace.on_visit_failed(node, exc)
                if _returned_to_client(route, node, exc):
                    raise UpstreamClientError(exc) from exc
                if exc.failure is FailureClass.UNHEALTHY and not self.health.view(node).disabled:
                    skipped.append(node)
                walk.follow(exc.failure.value)
            else:
                return self._answered(record, node, answered, loop.time() - started)
        for node in skipped:
            answered_late = await self._last_resort(node, route, body, needs, record, call, walk_deadline)
            if answered_late is not None:
                return answered_late
        raise AllProvidersFailed(route.name, record.attempts, local_only=route.local_only or needs.local_only)

    def _settled(self, answered: Answered[Whole], record: RequestRecord) -> Whole:
        """A whole answer's end: the provider healthy, its quota settled from the
        answer's usage, the record told the model and usage."""
        result = answered.result
        self.health.success(answered.provider.name)
        if answered.reservation is not None:
            self.background.spawn(self.quota.settle(answered.reservation, result.usage, None))
        record.model = result.model
        record.usage = result.usage
        return result

    def _answered(self, record: RequestRecord, node: str, answered: Answered[T], seconds: float) -> Answered[T]:
        record.attempt(node, "ok", seconds * 1000)
        record.provider = node
        record.trimmed = answered.trimmed
        return answered

    async def _last_resort(
        self,
        node: str,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        record: RequestRecord,
        call: Call[T],
        walk_deadline: float,
    ) -> Answered[T] | None:
        """Nothing answered and `node` was skipped for its open breaker: try it
        anyway, as a half-open trial, while the route's budget lasts."""
        loop = asyncio.get_running_loop()
        if loop.time() >= walk_deadline or self.health.view(node).disabled:
            return None
        started = loop.time()
        record.last_resort = node
        try:
            answered = await self._visit(
                self.config.providers[node], route, body, needs, call, walk_deadline, trial=True
            )
        except ProviderError as exc:
            exc.provider = node
            detail = f"{LAST_RESORT}; {exc.message}"
            record.attempt(node, exc.failure.value, (loop.time() - started) * 1000, detail, exc.cause)
            if exc.failure is FailureClass.CLIENT_ERROR:
                raise UpstreamClientError(exc) from exc
            return None
        return self._answered(record, node, answered, loop.time() - started)

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
                        record.attempt(
                            node, error.failure.value, (loop.time() - started) * 1000, error.message, error.cause
                        )
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
        if isinstance(answered.result, LiveStream):
            await answered.result.close()
            if answered.result.trace is not None:  # the hedge that lost: its span ends
                answered.result.trace.on_stream_end(None, None)
        self.background.spawn(self.quota.settle(answered.reservation, None, FailureClass.CONNECTION_ERROR))

    async def _visit(
        self,
        provider: ProviderConfig,
        route: Route,
        body: dict[str, Any],
        needs: Needs,
        call: Call[T],
        walk_deadline: float,
        *,
        trial: bool = False,
    ) -> Answered[T]:
        """One node of the walk: skip it (policy, capability, breaker, context,
        quota) or call it with the request shaped for it. `trial`: call it
        whatever its breaker says (a last resort)."""
        skip = eligibility(provider, route, needs)
        if skip is not None:
            raise skip
        if not trial and self.health.decide(provider.name) is Decision.SKIP:
            health = self.health.view(provider.name)
            raise ProviderError(FailureClass.UNHEALTHY, f"breaker open ({health.reason}); not called")
        shaped = await self.shaper.shape(provider, body)
        try:
            result, reservation = await self._attempt(provider, shaped.body, call, walk_deadline)
        except ProviderError as exc:
            if exc.failure in (FailureClass.CLIENT_ERROR, FailureClass.QUOTA_EXHAUSTED):
                raise
            lag = self.health.failure(provider.name, exc.failure, exc.retry_after)
            if lag is not None:
                raise classify.lagged(exc, lag) from exc
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
                uncertain = (exc.cause or exc.message) if maybe_received(exc) else None
                self._unreserve(reservation, exc.failure, sent=not never_sent(exc), uncertain=uncertain)
                if retry >= provider.retries or not _retryable(exc):
                    raise
                failed = exc
            except asyncio.CancelledError:  # lost a hedge race, or the client went away
                self._unreserve(reservation, FailureClass.CONNECTION_ERROR, sent=True, uncertain="cancelled")
                raise
            delay = backoff(retry, failed.retry_after, self._rng)
            if loop.time() + delay >= walk_deadline:
                raise failed
            await self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover - for mypy: no fall-through

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


def _retryable(error: ProviderError) -> bool:
    """A fast, transient failure: a 429 only when it asks for a short wait."""
    if error.failure not in RETRYABLE:
        return False
    return error.failure is not FailureClass.RATE_LIMITED or (error.retry_after or 0.0) <= SHORT_RETRY_AFTER


def _returned_to_client(route: Route, node: str, error: ProviderError) -> bool:
    """A plain client error would fail anywhere; a content filter's refusal goes
    back too, unless the route opts in to falling back on it (an explicit
    `content_filtered` edge, or `fallback_on_content_filter`)."""
    if error.failure is FailureClass.CLIENT_ERROR:
        return True
    if error.failure is not FailureClass.CONTENT_FILTERED or route.fallback_on_content_filter:
        return False
    return FailureClass.CONTENT_FILTERED.value not in route.edges.get(node, {})


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _for_stream(provider: ProviderConfig, body: dict[str, Any], *, usage: bool = False) -> dict[str, Any]:
    """A token quota needs the real usage of streams too, and so does a body
    assembled for a non-stream client: ask for it (the session hides the usage
    chunk from a stream client that did not)."""
    wanted = usage or (provider.quota is not None and provider.quota.tokens_per_day is not None)
    if not wanted or _wants_usage(body):
        return body
    options = body.get("stream_options")
    return {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


def _limits(provider: ProviderConfig, deadline: float, max_bytes: int) -> AttemptLimits:
    remaining = max(0.001, deadline - asyncio.get_running_loop().time())
    return AttemptLimits(connect=min(provider.timeout.connect, remaining), read=remaining, max_bytes=max_bytes)


async def _collect(
    adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float, max_bytes: int
) -> Completion:
    """A provider's whole answer, streamed under its first-token, idle and total deadlines."""
    asked = {key: value for key, value in body.items() if key != "stream_options"}
    parsed_reads = getattr(adapter, "parsed_reads", None)  # an OpenAI-format upstream: no `Chunk` per event
    if parsed_reads is not None:
        return await collect(parsed_reads, provider, _for_stream(provider, asked, usage=True), deadline, max_bytes)
    live = await first_token(adapter, provider, _for_stream(provider, asked, usage=True), deadline, max_bytes)
    assembler = Assembler()
    try:
        read: list[Chunk] | None = live.take_head()
        while read is not None:
            for chunk in read:
                assembler.add(chunk)
            read = await live.next_read()
    finally:
        await live.close()
    return assembler.completion()


async def _continue_on(
    adapter: Adapter,
    provider: ProviderConfig,
    body: dict[str, Any],
    continue_from: tuple[str, int],
    deadline: float,
    max_bytes: int,
) -> LiveStream:
    """Ask `provider` for the rest of the answer, in the form it takes. A refused
    prefill is asked again as an instruction; a refused instruction passes the
    provider over (`unsupported`): the client's request was fine the first time."""
    sent, produced = continue_from
    form = provider.continue_with
    for attempt_form in dict.fromkeys((form, INSTRUCTION)):
        asked = _for_stream(provider, continuation_body(body, sent, attempt_form, produced))
        try:
            return await first_token(adapter, provider, asked, deadline, max_bytes)
        except ProviderError as exc:
            if exc.failure is not FailureClass.CLIENT_ERROR:
                raise
            refused = exc
    raise ProviderError(
        FailureClass.UNSUPPORTED, f"refused the request to continue the answer: {refused.message}", sent=True
    ) from refused
