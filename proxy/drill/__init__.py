"""`fallback-proxy drill`: switch providers off on purpose and prove the
fallback answers.

Two ways to run it: in-process (``--config``: the real app on a free local
port, with the config's real providers) or against a running proxy (``--url``:
its admin endpoints switch providers off and, whatever happens, on again).
Either way the drill sends ordinary chat requests through the real routing
and reports who answered, after which fallbacks, how fast, and whether a
switched-off provider ever answered (the one thing a drill must never see).

The decisions (parsing headers, summaries, the exit code, the report) are pure
functions over :class:`Result` records; only ``ask``, ``drill_in_process`` and
``drill_remote`` do I/O.
"""

from __future__ import annotations

from proxy.drill.report import (
    ADMIN_TIMEOUT,
    DEFAULT_PROMPT,
    DEFAULT_REQUESTS,
    DEFAULT_SLA_MS,
    EXIT_FAILED,
    EXIT_NOT_RUN,
    EXIT_PASSED,
    REASON,
    SETTLE_SECONDS,
    DrillAttempt,
    DrillError,
    Plan,
    Report,
    Result,
    RouteSummary,
    attempts_of,
    exit_code,
    leak_lines,
    leaks,
    parse_fallbacks,
    render_json,
    render_text,
    sla_held,
    summarize,
)
from proxy.drill.runner import (
    Remote,
    ask,
    drill_in_process,
    drill_remote,
    isolated,
    run,
    run_requests,
)

__all__ = [
    "ADMIN_TIMEOUT",
    "DEFAULT_PROMPT",
    "DEFAULT_REQUESTS",
    "DEFAULT_SLA_MS",
    "EXIT_FAILED",
    "EXIT_NOT_RUN",
    "EXIT_PASSED",
    "REASON",
    "SETTLE_SECONDS",
    "DrillAttempt",
    "DrillError",
    "Plan",
    "Remote",
    "Report",
    "Result",
    "RouteSummary",
    "ask",
    "attempts_of",
    "drill_in_process",
    "drill_remote",
    "exit_code",
    "isolated",
    "leak_lines",
    "leaks",
    "parse_fallbacks",
    "render_json",
    "render_text",
    "run",
    "run_requests",
    "sla_held",
    "summarize",
]
