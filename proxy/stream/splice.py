"""Continuing a stream on another provider without splicing: the request that
asks for the rest, and the check of what comes back against what the client
already has. Pure: no I/O.

The next provider is asked in the form its wire format allows:

* `prefill`: the partial answer as a trailing assistant message, which the
  model continues by construction (Anthropic Messages; vLLM with
  `continue_final_message`; Ollama and others that honour it);
* `instruction`: the partial answer, then a user message asking to go on.
  A model may ignore it and start over.

Either way the start of what comes back is held and judged (`judge`): the
answer again from its start, or the last words of the partial again, are
dropped (nothing reaches the client twice); an answer that starts over with
different text is refused (`Restarted`): the client gets an honest in-band
error instead of a garbled answer. A model that starts over with entirely
different opening words cannot be told from one that continues by text alone:
providers that can take a prefill should be asked that way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import orjson

from proxy.adapters.base import Chunk, describe

CONTINUE_INSTRUCTION: Final = (
    "Your previous message was cut off. Continue it exactly where it stops: do not repeat any of it, "
    "do not start over and do not comment on the interruption."
)
PREFILL: Final = "prefill"
INSTRUCTION: Final = "instruction"
VLLM: Final = "vllm"  # prefill with vLLM's chat-template switches
CONTINUE_FORMS: Final = frozenset({PREFILL, INSTRUCTION, VLLM})

_WINDOW: Final = 200  # the end of the partial answer searched for a repeated tail
_JUDGE_WORDS: Final = 4  # a continuation is judged once it has this many words ...
_JUDGE_CHARS: Final = 40  # ... or this many characters (or it ended)
_COMPARE_WORDS: Final = 8  # opening words compared to tell a fresh start
_SENTENCE_END: Final = frozenset(".!?:;\n")


class Restarted(Exception):
    """The continuation started the answer over with different text."""


def continuation_body(body: dict[str, Any], sent: str, form: str, produced: int = 0) -> dict[str, Any]:
    """The request asking the next provider for the rest of `sent`.

    `produced` (the tokens already streamed, as best known) comes off a
    client's `max_tokens`, so the whole answer keeps to what was asked."""
    messages = list(body["messages"])
    if form == INSTRUCTION:
        messages += [{"role": "assistant", "content": sent}, {"role": "user", "content": CONTINUE_INSTRUCTION}]
    else:
        # Anthropic refuses a final assistant message that ends in whitespace;
        # the whitespace a continuation brings back is dropped by `judge`.
        messages.append({"role": "assistant", "content": sent.rstrip()})
    asked: dict[str, Any] = {**body, "messages": messages}
    if form == VLLM:
        asked["continue_final_message"] = True
        asked["add_generation_prompt"] = False
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            asked[key] = max(1, limit - produced)
    return asked


def judge(sent: str, head: str, *, final: bool) -> int | None:
    """How many leading characters of `head` (a continuation's text so far) to
    drop because the client already has them; None while that cannot be told
    yet (more text is needed). Raises `Restarted` when `head` starts the answer
    over with different text. `final`: the continuation has no more text."""
    s, h = sent.lstrip(), head.lstrip()
    lead = len(head) - len(h)
    if not s:
        return 0
    if not h:
        return len(head) if final else None
    if h.startswith(s):  # the whole answer again, from its start
        return lead + len(s)
    if not final and _may_still_repeat(s, h):
        return None
    if s.startswith(h):  # ended while still repeating the start: nothing new
        return len(head)
    repeated = _repeated_tail(s, h)
    if repeated:
        return lead + repeated
    if not final and len(h.split()) < _JUDGE_WORDS and len(h) < _JUDGE_CHARS:
        return None
    if _starts_over(s, h):
        raise Restarted(f"the continuation started over: {head[:80]!r}")
    # Two runs of whitespace never need to meet (a prefill loses its trailing space).
    return lead if sent[-1:].isspace() else 0


def _word_starts(s: str) -> list[int]:
    """Where the words of the last `_WINDOW` characters of `s` start, and 0."""
    begin = max(0, len(s) - _WINDOW)
    starts = [i for i in range(begin, len(s)) if not s[i].isspace() and (i == 0 or s[i - 1].isspace())]
    return [0, *starts] if begin > 0 else starts


def _may_still_repeat(s: str, h: str) -> bool:
    """`h` is so far the start of `s`, or of one of its last words: it may still
    turn out to be the answer (or its tail) again."""
    return any(s.startswith(h, i) and len(s) - i > len(h) for i in _word_starts(s))


def _repeated_tail(s: str, h: str) -> int:
    """The length of the longest run of whole words that ends `s` and starts `h`."""
    for i in _word_starts(s):
        tail = s[i:]
        if len(tail) >= 2 and h.startswith(tail) and (len(h) == len(tail) or not h[len(tail)].isalnum()):
            return len(tail)
    return 0


def _starts_over(s: str, h: str) -> bool:
    """`h` opens the way the answer `s` opened: the same first two words, most
    of the same opening words, or the same first word as a new sentence where
    `s` was cut mid-sentence."""
    ws, wh = s.split()[:_COMPARE_WORDS], h.split()[:_COMPARE_WORDS]
    n = min(len(ws), len(wh))
    if n >= 2 and ws[:2] == wh[:2]:
        return True
    if n >= 4 and sum((Counter(ws[:n]) & Counter(wh[:n])).values()) >= 0.6 * n:
        return True
    cut_mid_sentence = s.rstrip()[-1:] not in _SENTENCE_END
    return cut_mid_sentence and n >= 1 and ws[0] == wh[0] and wh[0][:1].isupper()


class Splice:
    """Holds a continuing provider's first chunks until `judge` can tell what to
    drop, then lets its chunks through with the repeated text cut out."""

    __slots__ = ("_held", "_text", "decided", "sent")

    def __init__(self, sent: str) -> None:
        self.sent = sent
        self.decided = False
        self._held: list[Chunk] = []
        self._text = ""

    def feed(self, chunk: Chunk) -> list[Chunk]:
        """The chunks to send now (none while undecided); raises `Restarted`."""
        if self.decided:
            return [chunk]
        if not (chunk.has_content or chunk.finish_reason is not None or chunk.usage is not None):
            return []  # the continuing provider's opening role chunk: the client has had one
        self._held.append(chunk)
        self._text += chunk.text
        final = chunk.finish_reason is not None or chunk.tool_calls
        return self._decide(final)

    def end(self) -> list[Chunk]:
        """The continuation ended: decide with what there is."""
        return [] if self.decided else self._decide(True)

    def _decide(self, final: bool) -> list[Chunk]:
        drop = judge(self.sent, self._text, final=final)
        if drop is None:
            return []
        self.decided = True
        held, self._held = self._held, []
        return trim(held, drop)


def trim(chunks: list[Chunk], drop: int) -> list[Chunk]:
    """`chunks` without the first `drop` characters of their text; a chunk left
    with nothing to say is left out."""
    out: list[Chunk] = []
    for chunk in chunks:
        if drop <= 0 or not chunk.text:
            out.append(chunk)
            continue
        cut, drop = min(drop, len(chunk.text)), drop - len(chunk.text)
        rest = with_text(chunk, chunk.text[cut:])
        if rest.has_content or rest.finish_reason is not None or rest.usage is not None:
            out.append(rest)
    return out


def with_text(chunk: Chunk, text: str) -> Chunk:
    """`chunk` with its first choice's content replaced by `text`."""
    data = dict(chunk.parsed())
    choices = [dict(choice) for choice in data.get("choices") or []]
    for choice in choices:
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            choice["delta"] = {**delta, "content": text} if text else {k: v for k, v in delta.items() if k != "content"}
            break
    data["choices"] = choices
    rewritten = describe(orjson.dumps(data), data)
    rewritten.more = chunk.more
    return rewritten
