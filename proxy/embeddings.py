"""`POST /v1/embeddings` around the same walk as chat, never mixing vector spaces.

Vectors are only comparable with vectors of the same model: a fallback to a
provider of another space would silently corrupt a client's index. So the
route's first provider fixes the request's space (its `embedding_space`, or its
model string), and `shaping.eligibility` skips every provider of another space
(`unsupported`, naming both). When none of that space can answer, the 503 says so.

The answer is the client's shape whatever the provider gave: floats or base64
(`encoding_format`; OpenAI's SDK asks for base64 unless told otherwise), and
vectors no longer than `dimensions` (shortened and scaled to unit length again,
as OpenAI does for the models that take `dimensions`). An OpenAI-format
answer that is already right is sent on as the provider's bytes.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from typing import Any

import orjson

from proxy.adapters.base import Embeddings
from proxy.config import Config, Route
from proxy.errors import AllProvidersFailed, Attempt
from proxy.intake import token_input
from proxy.shaping import Needs, needs_of

SPACE_SKIP = "embedding space"  # how a skip for another space starts its detail (see shaping)


class NoProviderInSpace(AllProvidersFailed):
    """Every provider of the request's vector space failed or was skipped; the
    providers of other spaces were not tried, on purpose."""

    def __init__(self, route: str, space: str, attempts: Sequence[Attempt]) -> None:
        super().__init__(route, attempts)
        parts = [f"{a.provider}: {a.outcome}" + (f" ({a.detail})" if a.detail else "") for a in attempts]
        self.message = (
            f"No provider of embedding space '{space}' could answer on route '{route}' "
            f"(providers of other spaces are never used for embeddings): {'; '.join(parts)}."
        )


def embedding_needs(config: Config, route: Route, payload: dict[str, Any], local_only: str | None) -> Needs:
    """What the request needs: the space of the route's first provider, and
    whether `input` is token ids; privacy as for chat."""
    base = needs_of({}, local_only)
    space = config.providers[route.first].space
    return Needs(local_only=base.local_only, embedding_space=space, token_input=token_input(payload["input"]))


def in_space(error: AllProvidersFailed, space: str, route: str) -> AllProvidersFailed:
    """The 503 for a walk that ended: it names the space when a provider of another space was passed over."""
    if any(a.detail.startswith(SPACE_SKIP) for a in error.attempts):
        return NoProviderInSpace(route, space, error.attempts)
    return error


def answer_body(embeddings: Embeddings, payload: dict[str, Any]) -> bytes:
    """The JSON sent to the client: the provider's own bytes when they already
    say what the client asked for, else the answer converted."""
    wanted = payload.get("encoding_format") or "float"
    dimensions = payload.get("dimensions")
    data = embeddings.data
    items: list[dict[str, Any]] = data["data"]
    if embeddings.raw is not None and all(_fits(item["embedding"], wanted, dimensions) for item in items):
        return embeddings.raw
    out = [
        {
            "object": "embedding",
            "index": item.get("index", index),
            "embedding": _encoded(_shortened(_floats(item["embedding"]), dimensions), wanted),
        }
        for index, item in enumerate(items)
    ]
    prompt = embeddings.usage.prompt_tokens if embeddings.usage is not None else 0
    body = {
        "object": "list",
        "data": out,
        "model": embeddings.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    return orjson.dumps(body)


def _fits(vector: object, wanted: str, dimensions: object) -> bool:
    if wanted == "base64":
        return isinstance(vector, str) and (
            not isinstance(dimensions, int) or len(base64.b64decode(vector)) <= 4 * dimensions
        )
    return isinstance(vector, list) and (not isinstance(dimensions, int) or len(vector) <= dimensions)


def _floats(vector: object) -> list[float]:
    """A vector as floats, from a list or from OpenAI's base64 (little-endian float32)."""
    if isinstance(vector, str):
        raw = base64.b64decode(vector)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if isinstance(vector, list):
        return [float(value) for value in vector]
    # The adapters let only lists and base64 strings through (openai_compat.embeddings_answer, embed.openai_list).
    raise TypeError(
        f"an embedding must be a list of numbers or base64, got {type(vector).__name__}"
    )  # pragma: no cover


def to_base64(vector: Sequence[float]) -> str:
    """OpenAI's base64 encoding of a vector: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _encoded(vector: list[float], wanted: str) -> list[float] | str:
    return to_base64(vector) if wanted == "base64" else vector


def _shortened(vector: list[float], dimensions: object) -> list[float]:
    """The first `dimensions` values scaled back to unit length, as OpenAI's
    `dimensions` does; a vector already short enough is left as it is."""
    if not isinstance(dimensions, int) or len(vector) <= dimensions:
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in head))
    return [value / norm for value in head] if norm > 0 else head
