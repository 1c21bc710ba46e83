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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.adapters.base import Adapter, Chunk, Completion, Limits
from proxy.config import Config, ProviderConfig, Route
from proxy.errors import AllProvidersFailed, FailureClass, ProviderError, UpstreamClientError
from proxy.observe import RequestRecord
from proxy.routing import next_node

T = TypeVar("T")

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

    async def next_chunk(self) -> Chunk | None:
        """The next chunk within the idle and total deadlines; None at the end."""
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + self.provider.timeout.idle, self.deadline)
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(self.rest, None)
        except TimeoutError:
            raise ProviderError(
                FailureClass.TIMEOUT, "stream stalled past the idle or total timeout", provider=self.provider.name
            ) from None
        except ProviderError as exc:
            exc.provider = self.provider.name
            raise

    async def close(self) -> None:
        await _close(self.rest)


def backoff(attempt: int, retry_after: float | None, rng: Callable[[], float]) -> float:
    """Full-jitter exponential backoff, at least what the provider asked for."""
    delay: float = rng() * min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)
    return max(delay, retry_after or 0.0)


def skip_reason(provider: ProviderConfig, route: Route) -> FailureClass | None:
    """Why a provider must not be called for this request, decided without I/O."""
    if route.local_only and not provider.local:
        return FailureClass.POLICY
    return None


class Dispatcher:
    """Walks routes for requests; one per app."""

    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, Adapter],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.adapters = adapters
        self._sleep = sleep
        self._rng = rng

    async def complete(self, route: Route, body: dict[str, Any], record: RequestRecord) -> Completion:
        async def call(adapter: Adapter, provider: ProviderConfig, deadline: float) -> Completion:
            limits = _limits(provider, deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    return await adapter.complete(body, limits)
            except TimeoutError:
                raise ProviderError(
                    FailureClass.TIMEOUT, f"no answer within {provider.timeout.total:g}s"
                ) from None

        completion = await self._walk(route, record, call)
        record.model = completion.model
        record.usage = completion.usage
        return completion

    async def open_stream(self, route: Route, body: dict[str, Any], record: RequestRecord) -> StreamStart:
        async def call(adapter: Adapter, provider: ProviderConfig, deadline: float) -> StreamStart:
            return await _first_token(adapter, provider, body, deadline)

        start = await self._walk(route, record, call)
        record.ttft_ms = record.elapsed_ms()
        for chunk in start.head:
            record.model = chunk.model or record.model
        return start

    async def _walk(
        self,
        route: Route,
        record: RequestRecord,
        call: Callable[[Adapter, ProviderConfig, float], Awaitable[T]],
    ) -> T:
        loop = asyncio.get_running_loop()
        walk_deadline = loop.time() + route.budget if route.budget else math.inf
        visited: list[str] = []
        node: str | None = route.first
        while node is not None:
            visited.append(node)
            provider = self.config.providers[node]
            started = loop.time()
            failure = skip_reason(provider, route)
            if failure is not None:
                record.attempt(node, failure.value, 0.0, "not called")
            else:
                try:
                    result = await self._attempt(provider, call, walk_deadline)
                except ProviderError as exc:
                    exc.provider = node
                    record.attempt(node, exc.failure.value, (loop.time() - started) * 1000, exc.message)
                    if exc.failure is FailureClass.CLIENT_ERROR:
                        raise UpstreamClientError(exc) from exc
                    failure = exc.failure
                else:
                    record.attempt(node, "ok", (loop.time() - started) * 1000)
                    record.provider = node
                    return result
            node = next_node(route, node, failure.value, visited=visited)
        raise AllProvidersFailed(route.name, record.attempts, local_only=route.local_only)

    async def _attempt(
        self,
        provider: ProviderConfig,
        call: Callable[[Adapter, ProviderConfig, float], Awaitable[T]],
        walk_deadline: float,
    ) -> T:
        """One provider, with its optional retries, never past the walk's budget."""
        adapter = self.adapters[provider.name]
        loop = asyncio.get_running_loop()
        for retry in range(provider.retries + 1):
            deadline = min(loop.time() + provider.timeout.total, walk_deadline)
            if deadline <= loop.time():
                raise ProviderError(FailureClass.TIMEOUT, "route time budget spent")
            try:
                return await call(adapter, provider, deadline)
            except ProviderError as exc:
                if retry >= provider.retries or exc.failure not in RETRYABLE:
                    raise
                delay = backoff(retry, exc.retry_after, self._rng)
                if loop.time() + delay >= walk_deadline:
                    raise
                await self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")


def _limits(provider: ProviderConfig, deadline: float) -> Limits:
    remaining = max(0.001, deadline - asyncio.get_running_loop().time())
    return Limits(connect=min(provider.timeout.connect, remaining), read=remaining)


async def _first_token(adapter: Adapter, provider: ProviderConfig, body: dict[str, Any], deadline: float) -> StreamStart:
    """Open a stream and hold its chunks until the first real token (or a clean
    empty end); any failure before that is the provider's and stays invisible."""
    loop = asyncio.get_running_loop()
    first_deadline = min(loop.time() + provider.timeout.first_token, deadline)
    limits = Limits(connect=min(provider.timeout.connect, first_deadline - loop.time()), read=provider.timeout.idle)
    stream = adapter.stream(body, limits)
    head: list[Chunk] = []
    try:
        async with asyncio.timeout_at(first_deadline):
            while (chunk := await anext(stream, None)) is not None:
                head.append(chunk)
                if chunk.has_content or chunk.finish_reason is not None:
                    break
    except TimeoutError:
        await _close(stream)
        raise ProviderError(
            FailureClass.TIMEOUT, f"no first token within {provider.timeout.first_token:g}s"
        ) from None
    except BaseException:
        await _close(stream)
        raise
    return StreamStart(head=head, rest=stream, provider=provider, deadline=deadline)


async def _close(stream: AsyncIterator[Chunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
