"""What the client's wire format makes of a stream: the `Encoder` protocol, and
the chat-completions encoder (`data:` events, an in-band error, `[DONE]`).

The session decides which chunks reach the client and when the stream ends;
an encoder only turns those decisions into bytes. The Responses API brings
its own encoder (events named `response.*`, no `[DONE]`).
"""

from __future__ import annotations

from typing import Protocol

import orjson

from proxy.adapters.base import Chunk, Usage
from proxy.errors import ProviderError, error_body
from proxy.sse import DONE, format_comment, format_event


class Encoder(Protocol):
    """Bytes for the client, from the session's decisions."""

    final: bytes | None
    """What the last write of a finished stream ends with (one send saved), or None."""

    def opening(self) -> bytes:
        """Sent with the first chunks (the Responses API's `response.created`)."""
        ...

    def chunk(self, chunk: Chunk, continuing: bool) -> bytes:
        """One upstream chunk for the client; `continuing`: it comes from a provider
        that took over mid-stream."""
        ...

    def finished(self, usage: Usage | None, providers: list[str]) -> bytes:
        """The end of a stream that ended well."""
        ...

    def failed(self, failure: ProviderError, providers: list[str]) -> bytes:
        """The in-band end of a stream no provider could finish."""
        ...

    def shutting_down(self) -> bytes:
        """The end of a stream the server cut at the end of its shutdown grace period."""
        ...

    def broken(self) -> bytes:
        """The end of a stream a bug of the proxy's cut (logged with its traceback)."""
        ...


def interrupted_message(failure: ProviderError) -> str:
    return (
        f"The provider '{failure.provider}' failed mid-stream ({failure.failure.value}): "
        f"{failure.message}. The answer above is incomplete."
    )


SHUTDOWN_MESSAGE = "The proxy is shutting down and cut this stream before its end; send the request again."
BROKEN_MESSAGE = "The proxy hit an internal error and cut this stream before its end; the answer above is incomplete."


class ChatEncoder:
    """`chat.completion.chunk` events as the provider wrote them; a continuing
    provider's chunks under the stream's own `id` and `created`."""

    __slots__ = ("_identity",)

    final: bytes | None = DONE

    def __init__(self) -> None:
        self._identity: tuple[object, object] | None = None

    def opening(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk, continuing: bool) -> bytes:
        if self._identity is None:
            first = chunk.parsed()
            self._identity = (first.get("id"), first.get("created"))
        if not continuing:
            return b"data: " + chunk.payload + b"\n\n"  # `format_event`, inline: once per chunk of every stream
        data = dict(chunk.parsed())
        data["id"], data["created"] = self._identity
        return format_event(orjson.dumps(data))

    def finished(self, usage: Usage | None, providers: list[str]) -> bytes:
        return _continued_comment(providers) + DONE

    def failed(self, failure: ProviderError, providers: list[str]) -> bytes:
        error = error_body(interrupted_message(failure), "server_error", "stream_interrupted")
        return format_event(error) + _continued_comment(providers) + DONE

    def shutting_down(self) -> bytes:
        return format_event(error_body(SHUTDOWN_MESSAGE, "server_error", "server_shutting_down")) + DONE

    def broken(self) -> bytes:
        return format_event(error_body(BROKEN_MESSAGE, "server_error", "internal_error")) + DONE


def _continued_comment(providers: list[str]) -> bytes:
    """An SSE comment (ignored by OpenAI clients) naming who answered, for operators."""
    if len(providers) < 2:
        return b""
    return format_comment(f"fallback-proxy continued this stream across providers: {','.join(providers)}")
