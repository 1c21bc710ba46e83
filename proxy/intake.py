"""Reading and checking what a client sends, before any routing: its key,
the body within its size limit, and the chat-completions request's shape.
Every problem becomes an OpenAI-shaped 4xx."""

from __future__ import annotations

import hashlib
import hmac
from itertools import chain
from typing import Any

import orjson
from starlette.requests import Request

from proxy.errors import AuthenticationFailed, HeadersTooLarge, InvalidRequest, PayloadTooLarge

MAX_DEPTH = 100  # orjson writes at most 254 levels back; real requests use a handful


def _too_deep(value: object, budget: int) -> bool:
    if budget <= 0:
        return True
    if isinstance(value, dict):
        return any(_too_deep(v, budget - 1) for v in value.values())
    if isinstance(value, list):
        return any(_too_deep(v, budget - 1) for v in value)
    return False


def _nested_too_deep(body: bytes, payload: object) -> bool:
    """Fewer brackets than the limit cannot nest past it: most bodies are never walked."""
    return body.count(b"[") + body.count(b"{") >= MAX_DEPTH and _too_deep(payload, MAX_DEPTH)


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit`. Read
    from the ASGI messages directly: Starlette's `stream()` is an async
    generator, and each one costs the event loop's finaliser bookkeeping."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(limit)
    receive = request.receive
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # `http.disconnect`
            raise InvalidRequest("The client went away before sending the whole body.")
        part: bytes = message.get("body", b"")
        if part:
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(limit)
            parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def header(request: Request, name: bytes) -> str | None:
    """The value of the request's first header called `name` (lower case, as
    ASGI gives names), or None: one pass over the raw headers, where a missing
    name costs Starlette's `Headers.get` a raised and caught KeyError."""
    for key, value in request.scope["headers"]:
        if key == name:
            value_text: str = value.decode("latin-1")
            return value_text
    return None


def check_headers(request: Request, limit: int) -> None:
    """Refuse requests whose headers add up to more than `limit` bytes (431)."""
    if sum(map(len, chain.from_iterable(request.scope["headers"]))) > limit:
        raise HeadersTooLarge(limit)


def parse_chat_request(body: bytes, max_messages: int = 2000) -> dict[str, Any]:
    """Parse and check a chat-completions body; OpenAI-shaped 400s otherwise."""
    payload = _with_model(body, "chat completions request")
    _check_messages(payload.get("messages"), max_messages)
    _check_stream(payload)
    return payload


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on `input` items per request
ENCODING_FORMATS = frozenset({"float", "base64"})


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    """The body as a JSON object with a `model`, within the nesting limit; OpenAI-shaped 400s otherwise."""
    payload = _with_model(body, what)
    _check_stream(payload)
    return payload


def _with_model(body: bytes, what: str) -> dict[str, Any]:
    """The body as a JSON object within the nesting limit, naming a `model`."""
    if not body:
        raise InvalidRequest(f"The request body is empty; send a JSON {what}.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _nested_too_deep(body, payload):
        raise InvalidRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter (a route or provider name).", param="model")
    return payload


def _check_stream(payload: dict[str, Any]) -> None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")


def parse_embeddings_request(body: bytes) -> dict[str, Any]:
    """Parse and check an embeddings body: `input` as a string, a list of strings,
    a token array or a list of token arrays; `encoding_format`, `dimensions`, `user`."""
    payload = parse_json_object(body, "embeddings request")
    _check_embedding_input(payload.get("input"))
    encoding = payload.get("encoding_format")
    if encoding is not None and encoding not in ENCODING_FORMATS:
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise InvalidRequest("'dimensions' must be a positive integer.", param="dimensions")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string.", param="user")
    return payload


def token_input(value: object) -> bool:
    """True when an (already checked) embeddings `input` is token ids, not text."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], str)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) and v >= 0 for v in value)


def _check_embedding_input(value: object) -> None:
    shapes = "a non-empty string, a list of strings, a token array or a list of token arrays"
    if value is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    if isinstance(value, str):
        if not value:
            raise InvalidRequest(f"'input' must be {shapes}; got an empty string.", param="input")
        return
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"'input' must be {shapes}.", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"'input' has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} per request.", param="input"
        )
    first = value[0]
    if isinstance(first, str):
        valid = all(isinstance(item, str) and item for item in value)
    elif isinstance(first, list):
        valid = all(_is_tokens(item) for item in value)
    else:
        valid = _is_tokens(value)
    if not valid:
        raise InvalidRequest(f"'input' must be {shapes} (no empty items, no mixing).", param="input")


def _check_messages(messages: object, max_messages: int) -> None:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of message objects.", param="messages")
    if len(messages) > max_messages:
        raise InvalidRequest(
            f"'messages' has {len(messages)} entries; this proxy accepts at most {max_messages}.",
            param="messages",
            code="too_many_messages",
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}; got {role!r}.", param=f"{where}.role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(f"'{where}.content' must be a string or an array of parts.", param=f"{where}.content")


def key_digest(key: str) -> bytes:
    """The SHA-256 digest a configured key stands for (it may be given hashed)."""
    if key.startswith("sha256:"):
        return bytes.fromhex(key[len("sha256:") :])
    return hashlib.sha256(key.encode()).digest()


def credentials(authorization: str | None) -> tuple[str, str]:
    """An `Authorization` header's scheme and its credentials, stripped
    (`Bearer sk-1` → `("Bearer", "sk-1")`); empty strings for what is missing."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme, token.strip()


def authenticate(request: Request, digests: tuple[bytes, ...], *, admin: bool = False) -> None:
    """Check the bearer key against the configured keys' SHA-256 digests, in
    constant time whichever key it is; no keys configured means open."""
    if not digests:
        return
    scheme, token = credentials(header(request, b"authorization"))
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Missing bearer key: send 'Authorization: Bearer <key>'.")
    candidate = hashlib.sha256(token.encode()).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(candidate, digest)
    if not matched:
        raise AuthenticationFailed("Incorrect admin key provided." if admin else "Incorrect API key provided.")
