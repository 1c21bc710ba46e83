"""Adapters hide each provider's wire format behind one protocol (see `base`)."""

from __future__ import annotations

from proxy.adapters.base import Adapter, AdapterHooks, AttemptLimits, Chunk, Completion, Embeddings, HttpClients, Usage
from proxy.config import ProviderConfig

__all__ = [
    "Adapter",
    "AdapterHooks",
    "AttemptLimits",
    "Chunk",
    "Completion",
    "Embeddings",
    "HttpClients",
    "Usage",
    "make_adapter",
]


def make_adapter(provider: ProviderConfig, clients: HttpClients, hooks: AdapterHooks | None = None) -> Adapter:
    """The adapter for one provider. litellm is imported only for providers
    whose wire format is not OpenAI's."""
    if provider.openai_compatible:
        from proxy.adapters.openai_compat import OpenAICompatAdapter

        return OpenAICompatAdapter(provider, clients.session, hooks or AdapterHooks())
    from proxy.adapters.translated import TranslatedAdapter

    return TranslatedAdapter(provider, clients, hooks or AdapterHooks())
