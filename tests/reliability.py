"""Figures of the reliability and security suite (issue 11), collected across test modules.

Each fuzzing, fault-injection, isolation or load check calls :func:`report` with what it
tried and what went wrong. In a normal pytest run the figures are only kept in memory; when
``EXCHANGE_RELIABILITY_REPORT_DIR`` is set (``make reliability`` sets it), each call also
appends one JSON line to ``<dir>/figures.ndjson`` so the runner can print one summary table.

``EXCHANGE_RELIABILITY=full`` asks the checks for their long mode (more iterations, more
examples); without it they run the short mode that fits the CI budget.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

#: Counters the summary table knows; a check reports those it measures (others stay 0).
FIGURES = (
    "inputs",  # inputs tried (fuzz cases, requests, iterations)
    "crashes",  # unexpected exceptions / tracebacks / dead processes
    "server_errors",  # HTTP 5xx answers
    "leaks",  # data shown to someone who may not see it
    "lost",  # acknowledged-but-lost or half-written data visible
    "audit_gaps",  # requests without their AuditEvent, chain breaks
    "load_errors",  # failed requests under load
)

_lock = threading.Lock()
_collected: list[dict[str, Any]] = []


def full() -> bool:
    """True when the long mode was asked for."""
    return os.environ.get("EXCHANGE_RELIABILITY", "").lower() == "full"


def iterations(short: int, long: int) -> int:
    """How many times to repeat a check in the current mode."""
    return long if full() else short


def report(suite: str, **figures: Any) -> None:
    """Record one check's figures (counts from FIGURES, plus any extra named values)."""
    record = {"suite": suite, **{name: 0 for name in FIGURES}, **figures}
    with _lock:
        _collected.append(record)
        directory = os.environ.get("EXCHANGE_RELIABILITY_REPORT_DIR")
        if directory:
            path = Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            with (path / "figures.ndjson").open("a", encoding="utf-8") as out:
                out.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def collected() -> list[dict[str, Any]]:
    """What this process reported so far (for tests of the runner)."""
    with _lock:
        return list(_collected)
