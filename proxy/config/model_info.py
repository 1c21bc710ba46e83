"""What litellm's model map knows of a model's capabilities, read from the JSON
file litellm ships (`model_prices_and_context_window_backup.json`) without
importing litellm: a provider whose config does not declare `capabilities`
gets the ones the map states, so a request that needs vision, tools or
structured outputs skips a model known to lack them instead of failing there."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Final

import orjson

_FLAGS: Final = {
    "vision": "supports_vision",
    "tools": "supports_function_calling",
    "json_schema": "supports_response_schema",
}


@functools.cache
def _model_map() -> Mapping[str, Any]:
    """litellm's packaged model map (parsed once per process), or empty when absent."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return {}
    path = os.path.join(os.path.dirname(spec.origin), "model_prices_and_context_window_backup.json")
    try:
        with open(path, "rb") as file:
            parsed = orjson.loads(file.read())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def known_capabilities(prefix: str, model: str) -> frozenset[str] | None:
    """The capabilities a model may be asked for: those the map says it has or
    does not state; None when the map says nothing of any (no restriction)."""
    models = _model_map()
    info = models.get(f"{prefix}/{model}") or models.get(model)
    if not isinstance(info, dict):
        return None
    stated = {name: info.get(flag) for name, flag in _FLAGS.items()}
    if all(value is None for value in stated.values()):
        return None
    return frozenset(name for name, value in stated.items() if value is not False)
