"""The adapter for every non-OpenAI wire format: litellm translates, we do the I/O.

litellm is used only for its per-provider translation: the provider config
classes (`AnthropicConfig`, `OllamaChatConfig`, `GoogleAIStudioGeminiConfig`)
map OpenAI parameters, build the headers, URL and body, turn a whole answer
into a `ModelResponse`, and their chunk parsers turn stream events into
`ModelResponseStream`s. Its `acompletion` machinery (logging objects,
callbacks, cost tracking, `CustomStreamWrapper`, private HTTP clients that
retry on their own) is skipped: it costs ~10 ms of CPU per call and ~40 ms
per stream, where this path spends about a millisecond in litellm's
translation per call or stream, plus one orjson encode per chunk.

    OpenAI body ─► optional params (memoised) ─► config: headers, URL, body ─► our pooled aiohttp session
    upstream bytes ─► config: whole answer or chunk parser ─► OpenAI JSON, one encode

Plain text deltas (nearly every chunk of a stream) skip the chunk parser when
its answer is known to be exactly the text; anything else goes through it.

Providers other than anthropic, ollama_chat and gemini go through
`litellm.acompletion` (slower, same classification), with an HTTP handler
that sends over our pooled httpx client and never retries on one of its own.
"""

from __future__ import annotations

from proxy.adapters.translated.adapter import TranslatedAdapter

__all__ = ["TranslatedAdapter"]
