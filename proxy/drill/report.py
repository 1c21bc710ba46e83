"""What a drill found: its plan and results, the pure decisions over them (who answered, leaks,
the exit code) and the report as text or JSON."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.errors import FailureClass

DEFAULT_PROMPT: Final = "Reply with one short sentence: which model are you?"
DEFAULT_REQUESTS: Final = 3
DEFAULT_SLA_MS: Final = 30_000
EXIT_PASSED: Final = 0
EXIT_FAILED: Final = 1
EXIT_NOT_RUN: Final = 2  # bad usage or config, admin off, proxy unreachable: nothing was proven
REASON: Final = "drill"
SETTLE_SECONDS: Final = 0.5  # lets other replicas hear of a switch (published through the store)
ADMIN_TIMEOUT: Final = 10.0


class DrillError(Exception):
    """The drill could not be run (the message says why)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send: per route, `requests` requests of `prompt`."""

    disabled: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()  # empty: every route the proxy has
    prompt: str = DEFAULT_PROMPT
    requests: int = DEFAULT_REQUESTS
    stream: bool = True
    sla_ms: int = DEFAULT_SLA_MS


@dataclass(frozen=True, slots=True)
class DrillAttempt:
    """One provider's turn as a drill's client reads it from the answer's headers
    (`x-proxy-fallbacks`, `x-proxy-provider`); the proxy's own record is `errors.Attempt`."""

    provider: str
    outcome: str  # "ok" or a FailureClass value


@dataclass(frozen=True, slots=True)
class Result:
    """One request of the drill, as the drill's client saw it."""

    route: str
    index: int
    stream: bool
    status: int | None  # None: no HTTP answer at all
    provider: str | None
    attempts: tuple[DrillAttempt, ...]
    first_byte_ms: float | None
    first_token_ms: float | None
    total_ms: float
    error: str | None = None
    request_id: str | None = None

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def first_ms(self) -> float | None:
        return self.first_token_ms if self.stream else self.first_byte_ms


@dataclass(frozen=True, slots=True)
class RouteSummary:
    route: str
    answered: int
    total: int
    providers: tuple[str, ...]
    p50_ms: float
    max_ms: float
    sla_held: int
    all_disabled: bool  # nothing answered and every provider tried was one the drill switched off


@dataclass(frozen=True, slots=True)
class Report:
    mode: str  # "in-process" or "remote"
    target: str  # the config file or the proxy's URL
    proxy: str
    plan: Plan
    results: tuple[Result, ...]
    notes: tuple[str, ...] = ()
    restore_failed: tuple[str, ...] = ()  # providers the drill switched off and could not switch on


# --- pure decisions -----------------------------------------------------------------


def parse_fallbacks(header: str | None) -> tuple[DrillAttempt, ...]:
    """`x-proxy-fallbacks: a=timeout,b=unhealthy` as attempts (malformed pairs are kept as `?`)."""
    attempts = []
    for pair in (header or "").split(","):
        provider, _, outcome = pair.strip().partition("=")
        if provider:
            attempts.append(DrillAttempt(provider, outcome or "?"))
    return tuple(attempts)


def attempts_of(headers: Mapping[str, str], answered: bool) -> tuple[DrillAttempt, ...]:
    """Every attempt the proxy's headers name: the fallbacks, then the provider that answered."""
    fallbacks = parse_fallbacks(headers.get("x-proxy-fallbacks"))
    provider = headers.get("x-proxy-provider")
    return fallbacks + ((DrillAttempt(provider, "ok"),) if provider and answered else ())


def sla_held(result: Result, sla_ms: int) -> bool:
    return result.answered and result.total_ms <= sla_ms


def _was_called(outcome: str) -> bool:
    try:
        return not FailureClass(outcome).is_skip
    except ValueError:
        return True  # "ok", or a class this drill does not know: the provider was called


def leaks(results: Sequence[Result], disabled: Sequence[str]) -> tuple[tuple[Result, DrillAttempt], ...]:
    """Where a switched-off provider answered or was called: the switch did not hold."""
    off = set(disabled)
    return tuple(
        (result, attempt)
        for result in results
        for attempt in result.attempts
        if attempt.provider in off and _was_called(attempt.outcome)
    )


def summarize(results: Sequence[Result], plan: Plan) -> tuple[RouteSummary, ...]:
    routes = dict.fromkeys(result.route for result in results)
    return tuple(_summary(route, [r for r in results if r.route == route], plan) for route in routes)


def _summary(route: str, results: Sequence[Result], plan: Plan) -> RouteSummary:
    totals = [result.total_ms for result in results]
    providers = dict.fromkeys(r.provider for r in results if r.answered and r.provider)
    tried = {attempt.provider for result in results for attempt in result.attempts}
    answered = sum(result.answered for result in results)
    return RouteSummary(
        route=route,
        answered=answered,
        total=len(results),
        providers=tuple(providers),
        p50_ms=statistics.median(totals),
        max_ms=max(totals),
        sla_held=sum(sla_held(result, plan.sla_ms) for result in results),
        all_disabled=answered == 0 and bool(tried) and tried <= set(plan.disabled),
    )


def exit_code(report: Report) -> int:
    """0 when every request was answered within the SLA and no switched-off provider was called."""
    held = all(sla_held(result, report.plan.sla_ms) for result in report.results)
    clean = not leaks(report.results, report.plan.disabled) and not report.restore_failed
    return EXIT_PASSED if report.results and held and clean else EXIT_FAILED


# --- rendering ------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _attempts_text(result: Result) -> str:
    return ", ".join(f"{a.provider}={a.outcome}" for a in result.attempts) or "-"


def leak_lines(report: Report) -> tuple[str, ...]:
    return tuple(
        f"!!! SWITCHED-OFF PROVIDER {attempt.provider!r} "
        + ("ANSWERED" if attempt.outcome == "ok" else f"WAS CALLED ({attempt.outcome})")
        + f" on {result.route} #{result.index}: the switch did not hold !!!"
        for result, attempt in leaks(report.results, report.plan.disabled)
    )


def render_text(report: Report) -> str:
    plan = report.plan
    mode = "streamed" if plan.stream else "plain"
    lines = [
        f"drill ({report.mode}) of {report.target}" + (f" via {report.proxy}" if report.proxy != report.target else ""),
        f"switched off: {', '.join(plan.disabled) or 'nothing'}; {plan.requests} {mode} request(s) per route; "
        f"SLA {plan.sla_ms} ms",
        *report.notes,
        "",
    ]
    header = ("route", "#", "mode", "status", "provider", "first ms", "total ms", "SLA", "attempts")
    rows = [header, *(_row(result, plan.sla_ms) for result in report.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    lines += [f"    ^ {r.route} #{r.index}: {r.error}" for r in report.results if r.error]
    lines.append("")
    lines += [_summary_line(summary, plan.sla_ms) for summary in summarize(report.results, plan)]
    lines += leak_lines(report)
    lines += [
        f"!!! could not switch {name!r} back on: do it by hand (POST /admin/providers/{name}/enable)"
        for name in report.restore_failed
    ]
    lines.append(_verdict(report))
    return "\n".join(lines)


def _row(result: Result, sla_ms: int) -> tuple[str, ...]:
    return (
        result.route,
        str(result.index),
        "stream" if result.stream else "plain",
        "-" if result.status is None else str(result.status),
        result.provider or "-",
        _ms(result.first_ms),
        _ms(result.total_ms),
        "ok" if sla_held(result, sla_ms) else "MISSED",
        _attempts_text(result),
    )


def _summary_line(summary: RouteSummary, sla_ms: int) -> str:
    line = (
        f"{summary.route}: answered {summary.answered}/{summary.total} "
        f"by {', '.join(summary.providers) or 'nobody'}; latency p50 {summary.p50_ms:.0f} ms, "
        f"max {summary.max_ms:.0f} ms; SLA {sla_ms} ms held {summary.sla_held}/{summary.total}"
    )
    return line + (" (every provider it tried was switched off: 503 expected)" if summary.all_disabled else "")


def _verdict(report: Report) -> str:
    if exit_code(report) == EXIT_PASSED:
        off = ", ".join(report.plan.disabled) or "nothing"
        return f"drill PASSED: every request answered within the SLA; switched off ({off}) never answered"
    if not report.results:
        return "drill FAILED: no request was sent (no routes)"
    held = sum(sla_held(result, report.plan.sla_ms) for result in report.results)
    reasons = [f"{held}/{len(report.results)} requests answered within the SLA"]
    reasons += ["a switched-off provider was called"] if leaks(report.results, report.plan.disabled) else []
    reasons += ["a provider could not be switched back on"] if report.restore_failed else []
    return "drill FAILED: " + "; ".join(reasons)


def render_json(report: Report) -> bytes:
    plan = report.plan
    document = {
        "mode": report.mode,
        "target": report.target,
        "proxy": report.proxy,
        "disabled": list(plan.disabled),
        "stream": plan.stream,
        "requests_per_route": plan.requests,
        "sla_ms": plan.sla_ms,
        "prompt": plan.prompt,
        "notes": list(report.notes),
        "requests": [_result_json(result, plan.sla_ms) for result in report.results],
        "routes": [_rounded(dataclasses.asdict(summary)) for summary in summarize(report.results, plan)],
        "leaks": [
            {"route": r.route, "index": r.index, "provider": a.provider, "outcome": a.outcome}
            for r, a in leaks(report.results, plan.disabled)
        ],
        "restore_failed": list(report.restore_failed),
        "passed": exit_code(report) == EXIT_PASSED,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2)


def _result_json(result: Result, sla_ms: int) -> dict[str, Any]:
    return {**_rounded(dataclasses.asdict(result)), "answered": result.answered, "sla_held": sla_held(result, sla_ms)}


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 1) if isinstance(value, float) else value for key, value in record.items()}
