"""State and helpers shared by every fake provider: reply text, faults, request records, pauses."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import itertools
import json
import math
import re
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NoReturn

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive

from ._fault import Fault, FaultState

Handler = Callable[[Request, Any], Awaitable[Response]]
"""A provider endpoint: gets the request and its parsed JSON body (None when empty)."""

Check = Callable[[Request], Response | None]
"""A request check (auth, required headers): returns an error response, or None to go on."""


class AbortConnection(Exception):
    """Raised inside a handler or stream to drop the client connection without finishing the response."""


@dataclass(frozen=True)
class ReceivedRequest:
    """One request a fake received: method, path, query string, lowercased headers, parsed JSON body.

    ``body`` is the parsed JSON (a dict for API calls), or None when the body was empty or not JSON.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: str = ""


@dataclass(frozen=True)
class StreamPlan:
    """The already-encoded pieces of one streamed answer, in wire order."""

    preamble: Sequence[bytes]
    content: Sequence[bytes]
    epilogue: Sequence[bytes]
    error_event: bytes


def split_reply(reply: str, chunks: int | None) -> list[str]:
    """Split ``reply`` into stream pieces whose concatenation is ``reply``.

    ``chunks=None``: one piece per word, each word carrying its leading whitespace (trailing
    whitespace goes to the last piece). Otherwise exactly ``chunks`` pieces of near-equal length.
    """
    if chunks is None:
        pieces = re.findall(r"\s*\S+", reply)
        tail = reply[len("".join(pieces)) :]
        if tail and pieces:
            pieces[-1] += tail
        elif tail:
            pieces = [tail]
        return pieces
    count = max(1, chunks)
    bounds = [len(reply) * i // count for i in range(count + 1)]
    return [reply[start:end] for start, end in itertools.pairwise(bounds)]


CONTINUATIONS = ("continue", "restart", "restart_different", "reject_prefill")
MALFORMED_EVENT = b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": "cut\n\n'


def continuation_of(messages: Any) -> tuple[str, bool] | None:
    """`(partial answer, as a prefill)` when `messages` ask to continue a cut answer, else None."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return None
    last = messages[-1]
    if last.get("role") == "assistant":
        return text_of(last.get("content")), True
    asks = last.get("role") == "user" and "continue" in text_of(last.get("content")).lower()
    if asks and len(messages) >= 2 and messages[-2].get("role") == "assistant":
        return text_of(messages[-2].get("content")), False
    return None


def continued_reply(reply: str, partial: str, how: str) -> str:
    """What a model gives when asked to continue `partial` (`how`: a CONTINUATIONS value).
    `continue`: the rest of its reply after the partial (the whole reply when the
    partial is not its own); `restart`: the whole reply again; `restart_different`:
    the reply started over, the same first two words, then other words."""
    if how == "continue":
        for cut in (partial, partial.rstrip()):
            if cut and reply.startswith(cut):
                return reply[len(cut) :]
        return reply
    if how == "restart_different":
        words = reply.split(" ")
        return " ".join([*words[:2], *(f"other-{word}" for word in words[2:])])
    return reply


def text_of(content: Any) -> str:
    """The plain text of a message ``content`` (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(text_of(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def count_words(text: str) -> int:
    """A rough token count: the number of whitespace-separated words."""
    return len(text.split())


def prompt_words(messages: Any, system: Any = None) -> int:
    """Rough prompt token count over all message contents (plus an Anthropic-style ``system``)."""
    total = count_words(text_of(system))
    if isinstance(messages, list):
        total += sum(count_words(text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    return total


FAKE_DIMENSIONS = 16  # the length of a fake embedding unless `dimensions` asks for fewer


def fake_vector(model: str, text: str, dimensions: int | None = None) -> list[float]:
    """A deterministic unit vector for ``text`` under ``model``: two fakes serving the same model
    give the same vector (one embedding space); shortened to ``dimensions`` and scaled to unit
    length again, as OpenAI's ``dimensions`` does."""
    digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    size = min(dimensions or FAKE_DIMENSIONS, FAKE_DIMENSIONS)
    values = [(byte - 127.5) / 127.5 for byte in digest[:size]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def embedding_texts(value: Any) -> list[str] | None:
    """The texts of an OpenAI embeddings ``input`` (token arrays as their numbers joined), or None if malformed."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(isinstance(item, int) for item in value):
        return [",".join(map(str, value))]
    if all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in value):
        return [",".join(map(str, item)) for item in value]
    return None


def base64_vector(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def status_phrase(status: int) -> str:
    """The standard reason phrase of an HTTP status ("Error" for unknown codes)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def format_seconds(seconds: float) -> str:
    """A Retry-After value: whole seconds as an integer, otherwise the decimal number."""
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


def json_bytes(data: Any) -> bytes:
    """Compact JSON encoding, as the real APIs send it."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


async def wait_disconnect(receive: Receive) -> None:
    """Consume ASGI messages until the client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass


def tool_arguments(tool_schema: Any) -> dict[str, Any]:
    """Plausible arguments for a tool's JSON-schema parameters (one value per property)."""
    samples = {"string": "Paris", "integer": 3, "number": 1.5, "boolean": True, "array": [], "object": {}}
    properties = tool_schema.get("properties") if isinstance(tool_schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {
        name: samples.get(str(spec.get("type")) if isinstance(spec, dict) else "") for name, spec in properties.items()
    }


class FakeCore:
    """Everything a fake's endpoints share: identity, reply, model, key, fault state and records.

    The endpoints run on the server thread's event loop; tests read and change the state from
    other threads, so the mutable parts are guarded by locks.
    """

    def __init__(self, *, name: str, reply: str, chunks: int | None, model: str | None, api_key: str | None) -> None:
        self.name = name
        self.base_reply = reply
        self.continuation = "restart"  # how it answers a request to continue a cut answer: a CONTINUATIONS value
        self._answer: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"answer-{name}", default=None)
        self.chunks = chunks
        self.model = model
        self.api_key = api_key
        self.faults = FaultState()
        # Tools: when a request offers tools and has no tool result yet, call the first one;
        # after a tool result, the reply quotes it (so a test sees that it came back).
        self.call_tools = False
        self.stopping: asyncio.Event | None = None
        self._records: list[ReceivedRequest] = []
        self._records_lock = threading.Lock()

    # -- request records -------------------------------------------------------------------------

    @property
    def records(self) -> list[ReceivedRequest]:
        with self._records_lock:
            return list(self._records)

    def clear_records(self) -> None:
        with self._records_lock:
            self._records.clear()

    async def read_and_record(self, request: Request) -> tuple[Any, bool]:
        """Read, parse and record the request; returns (body or None, whether the body was valid)."""
        raw = await request.body()
        body: Any = None
        valid = True
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                valid = False
        record = ReceivedRequest(
            method=request.method,
            path=request.url.path,
            headers={key.lower(): value for key, value in request.headers.items()},
            body=body,
            query=request.url.query,
        )
        with self._records_lock:
            self._records.append(record)
        return body, valid

    # -- answers ---------------------------------------------------------------------------------

    @property
    def reply(self) -> str:
        """The text of the answer being given (set per request by `begin`), else the fake's reply."""
        answer = self._answer.get()
        return self.base_reply if answer is None else answer

    def begin(self, messages: Any) -> bool:
        """Decide what this request is answered with, as a model would: a request to
        continue a cut answer (a trailing assistant message, a prefill; or an
        assistant message then a user message asking to continue) gets what
        `continuation` says. False when the request must be refused (a prefill,
        under ``reject_prefill``)."""
        cut = continuation_of(messages)
        text = self.base_reply
        if cut is not None:
            partial, prefill = cut
            if prefill and self.continuation == "reject_prefill":
                return False
            text = continued_reply(self.base_reply, partial, self.continuation)
        self._answer.set(text)
        return True

    def pieces(self) -> list[str]:
        return split_reply(self.reply, self.chunks)

    def response_model(self, requested: Any, default: str) -> str:
        """The model to report: the constructor's ``model``, else the requested one, else ``default``."""
        if self.model:
            return self.model
        return requested if isinstance(requested, str) and requested else default

    def route(
        self, path: str, handler: Handler, methods: list[str], checks: Sequence[Check], bad_json: Callable[[], Response]
    ) -> Route:
        """A Starlette route that records the request, runs ``checks``, then calls ``handler``."""

        async def endpoint(request: Request) -> Response:
            body, valid = await self.read_and_record(request)
            for check in checks:
                denied = check(request)
                if denied is not None:
                    return denied
            if not valid:
                return bad_json()
            return await handler(request, body)

        return Route(path, endpoint, methods=methods)

    # -- fault helpers ---------------------------------------------------------------------------

    def take_fault(self) -> Fault:
        return self.faults.take()

    def _stop_event(self) -> asyncio.Event:
        if self.stopping is None:
            self.stopping = asyncio.Event()
        return self.stopping

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``; if the server stops meanwhile, drop the connection instead."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._stop_event().wait(), timeout=seconds)
        except TimeoutError:
            return
        raise AbortConnection

    async def hang(self, request: Request) -> NoReturn:
        """Never answer: wait until the client disconnects or the server stops, then drop the connection."""
        waiters = [
            asyncio.ensure_future(wait_disconnect(request.receive)),
            asyncio.ensure_future(self._stop_event().wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        raise AbortConnection

    async def stall(self) -> NoReturn:
        """Stop sending with the connection left open, until the server stops."""
        await self._stop_event().wait()
        raise AbortConnection

    async def open_answer(
        self, request: Request, stream: bool, fault_error: Callable[[Fault], Response]
    ) -> tuple[Fault, Response | None]:
        """Take this request's fault and apply what happens before any byte of the answer.

        Returns the fault (for :meth:`stream`) and, for error faults, the error response to send
        instead of the answer. Hangs, pauses or drops the connection as the fault says.
        """
        fault = self.take_fault()
        if fault.kind == "status":
            return fault, fault_error(fault)
        if fault.kind == "stream_error" and not stream:
            return fault, fault_error(Fault("status", status=500))
        await self._before_answer(fault, request, stream)
        return fault, None

    async def _before_answer(self, fault: Fault, request: Request, stream: bool) -> None:
        if fault.kind == "hang":
            await self.hang(request)
        if not stream and fault.kind == "slow":
            await self.pause(fault.first_token_delay)
        if not stream and fault.kind == "die_midstream":
            raise AbortConnection
        if not stream and fault.kind == "stall":
            await self.hang(request)

    async def stream(self, fault: Fault, plan: StreamPlan) -> AsyncIterator[bytes]:
        """Yield ``plan`` with ``fault`` applied (slow pacing, in-band error, or abrupt death)."""
        for event in plan.preamble:
            yield event
        broken = fault.kind in ("stream_error", "die_midstream", "stall")
        content = plan.content[: fault.after_chunks] if broken else plan.content
        for index, chunk in enumerate(content):
            if fault.kind == "slow":
                await self.pause(fault.first_token_delay if index == 0 else fault.token_delay)
            if fault.kind == "malformed" and index == fault.after_chunks:
                yield MALFORMED_EVENT
            yield chunk
        if fault.kind == "stream_error":
            yield plan.error_event
            return
        if fault.kind == "die_midstream":
            raise AbortConnection
        if fault.kind == "stall":
            await self.stall()
        for event in plan.epilogue:
            yield event
