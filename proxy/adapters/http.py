"""The upstream HTTP plumbing every adapter shares, on the app's aiohttp session:
per-attempt timeouts, bodies read under the size cap, connections returned to
the pool only when read to their end, and one whole exchange with its failure
classified."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.adapters import classify
from proxy.adapters.base import Limits
from proxy.errors import FailureClass, ProviderError

# What a failed connection or exchange raises (a reset socket can surface as a bare OSError).
TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)
USER_AGENT: Final = "fallback-proxy"


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole 2xx/3xx answer to a small request."""

    status: int
    headers: CIMultiDictProxy[str]
    content: bytes


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    headers: dict[str, str] | aiohttp.typedefs.LooseHeaders,
    data: bytes | None,
    limits: Limits,
) -> Fetched:
    """Send one request and read its answer whole, under `limits`; a transport
    failure or a status of 400 and above is raised as a classified ProviderError."""
    try:
        response = await session.request(method, url, data=data, headers=headers, timeout=attempt_timeout(limits))
        try:
            content = await read_capped(response, limits.max_bytes)
        finally:
            done_with(response)
    except TRANSPORT_ERRORS as exc:
        raise classify.from_exception(exc) from exc
    if response.status >= 400:
        raise classify.from_status(response.status, content, response.headers)
    return Fetched(response.status, response.headers, content)


def attempt_timeout(limits: Limits) -> aiohttp.ClientTimeout:
    # `connect` also bounds the wait for a free connection of the pool.
    return aiohttp.ClientTimeout(total=None, connect=limits.connect, sock_connect=limits.connect, sock_read=limits.read)


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
    if not first or content.at_eof():
        if len(first) > max_bytes:
            raise too_large(max_bytes)
        return first
    parts = [first]
    size = len(first)
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
