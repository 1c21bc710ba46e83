"""`stream: true` over today's chat stream: the bytes `relay.client_stream` writes
(continuation across providers included) re-encoded as Responses events.

A stop-gap with no edits to the relay: the stream module that replaces it will
feed `ResponsesStream` directly.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import orjson

from proxy.relay import SSEDecoder
from proxy.responses.events import ResponsesStream

DONE = b"[DONE]"


async def responses_events(chat: AsyncGenerator[bytes, None], encoder: ResponsesStream) -> AsyncGenerator[bytes, None]:
    """The Responses events for one chat SSE stream: `response.created` goes out
    with the first chunk's events, `[DONE]` becomes `response.completed`, an
    in-band error event `response.failed`. Closing this closes the chat stream."""
    decoder = SSEDecoder()
    pending = encoder.opening()
    try:
        async for data in chat:
            out = [pending, *(_event(payload, encoder) for _event_name, payload in decoder.feed(data))]
            pending = b""
            if joined := b"".join(out):
                yield joined
    finally:
        await chat.aclose()


def _event(payload: bytes, encoder: ResponsesStream) -> bytes:
    if payload == DONE:
        return encoder.completed()
    chunk = orjson.loads(payload)
    error = chunk.get("error") if isinstance(chunk, dict) else None
    if isinstance(error, dict):
        return encoder.failed(str(error.get("code") or "server_error"), str(error.get("message") or "stream failed"))
    return encoder.feed(chunk)
