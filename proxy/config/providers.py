"""The ``providers`` section: one ProviderConfig per name, its target resolved."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from proxy.config.litellm_providers import LITELLM_PROVIDERS
from proxy.config.model import CAPABILITIES, CONTINUE_FORMS, ProviderConfig, Quota, Timeouts
from proxy.config.model_info import known_capabilities
from proxy.config.source import referenced_names
from proxy.config.values import (
    Context,
    boolean,
    get,
    http_url,
    int_between,
    opt,
    positive_int,
    positive_number,
    read_items,
    read_section,
    read_value,
    required_text,
    text,
    unknown,
)

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PROVIDER_KEYS: Final = frozenset(
    {
        "model",
        "api_key",
        "api_base",
        "timeout",
        "quota",
        "context_window",
        "capabilities",
        "local",
        "warmup",
        "probe",
        "stream_upstream",
        "continue_with",
        "system_prompt",
        "retries",
        "headers",
        "embedding_space",
        "needs",
        "max_connections",
    }
)
_TIMEOUT_KEYS: Final = ("connect", "first_token", "total", "idle", "pool")
_QUOTA_KEYS: Final = ("requests_per_day", "tokens_per_day")
_DEFAULT_TIMEOUTS: Final = Timeouts()
# Fields a provider may declare it `needs`: without them it is disabled, not an error.
_NEEDABLE: Final = ("api_key", "api_base")

# litellm providers whose wire format is OpenAI's, so requests are relayed as is.
_OPENAI_COMPATIBLE: Final = frozenset(
    {
        "openai",
        "together_ai",
        "groq",
        "deepseek",
        "mistral",
        "fireworks_ai",
        "openrouter",
        "xai",
        "hosted_vllm",
        "lm_studio",
        "llamafile",
    }
)
_API_BASE_REQUIRED: Final = frozenset({"hosted_vllm", "llamafile"})
_LOCAL_BY_DEFAULT: Final = frozenset({"ollama", "ollama_chat", "lm_studio"})
_DEFAULT_API_BASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "openai": "https://api.openai.com/v1",
        "together_ai": "https://api.together.xyz/v1",
        "groq": "https://api.groq.com/openai/v1",
        "deepseek": "https://api.deepseek.com/v1",
        "mistral": "https://api.mistral.ai/v1",
        "fireworks_ai": "https://api.fireworks.ai/inference/v1",
        "openrouter": "https://openrouter.ai/api/v1",
        "xai": "https://api.x.ai/v1",
        "lm_studio": "http://localhost:1234/v1",
        "ollama": "http://localhost:11434",
        "ollama_chat": "http://localhost:11434",
    }
)
# Wire formats that take a partial answer as a trailing assistant message (a prefill).
_PREFILL_BY_DEFAULT: Final = frozenset({"anthropic"})
# Below this, a context window leaves too little room for a prompt and an answer.
_USEFUL_CONTEXT_WINDOW: Final = 1024


@dataclass(frozen=True, slots=True)
class Scope:
    """The names a route may refer to, and the names it must not be."""

    providers: frozenset[str]
    routes: frozenset[str]


def parse_providers(
    node: object, routes_node: object, ctx: Context, max_connections: int = 0
) -> tuple[dict[str, ProviderConfig], Scope]:
    """`max_connections`: the default of each provider's own (`limits.upstream_max_connections`)."""
    section = read_section(node, "providers", ctx, None)
    if section == {}:
        ctx.error("providers", "at least one provider is required")
    section = section or {}
    providers: dict[str, ProviderConfig] = {}
    for name, body in section.items():
        path = f"providers.{name}"
        if not valid_name(name, path, ctx):
            continue
        provider = _parse_provider(name, body, path, ctx, max_connections)
        if provider is not None:
            providers[name] = provider
    route_names = routes_node.keys() if isinstance(routes_node, Mapping) else ()
    scope = Scope(
        providers=frozenset(name for name in section if _NAME.fullmatch(name)),
        routes=frozenset(name for name in route_names if isinstance(name, str)),
    )
    return providers, scope


def valid_name(name: str, path: str, ctx: Context) -> bool:
    if _NAME.fullmatch(name):
        return True
    ctx.error(path, "names use letters, digits, '.', '_' and '-', and start with a letter or digit")
    return False


def _parse_provider(
    name: str, node: object, path: str, ctx: Context, max_connections: int = 0
) -> ProviderConfig | None:
    m = read_section(node, path, ctx, _PROVIDER_KEYS)
    if m is None:
        return None
    model = required_text(m, "model", path, ctx)
    needs = _parse_needs(m, path, ctx)
    disabled = _disabled_reason(m, needs, path, ctx)
    # A needed field whose variables are unset is left unread: `${OPENAI_API_KEY}` is no error then.
    unread = needs if disabled is not None else frozenset()
    provider = ProviderConfig(
        name=name,
        model=model or "",
        litellm_provider="",  # the model-derived fields are filled in by _with_target
        upstream_model="",
        openai_compatible=False,
        api_base=None if "api_base" in unread else opt(m, "api_base", path, ctx, http_url),
        api_key=None if "api_key" in unread else opt(m, "api_key", path, ctx, text),
        timeout=_parse_timeouts(m.get("timeout"), f"{path}.timeout", ctx),
        quota=_parse_quota(m.get("quota"), f"{path}.quota", ctx),
        context_window=opt(m, "context_window", path, ctx, positive_int),
        capabilities=_parse_capabilities(m.get("capabilities"), f"{path}.capabilities", ctx),
        local=get(m, "local", path, ctx, boolean, False),
        warmup=get(m, "warmup", path, ctx, boolean, False),
        system_prompt=opt(m, "system_prompt", path, ctx, text),
        retries=get(m, "retries", path, ctx, int_between(0, 5), 0),
        headers=_parse_headers(m.get("headers"), f"{path}.headers", ctx),
        probe=get(m, "probe", path, ctx, boolean, True),
        stream_upstream=get(m, "stream_upstream", path, ctx, boolean, True),
        continue_with=opt(m, "continue_with", path, ctx, text) or "",
        embedding_space=opt(m, "embedding_space", path, ctx, text),
        needs=needs,
        disabled_reason=disabled,
        max_connections=get(m, "max_connections", path, ctx, int_between(0, 1_000_000), max_connections),
    )
    return None if model is None else _with_target(provider, path, ctx)


def _parse_needs(m: Mapping[str, object], path: str, ctx: Context) -> frozenset[str]:
    """The fields named by ``needs``, each one the provider has."""
    found: set[str] = set()
    for where, item in read_items(m.get("needs"), f"{path}.needs", ctx):
        field = read_value(item, where, ctx, text)
        if field is not None and field not in _NEEDABLE:
            ctx.error(where, unknown("field", field, _NEEDABLE))
        elif field is not None and m.get(field) is None:
            example = "${OPENAI_API_KEY}" if field == "api_key" else "${OLLAMA_URL}"
            ctx.error(path, f"needs {field}, but has none (e.g. {field}: {example})")
        elif field is not None:
            found.add(field)
    return frozenset(found)


def _disabled_reason(m: Mapping[str, object], needs: frozenset[str], path: str, ctx: Context) -> str | None:
    """Why a provider is off: a field it needs refers to unset (or empty) variables, or is empty.

    A file that names every provider then runs with only the keys and servers at
    hand; the provider is reported, and never called or probed, until they are set.
    """
    unset: list[str] = []
    empty: list[str] = []
    for field in sorted(needs):
        raw = m[field]
        names = referenced_names(raw) if isinstance(raw, str) else ()
        unset += [name for name in names if not ctx.environ.get(name) and name not in unset]
        if not names and raw == "":
            empty.append(f"{field} is empty")
    if not unset and not empty:
        return None
    reason = "; ".join([f"{' and '.join(unset)} not set"] if unset else empty)
    ctx.warn(path, f"disabled: {reason} (needs: [{', '.join(sorted(needs))}]; set it to use this provider)")
    return reason


def _with_target(provider: ProviderConfig, path: str, ctx: Context) -> ProviderConfig | None:
    """``provider`` with the fields derived from its model string filled in."""
    prefix, slash, upstream = provider.model.partition("/")
    if not slash:
        prefix, upstream = "openai", provider.model
    if not prefix or not upstream:
        ctx.error(f"{path}.model", "expected 'provider/model', e.g. openai/gpt-4o-2024-08-06")
        return None
    if prefix not in LITELLM_PROVIDERS:
        ctx.error(f"{path}.model", unknown("provider prefix", prefix, LITELLM_PROVIDERS))
        return None
    _warn_about_model(prefix, upstream, f"{path}.model", ctx)
    _check_context_window(provider, path, ctx)
    return replace(
        provider,
        litellm_provider=prefix,
        upstream_model=upstream,
        openai_compatible=prefix in _OPENAI_COMPATIBLE,
        api_base=_api_base(provider, prefix, path, ctx),
        capabilities=known_capabilities(prefix, upstream) if provider.capabilities is None else provider.capabilities,
        continue_with=_continue_with(provider, prefix, path, ctx),
    )


def _continue_with(provider: ProviderConfig, prefix: str, path: str, ctx: Context) -> str:
    if not provider.continue_with:
        return "prefill" if prefix in _PREFILL_BY_DEFAULT else "instruction"
    if provider.continue_with not in CONTINUE_FORMS:
        ctx.error(f"{path}.continue_with", unknown("form", provider.continue_with, CONTINUE_FORMS))
    return provider.continue_with


def _check_context_window(provider: ProviderConfig, path: str, ctx: Context) -> None:
    window = provider.context_window
    if window is not None and window < _USEFUL_CONTEXT_WINDOW:
        ctx.warn(
            f"{path}.context_window",
            f"{window} tokens leave little room for a prompt and an answer "
            f"(a request without max_tokens reserves a quarter of the window, {window // 4} tokens, for the answer)",
        )


def _api_base(provider: ProviderConfig, prefix: str, path: str, ctx: Context) -> str | None:
    if provider.api_base is not None or provider.disabled_reason is not None:
        return provider.api_base
    where = f"{path}.api_base"
    if prefix in _API_BASE_REQUIRED:
        ctx.error(where, f"required for {prefix} models (the address of your server)")
    elif provider.local and prefix not in _LOCAL_BY_DEFAULT:
        ctx.error(where, "required for a local provider (the address of the server on your hardware)")
    return _DEFAULT_API_BASES.get(prefix)


def _warn_about_model(prefix: str, upstream: str, path: str, ctx: Context) -> None:
    if prefix in ("ollama", "ollama_chat"):
        base, colon, tag = upstream.rpartition(":")
        if not colon or "/" in tag:
            base, tag = upstream, ""
        if tag in ("", "latest"):
            ctx.warn(
                path,
                f"tag not pinned ({upstream!r} resolves to :latest, which changes under you); write e.g. {base}:7b",
            )
    elif upstream.endswith("-latest"):
        ctx.warn(path, f"{upstream!r} is an alias that moves to new snapshots; pin a dated one")


def _parse_timeouts(node: object, path: str, ctx: Context) -> Timeouts:
    section = read_section(node, path, ctx, _TIMEOUT_KEYS)
    if not section:
        return _DEFAULT_TIMEOUTS
    given = {key: opt(section, key, path, ctx, positive_number) for key in _TIMEOUT_KEYS}
    total = given["total"] or _DEFAULT_TIMEOUTS.total
    for key in ("connect", "first_token"):
        value = given[key]
        if value is not None and value > total:
            ctx.error(f"{path}.{key}", f"{value:g}s must not exceed total ({total:g}s)")
    first_token = given["first_token"] or min(_DEFAULT_TIMEOUTS.first_token, total)
    pool = given["pool"]
    if pool is not None and pool >= first_token:
        # The first-token deadline would end the wait first, and blame the provider for it.
        ctx.error(f"{path}.pool", f"{pool:g}s must be shorter than first_token ({first_token:g}s)")
    # Unset deadlines default to at most the total, so setting only `total` is enough.
    return Timeouts(
        connect=given["connect"] or min(_DEFAULT_TIMEOUTS.connect, total),
        first_token=given["first_token"] or min(_DEFAULT_TIMEOUTS.first_token, total),
        total=total,
        idle=given["idle"] or min(_DEFAULT_TIMEOUTS.idle, total),
        pool=pool or min(_DEFAULT_TIMEOUTS.pool, first_token / 2),
    )


def _parse_quota(node: object, path: str, ctx: Context) -> Quota | None:
    section = read_section(node, path, ctx, _QUOTA_KEYS)
    if not section:
        return None
    requests = opt(section, "requests_per_day", path, ctx, positive_int)
    tokens = opt(section, "tokens_per_day", path, ctx, positive_int)
    return None if requests is None and tokens is None else Quota(requests, tokens)


def _parse_capabilities(node: object, path: str, ctx: Context) -> frozenset[str] | None:
    if node is None:
        return None
    found: set[str] = set()
    for where, item in read_items(node, path, ctx):
        name = read_value(item, where, ctx, text)
        if name in CAPABILITIES:
            found.add(name)
        elif name is not None:
            ctx.error(where, unknown("capability", name, CAPABILITIES))
    return frozenset(found)


def _parse_headers(node: object, path: str, ctx: Context) -> Mapping[str, str]:
    headers: dict[str, str] = {}
    for name, raw in (read_section(node, path, ctx, None) or {}).items():
        if not _HEADER_NAME.fullmatch(name):
            ctx.error(path, f"{name!r} is not a valid header name")
            continue
        value = read_value(raw, f"{path}.{name}", ctx, text)
        if value:  # empty after interpolation: leave the header out
            headers[name] = value
    return MappingProxyType(headers)


# --- routes -------------------------------------------------------------------------------
