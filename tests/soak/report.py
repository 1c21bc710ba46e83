"""The soak's summary table and its pass/fail checks."""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from tests.soak.procs import Sample

if TYPE_CHECKING:
    from tests.soak.run_soak import Figures, Run

CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
FD_SLACK = 4  # non-pool fds may differ from the start by this much (log files, event-loop internals)
REDIS_POOL_BOUND = 64 + 4  # RedisStore: max_connections + PUBSUB_HEADROOM (proxy/state/redis_store.py)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timing(results: list[float]) -> str:
    return (
        f"p50 {percentile(results, 0.5):5.2f}s  p95 {percentile(results, 0.95):5.2f}s  "
        f"max {max(results, default=0):5.2f}s"
    )


def requests_section(run: Run, logged: dict[str, tuple[float, str]]) -> list[str]:
    results = run.results
    streams = sum(1 for r in results if r.stream)
    lines = [
        f"requests: {len(results)} in {run.load_seconds:.0f}s ({len(results) / max(run.load_seconds, 1):.0f}/s), "
        f"{streams} streaming, {len(results) - streams} non-streaming"
    ]
    by_outcome: dict[str, list[float]] = defaultdict(list)
    for result in results:
        by_outcome[result.outcome].append(result.seconds)
    for outcome in ("complete", "error", "violation"):
        seconds = by_outcome.get(outcome, [])
        extra = ""
        if outcome == "complete":
            extra = f"  (continued across providers: {sum(1 for r in results if r.continued)})"
        lines.append(f"  {outcome:<10} {len(seconds):7d}  {_timing(seconds)}{extra}")
    routes = Counter((r.route, r.stream, r.outcome) for r in results)
    lines.append(
        "  by route:  "
        + ", ".join(
            f"{route}{'' if stream else '(json)'} {outcome} {n}"
            for (route, stream, outcome), n in sorted(routes.items())
        )
    )
    answered = Counter(r.detail for r in results if r.outcome == "complete")
    lines.append("  answered by (last provider): " + ", ".join(f"{k} {v}" for k, v in answered.most_common()))
    errors = Counter(r.detail for r in results if r.outcome == "error")
    lines.append("  clean errors: " + (", ".join(f"{k} {v}" for k, v in errors.most_common()) or "none"))
    for result in [r for r in results if r.outcome == "violation"][:10]:
        if result.request_id in logged:
            began, what = logged[result.request_id]
            seen = f"{what}, its handler started {began - result.sent:.2f}s after the client sent it"
        else:
            seen = "no log line: the request never reached the proxy's handler, or never ended there"
        worst = max((lag for at, lag in run.lags if result.at <= at <= result.at + result.seconds), default=0.0)
        headers = (
            "no response headers" if result.headers is None else f"headers after {result.headers - result.at:.2f}s"
        )
        lines.append(
            f"  VIOLATION {result.request_id} {result.route}{'' if result.stream else '(json)'} sent at "
            f"{result.at - run.started:.1f}s, after {result.seconds:.2f}s ({headers}): {result.detail}  "
            f"[proxy: {seen}; load generator stalled up to {worst:.2f}s meanwhile]"
        )
    lags = [lag for _, lag in run.lags]
    lines.append(
        f"  load generator's own event-loop lag: p50 {percentile(lags, 0.5):.3f}s  "
        f"p99 {percentile(lags, 0.99):.3f}s  max {max(lags, default=0):.2f}s"
    )
    return lines


def chaos_section(run: Run, figures: Figures) -> list[str]:
    lines = ["chaos: fault changes " + ", ".join(f"{k} {v}" for k, v in sorted(run.fault_changes.items()))]
    lines += [f"  {line}" for line in run.chaos_log]
    timeline = run.redis_timeline
    lags = ", ".join("not before the next kill" if lag is None else f"{lag:.1f}s" for lag in timeline.recovery_lags())
    down = sum(b - a for a, b in timeline.kills)
    lines.append(
        f"  Redis down {down:.1f}s in all; the proxy's /readyz reported its store unavailable for "
        f"{timeline.unavailable_seconds():.1f}s; store ok again after each restart: {lags or '-'}"
    )
    lines.append(
        f"  /readyz answered in {_timing(timeline.readyz_seconds)} (as this process measures it: its own "
        f"event-loop lag included)"
    )
    m = figures.metrics
    lines.append(
        "proxy counters: "
        f"store errors {m.get('fallback_proxy_store_errors_total', 0):.0f} ("
        + ", ".join(f"{k[13:]} {v:.0f}" for k, v in sorted(m.items()) if k.startswith("store_errors:"))
        + "), "
        f"quota fail-closed {m.get('fallback_proxy_quota_fail_closed_total', 0):.0f}, "
        f"quota exhausted {m.get('fallback_proxy_quota_exhausted_total', 0):.0f}, "
        f"breakers opened {m.get('fallback_proxy_breaker_opened_total', 0):.0f}, "
        f"recoveries {m.get('fallback_proxy_recoveries_total', 0):.0f}, "
        f"fallbacks {m.get('fallback_proxy_fallbacks_total', 0):.0f}, "
        f"continuations {m.get('fallback_proxy_continuations_total', 0):.0f}"
    )
    log = figures.log
    lines.append(
        f"proxy log: {log['requests']} request lines, {log['tracebacks']} tracebacks, "
        f"{len(log['errors'])} error lines; events: " + ", ".join(f"{k} {v}" for k, v in log["events"].most_common())
    )
    lines += [f"  ERROR LINE: {line[:300]}" for line in log["errors"][:5]]
    return lines


def quota_section(figures: Figures) -> tuple[list[str], list[str]]:
    lines = [
        "quota counters in Redis after the run vs what each fake received (chat completions; the tokens",
        "their usage reports, which the healthy anchor's answers match; a call it got that the proxy did not",
        "take, a hedge that lost the race, counts as a request but not its tokens).",
        "Redis req may exceed the fake's count by at most the calls the proxy reported uncertain",
        "(quota_uncertain: cancelled, or the connection broke with no answer: counted, received or not):",
        f"  {'provider':<9} {'redis req':>10} {'fake got':>9} {'uncertain':>9} {'admin req':>10} "
        f"{'redis tok':>10} {'fake tok':>9}  agree",
    ]
    failed = []
    admin = figures.admin.get("providers", {})
    for name in ("small", "anchor"):
        req, tok = figures.redis[name]
        got, tokens = figures.fakes[name]["chat"], figures.fakes[name]["tokens"]
        uncertain = figures.log["uncertain"].get(name, 0)
        quota = (admin.get(name) or {}).get("quota") or {}
        agree = [] if got <= req <= got + uncertain else [f"req {req - got:+d}"]
        if name == "anchor":
            # Redis holds the usage of the answers the proxy read, exactly; a call the anchor
            # received but the proxy did not take (a hedge that lost the race, closed) counts as a
            # request but not its tokens, so the fake's total may be higher by at most those calls.
            read = figures.log["answered_tokens"].get(name, 0)
            unanswered = max(0, got - figures.log["answered"].get(name, 0))
            if tok != read:
                agree.append(f"tok {tok - read:+d} against the answers' usage")
            if not 0 <= tokens - tok <= unanswered * figures.fakes[name]["most_tokens"]:
                agree.append(f"tok {tok - tokens:+d} with {unanswered} calls not answered")
        lines.append(
            f"  {name:<9} {req:>10} {got:>9} {uncertain:>9} {quota.get('requests_used', '?')!s:>10} "
            f"{tok:>10} {tokens if name == 'anchor' else '-':>9}  "
            f"{'NO (' + ', '.join(agree) + ')' if agree else 'yes'}"
        )
        if agree:
            failed.append(
                f"quota counters of {name}: Redis req {req}, tok {tok}; the fake received {got} "
                f"requests" + (f" worth {tokens} tokens" if name == "anchor" else "")
            )
    others = ", ".join(f"{k} got {v['chat']}" for k, v in figures.fakes.items() if k not in ("small", "anchor"))
    lines.append(f"  (no quota) {others}")
    lines.append(
        "  admissions never settled (call marks left in the quota hashes): "
        + ", ".join(f"{k} {v}" for k, v in figures.unsettled.items())
    )
    left = {k: v for k, v in figures.open_streams.items() if v not in ("0", "None")}
    lines.append(
        "  open-stream leases (limits.concurrent_streams) after every stream ended: "
        + (", ".join(f"{k}={v}" for k, v in figures.open_streams.items()) or "none")
    )
    if left:
        failed.append(f"open-stream leases not back to 0 after every stream ended: {left}")
    return lines, failed


def process_section(run: Run, figures: Figures) -> tuple[list[str], list[str]]:
    samples = run.samples
    lines = ["proxy process (/proc/<pid>; asyncio tasks are not exposed by the proxy, so not counted):"]
    lines += [f"  {s.row(samples[i - 1] if i else None)}" for i, s in enumerate(samples)]
    failed: list[str] = []
    start, quiet = samples[0], samples[-1]
    warm = next((s for s in samples if s.label == "load"), start)
    peak = max(s.rss_mb for s in samples)
    growth = quiet.rss_mb - warm.rss_mb
    lines.append(
        f"  RSS: start {start.rss_mb:.1f} MB, after 10 s of load {warm.rss_mb:.1f}, peak {peak:.1f}, "
        f"after the quiet period {quiet.rss_mb:.1f} (growth since warm-up {growth:+.1f} MB)"
    )
    if growth > run.args.max_rss_growth_mb:
        failed.append(f"RSS grew {growth:.1f} MB after warm-up (limit {run.args.max_rss_growth_mb} MB)")
    if quiet.sockets["clients"] or quiet.sockets["dead-clients"]:
        failed.append(
            f"{quiet.sockets['clients'] + quiet.sockets['dead-clients']} client connections still "
            f"held after the quiet period"
        )
    for peer in ("upstream", "other", "unknown"):
        if quiet.sockets[f"dead-{peer}"]:
            failed.append(f"{quiet.sockets[f'dead-{peer}']} {peer} sockets whose peer is gone are still held")
    redis_held = quiet.sockets["redis"] + quiet.sockets["dead-redis"]
    lines.append(
        f"  Redis sockets after the quiet period: {quiet.sockets['redis']} live, {quiet.sockets['dead-redis']} "
        f"dead (peer gone, still pooled; the pool holds at most {REDIS_POOL_BOUND})"
    )
    if redis_held > REDIS_POOL_BOUND:
        failed.append(f"{redis_held} Redis sockets held, more than the pool's {REDIS_POOL_BOUND}")
    rest_start, rest_quiet = _outside_pools(start), _outside_pools(quiet)
    lines.append(
        f"  fds: start {start.fds}, peak {max(s.fds for s in samples)}, after the quiet period "
        f"{quiet.fds}; outside the upstream and Redis pools: {rest_start} -> {rest_quiet}"
    )
    if rest_quiet > rest_start + FD_SLACK:
        failed.append(f"file descriptors outside the connection pools grew {rest_start} -> {rest_quiet}")
    lines.append(f"  SIGTERM at the end: exit {figures.exit_code} after {figures.exit_seconds:.2f}s")
    if figures.exit_code not in CLEAN_EXIT:
        failed.append(f"the proxy exited with {figures.exit_code} on SIGTERM")
    return lines, failed


def _outside_pools(s: Sample) -> int:
    return s.fds - s.sockets["upstream"] - s.sockets["redis"] - s.sockets["dead-upstream"] - s.sockets["dead-redis"]


def summarize(run: Run, figures: Figures) -> tuple[str, list[str]]:
    """The summary text and the failed checks."""
    args = run.args
    lines = [
        f"fallback-proxy soak: {args.clients} clients, {args.minutes:g} min, seed {args.seed}, "
        f"deadline {args.deadline:g}s, quiet {args.quiet:g}s  (logs: {run.workdir})",
        "",
    ]
    lines += [*requests_section(run, figures.log["outcomes"]), "", *chaos_section(run, figures), ""]
    quota_lines, failed = quota_section(figures)
    process_lines, process_failed = process_section(run, figures)
    lines += [*quota_lines, "", *process_lines, ""]
    violations = sum(1 for r in run.results if r.outcome == "violation")
    if violations:
        failed.insert(0, f"{violations} requests ended in a violation")
    if figures.log["tracebacks"] or figures.log["errors"]:
        failed.append(
            f"the proxy logged {figures.log['tracebacks']} tracebacks and {len(figures.log['errors'])} error lines"
        )
    failed += process_failed
    if not figures.metrics.get("fallback_proxy_quota_exhausted_total"):
        lines.append("note: the small quota was never exhausted (lower --small-quota)")
    lines += [f"FAIL: {check}" for check in failed] or ["PASS: every check"]
    return "\n".join(lines), failed
