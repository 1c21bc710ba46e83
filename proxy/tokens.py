"""What a request may cost in tokens, read from its JSON bytes before the call
(no tokenizer, nothing to load): one place for the two bounds the proxy uses.

* `estimate_tokens`: the quota's guess, admitted before the call and corrected
  from the answer's usage: prompt characters / 4 plus the answer the client allows.
* `upper_bound`: more tokens than any BPE tokenizer can make of the messages
  (each token covers at least one byte): a prompt under it surely fits a context
  window, so the tokenizer is asked only about prompts above it.

Both read the answer's allowance the same way (`completion_limit`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

DEFAULT_COMPLETION_TOKENS = 512  # an answer whose length the client leaves open
CHARS_PER_TOKEN = 4
PER_MESSAGE_OVERHEAD = 8  # role and framing tokens, generous


def completion_limit(body: Mapping[str, Any]) -> int | None:
    """The answer's length the client allows (`max_completion_tokens`, else
    `max_tokens`), when it is a positive integer."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return limit if isinstance(limit, int) and limit > 0 else None


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """A cheap upper-side guess before the call: prompt characters / 4 plus
    the completion the client allows (or a default). An embeddings request has
    no completion: its `input` is all it costs."""
    if "messages" not in body and "input" in body:
        return len(orjson.dumps(body["input"])) // CHARS_PER_TOKEN + 1
    prompt = len(orjson.dumps(body.get("messages", []))) // CHARS_PER_TOKEN
    limit = completion_limit(body)
    return prompt + (DEFAULT_COMPLETION_TOKENS if limit is None else limit)


def upper_bound(messages: Sequence[dict[str, Any]]) -> int:
    """More tokens than any BPE tokenizer can make of these messages: each
    token covers at least one byte."""
    return len(orjson.dumps(messages)) + PER_MESSAGE_OVERHEAD * len(messages)
