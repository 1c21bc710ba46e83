"""Issue 13's floors, measured in interleaved pairs (`python -m tests.benchmarks.run --pairs`).

A shared VM's speed drifts by ±20 % over tens of seconds, so two throughputs
measured a round apart make a ratio that moves by as much. Here each pair (the
proxy and its floor) is measured in short slices taken in turn, A B A B …,
so both sides of every slice pair see the same machine; the ratio is the
ratio of the sums (the median of the slices' ratios is shown beside it):

| pair | kind |
| --- | --- |
| `stream_upstream: false` / aiohttp pass-through | non-stream |
| default design (streamed upstream, assembled) / the assembling pass-through | non-stream |
| OpenAI path / aiohttp pass-through | stream |
| Anthropic (translated) path / OpenAI path | non-stream, stream |

All systems run at once (idle ones wait on core 0), one worker each; wrk -c32
on core 1 with the upstream. CPU per request is each side's own CPU over its
slices, so a CPU ratio is shown too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmarks.run import (
    CONNECTIONS,
    LOAD_CORE,
    SUT_CORE,
    Load,
    Process,
    Settings,
    System,
    build_systems,
    check_answers,
    machine,
    measure_load,
    start,
    start_upstream,
    wrk,
)

TARGET = 0.75
PAIRS = (
    ("fp-openai-plain", "aiohttp", False, TARGET, "`stream_upstream: false` / aiohttp pass-through, non-stream"),
    (
        "fp-openai",
        "aiohttp-assemble",
        False,
        TARGET,
        "default design / the assembling pass-through (non-stream streamed upstream), non-stream",
    ),
    ("fp-openai", "aiohttp", True, TARGET, "OpenAI path / aiohttp pass-through, stream"),
    ("fp-anthropic", "fp-openai", False, 0.5, "Anthropic (translated) path / OpenAI path, non-stream"),
    ("fp-anthropic", "fp-openai", True, 0.5, "Anthropic (translated) path / OpenAI path, stream"),
)


@dataclass
class Pair:
    system: str
    floor: str
    stream: bool
    target: float
    label: str
    sides: tuple[Load, Load] = field(default_factory=lambda: (Load(), Load()))

    def ratio(self) -> float:
        return self.sides[0].rps / self.sides[1].rps if self.sides[1].rps else 0.0

    def slice_ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.sides[0].rounds_rps, self.sides[1].rounds_rps, strict=True) if b]

    def cpu_ratio(self) -> float | None:
        a, b = self.sides[0].cpu_ms_per_request, self.sides[1].cpu_ms_per_request
        return a / b if a is not None and b else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("interleaved pairs (--pairs)")
    group.add_argument(
        "--pairs",
        action="store_true",
        help="measure issue 13's floors instead: each ratio in interleaved slices (tests/benchmarks/pairs.py)",
    )
    group.add_argument("--slices", type=int, default=20, help="slices per side of each pair (default 20)")
    group.add_argument("--slice-seconds", type=float, default=1.0, help="wrk seconds per slice (default 1)")


def main(args: argparse.Namespace, command: str) -> int:
    os.sched_setaffinity(0, {LOAD_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="fp-pairs-"))
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    settings = Settings(1, 1.0, 0.0, 1.0, 1, None, fallback_rows=False, workers_row=False)
    upstream = start_upstream(workdir)
    pairs = [Pair(*spec) for spec in PAIRS]
    keys = {key for pair in pairs for key in (pair.system, pair.floor)}
    processes: dict[str, tuple[System, Process, int]] = {}
    try:
        for system in build_systems(settings, workdir, upstream.port):
            if system.key in keys:
                say(f"start: {system.label}")
                process, port, _ = start(system, workdir, upstream.port)
                processes[system.key] = (system, process, port)
                check_answers(system, port)
                for stream in (False, True):  # warm: pools, caches, lazy imports
                    wrk(system, port, stream, 1, workdir)
        for pair in pairs:
            say(f"pair: {pair.label}, {args.slices} slices of {args.slice_seconds:g} s each side")
            for _ in range(args.slices):
                for key, into in zip((pair.system, pair.floor), pair.sides, strict=True):
                    system, process, port = processes[key]
                    measure_load(
                        system, port, pair.stream, args.slice_seconds, workdir, process, upstream.process, into
                    )
            say(f"  {pair.ratio():.3f}× (median of slices {statistics.median(pair.slice_ratios()):.3f}×)")
    finally:
        for _, process, _ in processes.values():
            process.stop()
        upstream.process.stop()
    text = report(pairs, args, command)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


def report(pairs: list[Pair], args: argparse.Namespace, command: str) -> str:
    rows = [
        "| pair | ratio (sums) | median of slice ratios | slice ratios min–max | system / floor req/s | CPU ms per request, system / floor (ratio) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for pair in pairs:
        a, b = pair.sides
        ratios = pair.slice_ratios()
        cpu = pair.cpu_ratio()
        rows.append(
            f"| {pair.label} | {pair.ratio():.3f}× | {statistics.median(ratios):.3f}× | "
            f"{min(ratios):.2f}–{max(ratios):.2f} | {a.rps:,.0f} / {b.rps:,.0f} | "
            f"{a.cpu_ms_per_request or 0:.3f} / {b.cpu_ms_per_request or 0:.3f} "
            f"({'—' if cpu is None else f'{cpu:.2f}×'}) |"
        )
        verdict = "PASS" if pair.ratio() >= pair.target else "FAIL"
        verdicts.append(f"- **{verdict}** {pair.label}: {pair.ratio():.3f}× (target ≥ {pair.target:g}×)")
    return (
        "\n".join(
            [
                f"Command: `{command}`",
                f"Machine: {machine()}",
                f"Load: wrk -t1 -c{CONNECTIONS}; each pair measured in {args.slices} interleaved slices of "
                f"{args.slice_seconds:g} s per side (system, floor, system, floor, …); systems on core {SUT_CORE}, "
                f"upstream + load generator on core {LOAD_CORE}.",
                "",
                *rows,
                "",
                "Targets (issue 13):",
                "",
                *verdicts,
            ]
        )
        + "\n"
    )
