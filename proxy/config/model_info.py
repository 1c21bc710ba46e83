"""What a model may be asked for, from what litellm's model map says it lacks
(`model_limits.LACKING`): a provider whose config does not declare `capabilities`
gets these, so a request that needs vision, tools or structured outputs skips a
model known to lack them instead of failing there."""

from __future__ import annotations

from typing import Final

from proxy.config.model_limits import LACKING

CAPABILITY_FLAGS: Final = {
    "vision": "supports_vision",
    "tools": "supports_function_calling",
    "json_schema": "supports_response_schema",
}
_ALL: Final = frozenset(CAPABILITY_FLAGS)


def known_capabilities(prefix: str, model: str) -> frozenset[str] | None:
    """The capabilities a model may be asked for; None when nothing is known to be
    missing (no restriction)."""
    lacking = LACKING.get(f"{prefix}/{model}") or LACKING.get(model)
    return None if lacking is None else _ALL - frozenset(lacking)
