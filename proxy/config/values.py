"""The validation toolkit: a context that collects problems by key path, and converters."""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar
from urllib.parse import urlsplit

from proxy.config.model import ConfigError
from proxy.config.source import interpolate, redact_url

T = TypeVar("T")


@dataclass(slots=True)
class Context:
    """Problems and warnings collected during one parse."""

    environ: Mapping[str, str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or 'config'}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")


class BadValue(ValueError):
    """A value of the wrong type or out of range; the message says what was expected."""


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind_of(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping" if isinstance(value, Mapping) else type(value).__name__


def unknown(kind: str, name: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    if close:
        return f"unknown {kind} {name!r} (did you mean {close[0]!r}?)"
    if choices and len(choices) <= 12:
        return f"unknown {kind} {name!r} (expected one of: {', '.join(sorted(choices))})"
    return f"unknown {kind} {name!r}"


def read_section(node: object, path: str, ctx: Context, allowed: Collection[str] | None) -> dict[str, object] | None:
    """``node`` as a mapping with string keys (null reads as empty), or None after an error.

    With ``allowed``, other keys are reported with a suggestion and left out.
    """
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        ctx.error(path, f"expected a mapping, got {kind_of(node)}")
        return None
    out: dict[str, object] = {}
    for key, value in node.items():
        if key is True and allowed is not None and "on" in allowed:
            key = "on"  # data from yaml.safe_load, which reads the key `on` as True
        if not isinstance(key, str):
            ctx.error(path, f"key {key!r} must be a string")
        elif allowed is not None and key not in allowed:
            ctx.error(path, unknown("key", key, allowed))
        else:
            out[key] = value
    return out


def read_items(node: object, path: str, ctx: Context) -> list[tuple[str, object]]:
    """``node``'s items, each with its path; null reads as empty."""
    if node is None:
        return []
    if not isinstance(node, list):
        ctx.error(path, f"expected a list, got {kind_of(node)}")
        return []
    return [(f"{path}[{index}]", item) for index, item in enumerate(node)]


def _expand(raw: object, path: str, ctx: Context) -> object | None:
    """``raw`` with strings interpolated; None after an error."""
    if not isinstance(raw, str):
        return raw
    try:
        return interpolate(raw, ctx.environ, path)
    except ConfigError as exc:
        ctx.errors.extend(exc.problems)
        return None


def read_value(raw: object, path: str, ctx: Context, convert: Callable[[object], T]) -> T | None:
    """``raw`` interpolated and converted; None when null, empty, or invalid (recorded)."""
    value = _expand(raw, path, ctx)
    if value is None or value == "":
        return None
    try:
        return convert(value)
    except BadValue as exc:
        ctx.error(path, str(exc))
        return None


def opt(m: Mapping[str, object], key: str, path: str, ctx: Context, convert: Callable[[object], T]) -> T | None:
    return read_value(m.get(key), join(path, key), ctx, convert)


def get(
    m: Mapping[str, object],
    key: str,
    path: str,
    ctx: Context,
    convert: Callable[[object], T],
    default: T,
) -> T:
    value = opt(m, key, path, ctx, convert)
    return default if value is None else value


def text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise BadValue(f"expected a string, got {kind_of(value)}")


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadValue(f"expected true or false, got {value!r}")


_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


def integer(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise BadValue(f"expected an integer, got {value!r}")


def number(value: object) -> float:
    result: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            result = float(value.strip())
    if result is None or not math.isfinite(result):
        raise BadValue(f"expected a number, got {value!r}")
    return result


def positive_int(value: object) -> int:
    result = integer(value)
    if result <= 0:
        raise BadValue(f"must be a positive integer, got {result}")
    return result


def positive_number(value: object) -> float:
    result = number(value)
    if result <= 0:
        raise BadValue(f"must be a positive number, got {result:g}")
    return result


def int_between(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        result = integer(value)
        if not low <= result <= high:
            raise BadValue(f"must be between {low} and {high}, got {result}")
        return result

    return convert


def required_text(m: Mapping[str, object], key: str, path: str, ctx: Context) -> str | None:
    if m.get(key) is None:
        ctx.error(path, f"missing required key {key!r}")
        return None
    errors = len(ctx.errors)
    value = opt(m, key, path, ctx, text)
    if value is None and len(ctx.errors) == errors:
        ctx.error(join(path, key), "must not be empty")
    return value


def http_url(value: object) -> str:
    url = text(value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadValue(f"expected an http:// or https:// URL, got {url!r}")
    return url


def redis_url(value: object) -> str:
    url = text(value)
    if urlsplit(url).scheme.lower() not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        raise BadValue(f"expected a redis://, rediss://, unix:// or redis+sentinel:// URL, got {redact_url(url)!r}")
    return url


# --- the sections ----------------------------------------------------------------
