"""The soak's clients, and what counts as a good answer.

Every request ends as one of:
  * `complete`: the stream ended with `data: [DONE]` and its text is one
    provider's whole reply, or (mid-stream continuation) the first words of one
    or more providers' replies followed by the whole reply of the last one;
  * `error`: a clean OpenAI error, an HTTP 4xx/5xx with an OpenAI error body,
    or an in-band `{"error": {...}}` event followed by `[DONE]`;
  * `violation`: anything else (no end within the client's deadline, a stream
    cut without `[DONE]`, malformed events, garbled text, a non-OpenAI error body,
    an `internal_error` from the proxy).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

WORDS = 12
TAGS = {"flaky-a": "A", "flaky-b": "B", "small": "S", "anchor": "Z"}
REPLIES = {name: " ".join(f"{tag}{i}" for i in range(WORDS)) for name, tag in TAGS.items()}
_BY_TAG = {tag: name for name, tag in TAGS.items()}
_WORD = re.compile(r"\s*([A-Z])(\d+)")

# (weight, route, stream): what the clients ask for.
MIX: list[tuple[float, str, bool]] = [
    (0.55, "default", True),
    (0.15, "hedged", True),
    (0.10, "edges", True),
    (0.05, "small", True),  # one quota'd provider alone: quota_exhausted shows up as a clean 503
    (0.10, "default", False),
    (0.05, "anchor", False),
]


@dataclass
class Result:
    route: str
    stream: bool
    outcome: str  # complete | error | violation
    detail: str  # who answered (complete), the error code (error), or what went wrong (violation)
    seconds: float
    status: int = 0
    continued: bool = False
    request_id: str = ""
    at: float = 0.0  # when it was sent (monotonic)
    sent: float = 0.0  # when it was sent (wall clock, to compare with the proxy's log)
    headers: float | None = None  # when the response headers arrived (monotonic), if they did
    written: float | None = None  # when the request was on the wire (wall clock): the client's queueing before it


def chain_of(text: str, *, finished: bool = True) -> list[str] | None:
    """The providers whose replies make up `text`, if it is a valid answer: each
    provider at most once, each part the first words of its reply, the last part
    the whole reply (unless not `finished`). None when the text is anything else."""
    parts: list[tuple[str, int]] = []  # (tag, words)
    for match in _WORD.finditer(text):
        tag, index = match.group(1), int(match.group(2))
        if parts and parts[-1][0] == tag and index == parts[-1][1]:
            parts[-1] = (tag, index + 1)
        elif index == 0 and tag in _BY_TAG and tag not in (t for t, _ in parts):
            parts.append((tag, 1))
        else:
            return None
    if not parts or (finished and parts[-1][1] != WORDS):
        return None if finished else []
    rebuilt = "".join(" ".join(REPLIES[_BY_TAG[tag]].split()[:words]) for tag, words in parts)
    return [_BY_TAG[tag] for tag, _ in parts] if rebuilt == text else None


def openai_error_code(body: Any) -> str | None:
    """`error.code` (or `error.type`) of an OpenAI error body; None if it is not one."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error.get("type"):
        return None
    return str(error.get("code") or error["type"])


class Violation(Exception):
    pass


async def _read_stream(response: httpx.Response) -> tuple[str, str | None]:
    """(text, in-band error code or None); raises Violation for a bad stream."""
    text: list[str] = []
    error: str | None = None
    done = False
    try:
        async for line in response.aiter_lines():
            if not line or line.startswith(":"):
                continue
            if not line.startswith("data: ") or done:
                raise Violation(f"unexpected line {'after [DONE] ' if done else ''}{line[:80]!r}")
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            if error is not None:
                raise Violation("an event after the in-band error")
            try:
                event = json.loads(data)
            except ValueError:
                raise Violation(f"malformed event {data[:80]!r}") from None
            if isinstance(event, dict) and "error" in event:
                error = openai_error_code(event)
                if error is None:
                    raise Violation(f"in-band error that is not OpenAI-shaped: {data[:120]}")
                continue
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    except httpx.HTTPError as exc:
        raise Violation(f"stream cut: {type(exc).__name__}: {exc}") from None
    if not done:
        raise Violation("stream ended without data: [DONE]")
    return "".join(text), error


async def _error_result(response: httpx.Response, result: Result) -> Result:
    body = await response.aread()
    try:
        code = openai_error_code(json.loads(body))
    except ValueError:
        code = None
    if code is None:
        raise Violation(f"HTTP {response.status_code} without an OpenAI error body: {body[:120]!r}")
    if code == "internal_error":
        raise Violation(f"HTTP {response.status_code} internal_error (an unexpected exception in the proxy)")
    result.outcome, result.detail = "error", f"{response.status_code} {code}"
    return result


async def one_request(http: httpx.AsyncClient, route: str, stream: bool, prompt: str, result: Result) -> Result:
    body: dict[str, Any] = {"model": route, "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    headers = {"x-request-id": result.request_id}

    async def trace(name: str, info: dict[str, Any]) -> None:
        if name == "http11.send_request_body.complete":
            result.written = time.time()

    extensions = {"trace": trace}
    async with http.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers, extensions=extensions
    ) as response:
        result.status, result.headers = response.status_code, time.monotonic()
        if response.status_code != 200:
            return await _error_result(response, result)
        provider = response.headers.get("x-proxy-provider")
        if not stream:
            answer = json.loads(await response.aread())
            text = answer["choices"][0]["message"]["content"]
            if chain_of(text) != [provider]:
                raise Violation(f"non-stream answer {text[:60]!r} is not {provider}'s reply")
            result.outcome, result.detail = "complete", str(provider)
            return result
        text, error = await _read_stream(response)
        if error is not None:
            if chain_of(text, finished=False) is None:
                raise Violation(f"garbled text before the in-band error: {text[:80]!r}")
            result.outcome, result.detail = "error", f"in-band {error}"
            return result
        chain = chain_of(text)
        if chain is None or chain[0] != provider:
            raise Violation(f"garbled answer (x-proxy-provider {provider}): {text[:100]!r}")
        result.outcome, result.detail, result.continued = "complete", chain[-1], len(chain) > 1
        return result


async def client_loop(
    connect: Callable[[], httpx.AsyncClient],
    number: int,
    end: float,
    deadline: float,
    rng: random.Random,
    results: list[Result],
) -> None:
    """One user: its own client, requests one after another until `end`, each of
    which must end within `deadline` seconds."""
    async with connect() as http:
        await _requests(http, number, end, deadline, rng, results)


async def _requests(
    http: httpx.AsyncClient, number: int, end: float, deadline: float, rng: random.Random, results: list[Result]
) -> None:
    weights = [w for w, _, _ in MIX]
    sent = 0
    while time.monotonic() < end:
        _, route, stream = rng.choices(MIX, weights)[0]
        prompt = f"soak client {number} request {sent}: " + "tell me something. " * rng.randint(1, 20)
        result = Result(
            route,
            stream,
            "violation",
            "",
            0.0,
            request_id=f"soak-{number}-{sent}",
            at=time.monotonic(),
            sent=time.time(),
        )
        try:
            async with asyncio.timeout(deadline):
                await one_request(http, route, stream, prompt, result)
        except TimeoutError:
            result.detail = f"hang: no end within {deadline:g}s"
        except Violation as exc:
            result.detail = str(exc)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            result.detail = f"{type(exc).__name__}: {exc}"[:200]
        result.seconds = time.monotonic() - result.at
        results.append(result)
        sent += 1
        await asyncio.sleep(rng.uniform(0, 0.05))


async def watch_lag(lags: list[tuple[float, float]], every: float = 0.05) -> None:
    """This process's own event-loop lag (until cancelled): a request's time as the
    clients measure it includes it, so a stalled load generator shows up here."""
    while True:
        asked = time.monotonic()
        await asyncio.sleep(every)
        lags.append((asked, time.monotonic() - asked - every))
