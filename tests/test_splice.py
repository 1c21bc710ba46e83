"""Continuation without splicing, in process: what `judge` drops, holds or
refuses, and how `Splice` cuts the repeated text out of a provider's chunks."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.adapters import Chunk
from proxy.stream import CONTINUE_INSTRUCTION, INSTRUCTION, PREFILL, VLLM, continuation_body
from proxy.stream.splice import Restarted, Splice, judge

SENT = "The capital of France is Paris, a city of"


@pytest.mark.parametrize(
    ("head", "final", "drop"),
    [
        (" about two million people.", False, 0),  # a continuation: nothing to drop
        ("The capital of France is Paris, a city of about", False, len(SENT)),  # the answer again
        ("  The capital of France is Paris, a city of about", False, len(SENT) + 2),
        ("city of about two million", False, len("city of")),  # the last words again
        ("of about two million people", False, len("of")),
        ("The capital of", False, None),  # still the answer's start: wait
        ("The capital of", True, len("The capital of")),  # ended while repeating: nothing new
        (" about", False, None),  # too little to judge
        (" about", True, 0),
    ],
)
def test_judge(head: str, final: bool, drop: int | None) -> None:
    assert judge(SENT, head, final=final) == drop


@pytest.mark.parametrize(
    ("sent", "head", "final", "drop"),
    [
        ("  ", "Hello", False, 0),  # the client has only whitespace: nothing of it can repeat
        (SENT, "  ", False, None),  # whitespace alone says nothing yet
        (SENT, "  ", True, 2),  # ...and at the end it is dropped: no text came
    ],
    ids=["nothing-sent", "blank-head", "blank-end"],
)
def test_judge_on_blank_text(sent: str, head: str, final: bool, drop: int | None) -> None:
    assert judge(sent, head, final=final) == drop


@pytest.mark.parametrize(
    "head",
    [
        "The capital city of France is Paris.",  # the same first two words, then other text
        "Paris is the capital of France, a city",  # most of the same opening words
        "The French capital is Paris",  # the same first word as a new sentence, where the answer was cut mid-sentence
    ],
)
def test_a_fresh_start_with_other_text_is_refused(head: str) -> None:
    with pytest.raises(Restarted):
        judge(SENT, head, final=False)


def test_whitespace_lost_to_a_prefill_is_not_doubled() -> None:
    assert judge("Hello there ", " friend, how are you", final=False) == 1
    assert judge("Hello there", " friend, how are you", final=False) == 0


def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> Chunk:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return Chunk.from_dict(
        {"id": "c2", "object": "chat.completion.chunk", "created": 2, "model": "m",
         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    )  # fmt: skip


def texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks if c.has_content]


def test_splice_holds_until_it_can_tell_then_cuts_the_repeat() -> None:
    splice = Splice("one two three")
    assert splice.feed(chunk("", role=True)) == []  # the role chunk: the client has had one
    assert splice.feed(chunk("one")) == []
    assert splice.feed(chunk(" two")) == []
    out = splice.feed(chunk(" three four"))
    assert texts(out) == [" four"]
    assert texts(splice.feed(chunk(" five"))) == [" five"]  # decided: the rest passes as it is
    assert splice.end() == []


def test_splice_lets_a_finish_through_even_when_all_text_was_a_repeat() -> None:
    splice = Splice("one two")
    assert splice.feed(chunk("one")) == []
    out = splice.feed(chunk(" two", finish="stop"))
    assert [c.finish_reason for c in out] == ["stop"] and texts(out) == []


def test_splice_refuses_a_fresh_start() -> None:
    splice = Splice("Alpha beta gamma delta")
    splice.feed(chunk("Alpha beta"))
    with pytest.raises(Restarted):
        splice.feed(chunk(" epsilon zeta eta theta iota kappa"))


def test_continuation_requests() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 100}
    instruction = continuation_body(body, "partial answer ", INSTRUCTION, produced=30)
    assert instruction["messages"][-2:] == [
        {"role": "assistant", "content": "partial answer "},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    assert instruction["max_tokens"] == 70  # the whole answer keeps to what the client allowed
    prefill = continuation_body(body, "partial answer ", PREFILL)
    assert prefill["messages"][-1] == {"role": "assistant", "content": "partial answer"}  # no trailing space
    assert "continue_final_message" not in prefill
    vllm = continuation_body(body, "partial answer", VLLM)
    assert vllm["continue_final_message"] is True and vllm["add_generation_prompt"] is False
    assert body["messages"] == [{"role": "user", "content": "q"}]  # the client's request is left alone
