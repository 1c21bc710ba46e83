"""Relay to any server that speaks OpenAI's chat-completions wire format.

OpenAI, Together, Groq, vLLM, Ollama's `/v1`, LM Studio and friends. The
request is re-encoded only to put the upstream model name in; answers are
passed through as the upstream's bytes, read once to learn what the stream
needs (content seen, finish, usage: most content chunks by their learnt
shape, `shape.py`, the others parsed with orjson) and never re-encoded. A
stream event that cannot be read is skipped (and counted), not a failure; a
server that ignores `stream: true` and answers one JSON body is read as a
stream of that one answer.

This is the hot path: it calls aiohttp directly (no httpx layer), and a
stream goes from socket bytes to `Chunk`s in one generator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Final

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from proxy.adapters import classify
from proxy.adapters.base import AdapterHooks, AttemptLimits, Chunk, Completion, Embeddings, Usage, describe, with_trace
from proxy.adapters.http import (
    TRANSPORT_ERRORS,
    USER_AGENT,
    ConnectionSlots,
    Silence,
    done_with,
    fetch,
    open_stream,
    read_capped,
    stream_error,
    too_large,
)
from proxy.adapters.shape import ContentShape
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.sse import Event, SSEDecoder, SSEPayloads

# How long and how much to read after `[DONE]` to reach the end of the body.
_DRAIN_SECONDS: Final = 1.0
_DRAIN_BYTES: Final = 65536
# A non-stream answer, after its first read, is read when its body ends (or fails)
# or this often, whichever comes first: one wakeup for many tokens, not one per token.
_POLL_SECONDS: Final = 0.1
# A poll that brought this much reads again at once (the client's buffer pauses the socket at 128 KiB).
_POLL_AGAIN_BYTES: Final = 65536


class OpenAICompatAdapter:
    """Adapter for OpenAI-compatible upstreams over the app's pooled aiohttp session."""

    def __init__(
        self, provider: ProviderConfig, session: aiohttp.ClientSession, hooks: AdapterHooks | None = None
    ) -> None:
        if not provider.api_base:
            raise ValueError(f"provider {provider.name!r} needs an api_base")
        self.provider = provider
        self._session = session
        self._hooks = hooks or AdapterHooks()
        base = provider.api_base.rstrip("/")
        self._url = URL(base + "/chat/completions")
        self._models_url = URL(base + "/models")
        self._embeddings_url = URL(base + "/embeddings")
        headers = {"content-type": "application/json", "accept": "application/json", "user-agent": USER_AGENT}
        if provider.api_key:
            headers["authorization"] = f"Bearer {provider.api_key}"
        headers.update(provider.headers)
        self._headers = CIMultiDict(headers)
        self._stream_headers = CIMultiDict({**headers, "accept": "text/event-stream"})
        self._draining: set[asyncio.Task[None]] = set()
        self._slots = ConnectionSlots.of(provider)

    def __repr__(self) -> str:
        return f"OpenAICompatAdapter({self.provider.name!r}, {str(self._url)!r})"

    def _encode(self, body: dict[str, Any], stream: bool) -> bytes:
        upstream = dict(body)
        upstream["model"] = self.provider.upstream_model
        upstream["stream"] = stream
        if not stream:
            upstream.pop("stream_options", None)
        return orjson.dumps(upstream)

    async def complete(self, body: dict[str, Any], limits: AttemptLimits) -> Completion:
        answer = await fetch(
            self._session,
            "POST",
            self._url,
            headers=with_trace(self._headers),
            data=self._encode(body, False),
            limits=limits,
            slots=self._slots,
        )
        return _completion(answer.content)

    async def embed(self, body: dict[str, Any], limits: AttemptLimits) -> Embeddings:
        """Relayed as the client sent it (`input` token arrays included), under this provider's model name."""
        upstream = {**body, "model": self.provider.upstream_model}
        answer = await fetch(
            self._session,
            "POST",
            self._embeddings_url,
            headers=with_trace(self._headers),
            data=orjson.dumps(upstream),
            limits=limits,
            slots=self._slots,
        )
        return embeddings_answer(answer.content)

    async def stream(self, body: dict[str, Any], limits: AttemptLimits) -> AsyncIterator[Chunk]:
        """Socket bytes → SSE events → `Chunk`s, in this one generator. Closing it
        early closes the upstream connection (never pooled mid-body). The stream
        holds one of the provider's connection slots (if it has a limit) to its end;
        each read waits at most `limits.read` (`Silence`)."""
        response, silence = await self._open(body, limits)
        done = False
        try:
            whole = await self._whole_answer(response, limits, silence)
            if whole is not None:
                for chunk in whole:
                    yield chunk
                return
            decoder = SSEDecoder()
            shape = ContentShape()
            content = response.content
            max_bytes = limits.max_bytes
            size = 0
            finished = False
            while True:
                silence.expect(content)
                data = await content.readany()
                silence.got()
                if not data:
                    break
                size += len(data)
                if size > max_bytes:
                    raise too_large(max_bytes)
                chunks, done, failed = self._chunks(decoder.feed(data), shape)
                del data
                for chunk in chunks:
                    finished = finished or chunk.finish_reason is not None
                    yield chunk
                    del chunk  # nothing sent is held while the next read waits (memory per open stream)
                del chunks
                if failed is not None:
                    raise failed
                if done:
                    return
            chunks, done, failed = self._chunks(decoder.flush(), shape)
            for chunk in chunks:
                finished = finished or chunk.finish_reason is not None
                yield chunk
            if failed is not None:
                raise failed
            if not (finished or done):
                raise classify.incomplete_stream()
        except TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        finally:
            self._release(response, silence, done)

    async def parsed_reads(
        self, body: dict[str, Any], limits: AttemptLimits
    ) -> AsyncGenerator[list[dict[str, Any] | str], bool | None]:
        """The answer's chunks as parsed dicts, read by read, for a non-stream
        request (no `Chunk` per event; a chunk of the stream's learnt shape is
        given as its text, `ContentShape`). The wire is handled as `stream`
        handles it; an in-band error raises at once, an end with neither a
        finish nor `[DONE]` is `incomplete`. Once the caller has its first token (it sends
        True) the body is read when it ends or fails or every `_POLL_SECONDS`
        (`_polled`), not token by token; only reads that brought something are
        yielded, so the caller's idle deadline still sees a stall (a poll late)."""
        response, silence = await self._open(body, limits)
        done = False
        try:
            whole = await self._whole_answer(response, limits, silence)
            if whole is not None:
                yield [chunk.parsed() for chunk in whole]
                return
            payloads = SSEPayloads()
            shape = ContentShape()
            content = response.content
            max_bytes = limits.max_bytes
            size = 0
            finished = False
            started = polled = False
            while True:
                silence.expect(content)
                data = await _polled(content) if polled else await content.readany()
                silence.got()
                if not data:
                    if content.at_eof():
                        break
                    continue  # nothing came in this poll
                size += len(data)
                if size > max_bytes:
                    raise too_large(max_bytes)
                read, done, ends = self._parsed(payloads.feed(data), shape)
                finished = finished or ends
                if read:
                    started = bool((yield read)) or started
                if done:
                    return
                polled = started and len(data) < _POLL_AGAIN_BYTES
            read, done, ends = self._parsed(payloads.flush(), shape)
            if read:
                yield read
            if not (finished or ends or done):
                raise classify.incomplete_stream()
        except TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        finally:
            self._release(response, silence, done)

    async def _open(self, body: dict[str, Any], limits: AttemptLimits) -> tuple[aiohttp.ClientResponse, Silence]:
        """The request sent as a stream and its answer's head (a connection slot taken)."""
        silence = Silence(limits.read)
        response = await open_stream(
            self._session,
            self._url,
            headers=with_trace(self._stream_headers),
            data=self._encode(body, True),
            limits=limits,
            silence=silence,
            slots=self._slots,
        )
        return response, silence

    async def _whole_answer(
        self, response: aiohttp.ClientResponse, limits: AttemptLimits, silence: Silence
    ) -> list[Chunk] | None:
        """The head of a streamed answer: an error status raises (classified);
        a server that ignored `stream: true` and answered one JSON body gives
        that answer as the chunks of a stream; None: an SSE stream follows."""
        if response.status >= 400:
            raise await stream_error(response, limits, silence)
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            return None
        async with silence.head():
            whole = await read_capped(response, limits.max_bytes)
        return _chunks_of_answer(whole, content_type)

    def _release(self, response: aiohttp.ClientResponse, silence: Silence, done: bool) -> None:
        """The end of a streamed answer, however it ended: its connection back to
        the pool when read to its end (after `[DONE]`, its end is waited for in
        the background), else closed; its connection slot given back."""
        silence.close()
        if done and not response.content.at_eof():
            self._finish_later(response)
        else:
            done_with(response)
        if self._slots is not None:
            self._slots.give()

    def _parsed(self, payloads: list[bytes], shape: ContentShape) -> tuple[list[dict[str, Any] | str], bool, bool]:
        """The chunks of one upstream read, parsed (a chunk of the learnt `shape`:
        its text); whether `[DONE]` was among them; whether one carried a finish
        reason. A payload that cannot be read is skipped (and counted); an
        in-band error raises."""
        read: list[dict[str, Any] | str] = []
        finished = False
        for payload in payloads:
            if payload == b"[DONE]":
                return read, True, finished
            text = shape.text(payload)
            if text is not None:
                read.append(text)
                continue
            # `_parse`, inline: this runs for every chunk of every non-stream answer
            try:
                parsed = orjson.loads(payload)
            except orjson.JSONDecodeError:
                parsed = None
            if type(parsed) is not dict:
                self._hooks.malformed(self.provider.name, payload)
                continue
            if "error" in parsed:
                raise classify.from_stream_error(parsed)
            choices = parsed.get("choices")
            if choices is not None:
                if type(choices) is not list:
                    self._hooks.malformed(self.provider.name, payload)
                    continue
                if not finished:
                    for choice in choices:
                        if type(choice) is dict and type(choice.get("finish_reason")) is str:
                            finished = True
            read.append(parsed)
            shape.learn(payload, parsed)
        return read, False, finished

    def _chunks(self, events: list[Event], shape: ContentShape) -> tuple[list[Chunk], bool, ProviderError | None]:
        """The chunks of one upstream read, each but the last marked `more` (they go
        to the client as one write; the last too when `[DONE]` follows it in the
        same read); whether `[DONE]` was among them; and an in-band error that
        came after them (raised once they are out). A chunk of the stream's
        learnt `shape` is read without parsing it whole."""
        chunks: list[Chunk] = []
        for _event, payload in events:
            if payload == b"[DONE]":
                _mark_more(chunks, last=True)
                return chunks, True, None
            chunk = shape.read(payload)
            if chunk is not None:
                chunks.append(chunk)
                continue
            try:
                parsed = _parse(payload)
            except ProviderError as exc:
                _mark_more(chunks)
                return chunks, False, exc
            if parsed is None:
                self._hooks.malformed(self.provider.name, payload)
            else:
                chunks.append(describe(payload, parsed))
                shape.learn(payload, parsed)
        _mark_more(chunks)
        return chunks, False, None

    def _finish_later(self, response: aiohttp.ClientResponse) -> None:
        """After `[DONE]` the body's own end (the chunked terminator) is usually a
        packet behind: wait for it in the background, briefly, so the connection
        goes back to the pool instead of being closed (a new TLS handshake)."""
        task = asyncio.get_running_loop().create_task(_drain(response))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def warmup(self) -> None:
        """A local OpenAI-compatible server that is Ollama (`.../v1`): load the
        model and keep it resident through the native API (`keep_alive: -1`)."""
        base = self.provider.api_base or ""
        if not (self.provider.local and base.rstrip("/").endswith("/v1")):
            return
        native = URL(base.rstrip("/")[: -len("/v1")] + "/api/generate")
        payload = {"model": self.provider.upstream_model, "prompt": "", "keep_alive": -1}
        timeouts = self.provider.timeout
        limits = AttemptLimits(connect=timeouts.connect, read=timeouts.total)
        await self._call("POST", native, orjson.dumps(payload), limits)

    async def probe(self, limits: AttemptLimits) -> None:
        await self._call("GET", self._models_url, None, limits)

    async def _call(self, method: str, url: URL, data: bytes | None, limits: AttemptLimits) -> None:
        """A small request whose answer matters only by its status."""
        await fetch(self._session, method, url, headers=self._headers, data=data, limits=limits)


async def _polled(content: aiohttp.StreamReader) -> bytes:
    """What has come of a body, once it ended or failed or `_POLL_SECONDS` passed
    (b"": nothing yet, or the end). A failure of the connection is raised at once."""
    if not content.is_eof() and content.exception() is None:
        try:
            async with asyncio.timeout(_POLL_SECONDS):
                await content.wait_eof()
        except TimeoutError:
            pass
    return content.read_nowait()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what follows a finished answer, up to its end; what it says (or how
    it fails) no longer matters: only whether the connection can be reused."""
    content = response.content
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            size = 0
            while size <= _DRAIN_BYTES and (data := await content.readany()):
                size += len(data)
    except (*TRANSPORT_ERRORS, RuntimeError):  # RuntimeError: aiohttp's "Connection closed." (the session closed)
        pass  # the answer was already complete: closing the connection (below) is all there is to do
    finally:
        done_with(response)


def _mark_more(chunks: list[Chunk], *, last: bool = False) -> None:
    for chunk in chunks if last else chunks[:-1]:
        chunk.more = True


def _parse(payload: bytes) -> dict[str, Any] | None:
    """One event's chunk as a dict; None when it cannot be read (skipped): not
    JSON, not an object, `choices` not a list; an in-band error raises."""
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    if "error" in parsed:
        raise classify.from_stream_error(parsed)
    choices = parsed.get("choices")
    if choices is not None and type(choices) is not list:
        return None
    return parsed


def _chunks_of_answer(content: bytes, content_type: str) -> list[Chunk]:
    """A whole `chat.completion` given where a stream was asked for, as the chunks
    of a stream: one per choice with its message, then the usage."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
        raise ProviderError(
            FailureClass.SERVER_ERROR,
            f"asked for a stream, got {content_type or 'no content type'}: {content[:120]!r}",
        )
    if "error" in parsed:
        raise classify.from_stream_error(parsed)
    envelope = {key: parsed.get(key) for key in ("id", "created", "model", "system_fingerprint") if key in parsed}
    envelope["object"] = "chat.completion.chunk"
    chunks = []
    for choice in parsed["choices"]:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        delta = {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else {}
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls) if isinstance(call, dict)]
        part = {"index": choice.get("index", 0), "delta": delta, "finish_reason": choice.get("finish_reason")}
        if choice.get("logprobs") is not None:
            part["logprobs"] = choice["logprobs"]
        chunks.append(Chunk.from_dict({**envelope, "choices": [part]}))
    if isinstance(parsed.get("usage"), dict):
        chunks.append(Chunk.from_dict({**envelope, "choices": [], "usage": parsed["usage"]}))
    _mark_more(chunks)
    return chunks


def _completion(content: bytes) -> Completion:
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(FailureClass.SERVER_ERROR, "upstream answered 2xx with a body that is not JSON") from exc
    if not isinstance(parsed, dict) or "error" in parsed or not isinstance(parsed.get("choices"), list):
        raise classify.from_stream_error(parsed)
    model = parsed.get("model")
    return Completion(
        body=content, model=model if isinstance(model, str) else "", usage=Usage.from_openai(parsed.get("usage"))
    )


def embeddings_answer(content: bytes) -> Embeddings:
    """An OpenAI embeddings answer, checked for the shape the client will rely on."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(FailureClass.SERVER_ERROR, "upstream answered 2xx with a body that is not JSON") from exc
    if not isinstance(parsed, dict) or "error" in parsed:
        raise classify.from_stream_error(parsed)
    data = parsed.get("data")
    if not isinstance(data, list) or not all(
        isinstance(item, dict) and isinstance(item.get("embedding"), (list, str)) for item in data
    ):
        raise ProviderError(FailureClass.SERVER_ERROR, f"malformed embeddings answer: {content[:120]!r}")
    model = parsed.get("model")
    return Embeddings(
        data=parsed,
        model=model if isinstance(model, str) else "",
        usage=Usage.from_openai(parsed.get("usage")),
        raw=content,
    )
