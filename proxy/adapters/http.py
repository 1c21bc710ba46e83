"""The upstream HTTP plumbing every adapter shares, on the app's aiohttp session:
per-attempt timeouts, a provider's connection slots, bodies read under the size
cap, connections returned to the pool only when read to their end, and one whole
exchange with its failure classified.

The session's pool itself has no limit: a wait inside aiohttp's pool would be
timed by its `connect` timeout and look like the provider's own slowness. A
provider's `max_connections` is kept here instead (`ConnectionSlots`), where a
wait has its own bound (`timeout.pool`) and, when it runs out, its own class:
`proxy_saturated`, the proxy's limit, never the provider's failure.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.adapters import classify
from proxy.adapters.base import AttemptLimits
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError

# What a failed connection or exchange raises (a reset socket can surface as a bare OSError).
TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)
USER_AGENT: Final = "fallback-proxy"


# A request that fails this way before its answer's head, on a connection taken
# from the pool, met a connection the server had just closed (its keep-alive
# timeout, e.g. uvicorn's and vLLM's 5 s against our 30 s); `ClientConnectorError`
# (a new connection that could not be made) is not one of them.
_STALE_ERRORS: Final = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# Whether the request the current task sent last went out on a pooled connection.
_REUSED: ContextVar[bool] = ContextVar("fallback_proxy_reused_connection", default=False)
_SERVED: Final = "_fallback_proxy_served"  # set on a connection's protocol once it carried a request


class PooledConnector(aiohttp.TCPConnector):
    """aiohttp's TCP pool, noting for each request (in `_REUSED`, for `_send`)
    whether its connection was kept alive from an earlier one: a connection's
    protocol object is marked when it is first handed out."""

    async def connect(self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        reused = getattr(protocol, _SERVED, False)
        _REUSED.set(reused)
        if not reused:
            setattr(protocol, _SERVED, True)
        return connection


async def _send(session: aiohttp.ClientSession, method: str, url: str | URL, **request: Any) -> aiohttp.ClientResponse:
    """`session.request`, sent once more when a pooled connection turned out to
    be closed by the server before any answer (the race with its keep-alive
    timeout): that is not the provider's failure, so nothing sees one (no
    fallback, no breaker, none of the provider's `retries` spent). The second
    send goes out on another connection (the closed one has left the pool), and
    its failure is the provider's. A server that read the call and then crashed
    without answering gets it twice, as it would from the openai SDK or OkHttp."""
    reused = _REUSED.set(False)
    try:
        try:
            return await session.request(method, url, **request)
        except _STALE_ERRORS as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) or not _REUSED.get():
                raise
        return await session.request(method, url, **request)
    finally:
        _REUSED.reset(reused)  # the task's context as it was: nothing of this held by a long stream


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole 2xx/3xx answer to a small request."""

    status: int
    headers: CIMultiDictProxy[str]
    content: bytes


class ConnectionSlots:
    """At most `provider.max_connections` calls in flight to one provider (a
    stream holds its slot to its end). A call that finds them all busy waits
    its turn, first come first served, for at most `timeout.pool` seconds, then
    gives up with `proxy_saturated`: the walk goes on to the next provider and
    this one's health is untouched."""

    __slots__ = ("_gate", "busy", "limit", "provider", "wait")

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        self.limit = provider.max_connections
        self.wait = provider.timeout.pool
        self.busy = 0
        self._gate = asyncio.Semaphore(self.limit)

    def __repr__(self) -> str:
        return f"ConnectionSlots({self.provider.name!r}, {self.busy}/{self.limit} busy)"

    @classmethod
    def of(cls, provider: ProviderConfig) -> ConnectionSlots | None:
        """The provider's slots; None when it has no limit (nothing to count)."""
        return cls(provider) if provider.max_connections > 0 else None

    async def take(self, limits: AttemptLimits) -> None:
        """One slot, or `proxy_saturated` once the wait is over."""
        gate = self._gate
        if not gate.locked():
            await gate.acquire()  # a free slot: taken without waiting
            self.busy += 1
            return
        wait = self.wait_for(limits)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(wait):
                await gate.acquire()
        except TimeoutError:
            raise classify.no_connection_slot(self.limit, time.perf_counter() - started) from None
        self.busy += 1

    def wait_for(self, limits: AttemptLimits) -> float:
        """The pool wait, shortened for an attempt with less time left than its
        connect timeout (the caller's deadline must not end the wait: it would
        count as the provider's timeout), so that half the rest is left to connect."""
        if limits.connect < self.provider.timeout.connect:
            return min(self.wait, limits.connect / 2)
        return self.wait

    def give(self) -> None:
        self.busy -= 1
        self._gate.release()


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    headers: dict[str, str] | aiohttp.typedefs.LooseHeaders,
    data: bytes | None,
    limits: AttemptLimits,
    slots: ConnectionSlots | None = None,
) -> Fetched:
    """Send one request and read its answer whole, under `limits` (and within
    the provider's connection `slots`); a transport failure or a status of 400
    and above is raised as a classified ProviderError."""
    if slots is not None:
        await slots.take(limits)
    try:
        response = await _send(session, method, url, data=data, headers=headers, timeout=attempt_timeout(limits))
        try:
            content = await read_capped(response, limits.max_bytes)
        finally:
            done_with(response)
    except TRANSPORT_ERRORS as exc:
        raise classify.from_exception(exc) from exc
    finally:
        if slots is not None:
            slots.give()
    if response.status >= 400:
        raise classify.from_status(response.status, content, response.headers)
    return Fetched(response.status, response.headers, content)


async def open_stream(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    headers: dict[str, str] | aiohttp.typedefs.LooseHeaders,
    data: bytes,
    limits: AttemptLimits,
    silence: Silence,
    slots: ConnectionSlots | None,
) -> aiohttp.ClientResponse:
    """A stream's answer, up to its head: sent within one of the provider's
    `slots` (given back here only if the request fails: a stream holds its slot
    to its end), its head awaited within `silence.head()`; a transport failure
    is raised classified."""
    if slots is not None:
        await slots.take(limits)
    try:
        async with silence.head():
            return await _send(session, "POST", url, data=data, headers=headers, timeout=stream_timeout(limits))
    except BaseException as exc:
        if slots is not None:
            slots.give()
        if isinstance(exc, TRANSPORT_ERRORS):
            raise classify.from_exception(exc) from exc
        raise


async def stream_error(response: aiohttp.ClientResponse, limits: AttemptLimits, silence: Silence) -> ProviderError:
    """A stream's error answer (a status of 400 and above), read under the size
    cap within `silence.head()`, classified."""
    async with silence.head():
        content = await read_capped(response, limits.max_bytes)
    return classify.from_status(response.status, content, response.headers)


def attempt_timeout(limits: AttemptLimits) -> aiohttp.ClientTimeout:
    # The session's pool has no limit, so `connect` is name resolution and the
    # connection itself, never a wait for a pooled one (that is `ConnectionSlots`).
    return aiohttp.ClientTimeout(total=None, connect=limits.connect, sock_connect=limits.connect, sock_read=limits.read)


def stream_timeout(limits: AttemptLimits) -> aiohttp.ClientTimeout:
    """A stream's timeouts in aiohttp: the connect timeout only. Its read limit
    is kept by `Silence` instead: aiohttp's `sock_read` cancels and re-arms a
    timer for every packet received, several percent of a long stream's CPU."""
    return aiohttp.ClientTimeout(total=None, connect=limits.connect, sock_connect=limits.connect)


_SLACK: Final = 0.001  # timers may fire this early (uvloop's clock counts milliseconds)


class Silence:
    """`AttemptLimits.read` for a stream: the longest the stream may wait for data,
    read by read. What `sock_read` does, with one timer per silence instead of
    one per packet: `expect()` before each read only notes a time; the timer,
    armed once, moves itself on when it fires early, and when a read has really
    waited too long it fails the read as `sock_read` does (`SocketTimeoutError`,
    a `timeout`). The wait for the answer's head is bounded with `head()`."""

    __slots__ = ("_content", "_handle", "_loop", "_until", "_waiting", "seconds")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._content: aiohttp.StreamReader | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._until = math.inf
        self._waiting = False

    def head(self) -> asyncio.Timeout:
        """A bound on the wait for the answer's head (or an error answer's body)."""
        return asyncio.timeout(self.seconds)

    def expect(self, content: aiohttp.StreamReader) -> None:
        """The next read of `content` may wait at most `seconds` from now."""
        if self.seconds is None:
            return
        self._content = content
        self._until = self._loop.time() + self.seconds
        self._waiting = True
        if self._handle is None:
            self._handle = self._loop.call_at(self._until, self._fire)

    def got(self) -> None:
        self._waiting = False

    def close(self) -> None:
        self._waiting = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self._waiting:
            return  # between reads: the next `expect` arms the timer again
        if self._loop.time() + _SLACK < self._until:
            self._handle = self._loop.call_at(self._until, self._fire)  # data came since it was armed
            return
        assert self._content is not None
        self._content.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))


def done_with(response: aiohttp.ClientResponse) -> None:
    """Back to the pool only when the body was read to its end; otherwise the
    connection is closed (what is left of the body must never reach the next request)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, or a `server_error` as soon as it passes `max_bytes`."""
    length = response.content_length
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)
    content = response.content
    first = await content.readany()
    size = len(first)
    if size > max_bytes:
        raise too_large(max_bytes)
    if not first or content.at_eof():
        return first
    parts = [first]
    while part := await content.readany():
        size += len(part)
        if size > max_bytes:
            raise too_large(max_bytes)
        parts.append(part)
    return b"".join(parts)


def too_large(max_bytes: int) -> ProviderError:
    return ProviderError(
        FailureClass.SERVER_ERROR, f"the answer is larger than limits.max_upstream_bytes ({max_bytes})"
    )
