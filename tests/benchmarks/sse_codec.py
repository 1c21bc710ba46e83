"""Micro-benchmark of the stream codec's decoders (`proxy.sse`), the per-read code of
the adapters' streams:

    python -m tests.benchmarks.sse_codec

Three 22-event streams as the benchmark's fake upstream writes them (an OpenAI
chat stream, an Anthropic Messages stream, and an Ollama NDJSON stream of the
same length), each read as one event per read and as 22 reads split at random
points (seeded). The OpenAI stream goes through `SSEDecoder` (as the
OpenAI-compatible adapter reads it), the others through `payload_decoder` (as the
translated adapter does). Prints the best of 15 rounds of 2,000 streams, in µs
of CPU per stream.
"""

from __future__ import annotations

import functools
import random
import time
import timeit
from collections.abc import Callable, Sequence

import orjson

from proxy.sse import PayloadDecoder, SSEDecoder, payload_decoder
from tests.benchmarks.upstream import anthropic_stream, openai_stream

STREAMS = 2_000


def ollama_stream(chunks: int = 22) -> list[bytes]:
    delta = {"model": "m", "created_at": "2024-01-01T00:00:00Z", "message": {"role": "assistant", "content": "Hi "}}
    lines = [orjson.dumps({**delta, "done": False}) + b"\n" for _ in range(chunks - 1)]
    done = {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True, "eval_count": chunks}
    return [*lines, orjson.dumps(done) + b"\n"]


def random_reads(data: bytes, reads: int, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), reads - 1))
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]


def decode(make: Callable[[], SSEDecoder | PayloadDecoder], blocks: Sequence[bytes]) -> int:
    decoder = make()
    events = 0
    for block in blocks:
        events += len(decoder.feed(block))
    return events + len(decoder.flush())


def main() -> None:
    rng = random.Random(15)
    cases: dict[str, tuple[Callable[[], SSEDecoder | PayloadDecoder], list[bytes]]] = {
        "SSEDecoder, OpenAI SSE": (SSEDecoder, openai_stream("m", False)),
        "payloads, Anthropic SSE": (functools.partial(payload_decoder, "sse"), anthropic_stream("m")),
        "payloads, Ollama NDJSON": (functools.partial(payload_decoder, "ndjson"), ollama_stream()),
    }
    for name, (make, events) in cases.items():
        for reads, blocks in (
            ("an event a read", events),
            ("22 random reads", random_reads(b"".join(events), 22, rng)),
        ):
            run = functools.partial(decode, make, blocks)
            assert run() >= len(events) - 1
            best = min(timeit.repeat(run, number=STREAMS, repeat=15, timer=time.process_time))
            print(f"{name:24} {reads:16}: {best / STREAMS * 1e6:6.2f} µs per stream")


if __name__ == "__main__":
    main()
