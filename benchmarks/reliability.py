"""The reliability and security suite in full, with one summary table (issue 11).

Run:  make reliability      (or .venv/bin/python benchmarks/reliability.py [--load-seconds N])

1. pytest in full mode (``EXCHANGE_RELIABILITY=full``) over the suite's modules: the
   paths in ``SUITE_PATHS`` that exist, plus every test module under ``tests/`` marked
   ``reliability`` (``pytest.mark.reliability``), so new checks join by carrying the mark;
2. ``benchmarks/load.py`` (16 viewers against a hub and two nodes, then Orthanc);
3. one table from ``<report dir>/figures.ndjson``, where every check wrote its figures
   (``tests/reliability.py``): a row per suite, with inputs tried, crashes, 5xx, leaks,
   acknowledged-but-lost, audit gaps, load errors and load throughput against Orthanc.

Exit status: 0 only when pytest and the load run succeeded, something was reported, and
every count in the table is 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The suite's modules by path (those not written yet are skipped); marked modules join too.
SUITE_PATHS = (
    "tests/fuzz",
    "tests/faults",
    "tests/integration/test_isolation_matrix.py",
    "tests/integration/test_api_fuzz*.py",
)
MARK = "pytest.mark.reliability"
FIGURES_FILE = "figures.ndjson"
#: Table columns: (figure in the records, heading). All are counts that must be 0.
COUNTS = (
    ("crashes", "crashes"),
    ("server_errors", "5xx"),
    ("leaks", "leaks"),
    ("lost", "lost"),
    ("audit_gaps", "audit gaps"),
    ("load_errors", "load errors"),
)


@dataclass
class Row:
    suite: str
    inputs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in COUNTS})
    throughput: float | None = None
    orthanc_throughput: float | None = None
    p99_ms: float | None = None
    note: str | None = None

    @property
    def failed(self) -> bool:
        return any(self.counts.values())

    def versus_orthanc(self) -> str:
        if self.throughput is None:
            return ""
        ours = f"{self.throughput:.1f}/s"
        if self.p99_ms is not None:
            ours += f" (p99 {self.p99_ms:.0f} ms)"
        if not self.orthanc_throughput:
            return f"{ours} vs orthanc n/a"
        ratio = self.throughput / self.orthanc_throughput
        return f"{ours} vs {self.orthanc_throughput:.1f}/s ({ratio:.2f}x)"


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def read_figures(path: Path) -> list[dict[str, Any]]:
    """The records in ``figures.ndjson`` (a line that is not JSON is skipped, and said)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}:{number}: not JSON, skipped", file=sys.stderr)
            continue
        if isinstance(record, dict) and record.get("suite"):
            records.append(record)
    return records


def summarise(records: Iterable[dict[str, Any]]) -> list[Row]:
    """One row per suite, counts summed over its records, in order of first appearance."""
    rows: dict[str, Row] = {}
    for record in records:
        suite = str(record["suite"])
        row = rows.setdefault(suite, Row(suite))
        row.inputs += _int(record.get("inputs"))
        for name, _heading in COUNTS:
            row.counts[name] += _int(record.get(name))
        if record.get("throughput") is not None:
            row.throughput = float(record["throughput"])
            orthanc = record.get("orthanc_throughput")
            row.orthanc_throughput = float(orthanc) if orthanc is not None else None
            row.p99_ms = float(record["p99_ms"]) if record.get("p99_ms") is not None else None
            row.note = record.get("orthanc_note") or row.note
    return list(rows.values())


def table(rows: Sequence[Row]) -> str:
    """The summary as a plain-text table, with a total row."""
    headings = ["suite", "inputs", *(h for _n, h in COUNTS), "throughput vs orthanc"]
    body = [
        [
            row.suite,
            str(row.inputs),
            *(str(row.counts[name]) for name, _h in COUNTS),
            row.versus_orthanc(),
        ]
        for row in rows
    ]
    total = [
        "total",
        str(sum(r.inputs for r in rows)),
        *(str(sum(r.counts[name] for r in rows)) for name, _h in COUNTS),
        "",
    ]
    lines = [headings, *body, total]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headings))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:-1], widths[1:-1], strict=True)]
        return "  ".join([first, *rest, cells[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [render(headings), rule, *(render(line) for line in body), rule, render(total)]
    notes = [f"note ({row.suite}): {row.note}" for row in rows if row.note]
    return "\n".join(out + notes)


def verdict(rows: Sequence[Row], steps: dict[str, int]) -> tuple[int, list[str]]:
    """Exit status and the reasons for a failure: a step that failed, no figures at all,
    or any count above 0."""
    reasons = [f"{step} exited with {code}" for step, code in steps.items() if code != 0]
    if not rows:
        reasons.append("no figures were reported")
    for row in rows:
        for name, heading in COUNTS:
            if row.counts[name]:
                reasons.append(f"{row.suite}: {heading} = {row.counts[name]}")
    return (1 if reasons else 0), reasons


def suite_paths(root: Path = ROOT) -> list[str]:
    """The suite's test paths that exist now, and every test module marked ``reliability``."""
    found: list[str] = []
    for pattern in SUITE_PATHS:
        found += sorted(glob.glob(str(root / pattern)))
    for module in sorted((root / "tests").rglob("test_*.py")):
        if any(str(module).startswith(path) for path in found):
            continue
        try:
            if MARK in module.read_text(encoding="utf-8", errors="replace"):
                found.append(str(module))
        except OSError:
            continue
    return [os.path.relpath(path, root) for path in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--report-dir", type=Path, help="where figures.ndjson goes (default: a new temp dir)"
    )
    parser.add_argument("--load-seconds", type=float, default=60.0, help="load duration")
    parser.add_argument("--no-load", action="store_true", help="skip benchmarks/load.py")
    parser.add_argument("--short", action="store_true", help="the short (CI) mode of the tests")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)

    report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="exchange-reliability-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = report_dir / FIGURES_FILE
    figures.unlink(missing_ok=True)
    env = {**os.environ, "EXCHANGE_RELIABILITY_REPORT_DIR": str(report_dir.resolve())}
    if not args.short:
        env["EXCHANGE_RELIABILITY"] = "full"
    paths = suite_paths()
    steps: dict[str, int] = {}
    print(f"reliability suite: {' '.join(paths)}; figures in {figures}", flush=True)
    if paths:
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *paths]
        steps["pytest"] = subprocess.call([*command, *args.pytest_args], cwd=ROOT, env=env)
    if not args.no_load:
        load = [sys.executable, str(ROOT / "benchmarks" / "load.py")]
        load += ["--seconds", str(args.load_seconds)]
        steps["load benchmark"] = subprocess.call(load, cwd=ROOT, env=env)

    rows = summarise(read_figures(figures))
    print("\nReliability and security suite: summary\n")
    print(table(rows))
    status, reasons = verdict(rows, steps)
    print("\nPASS: every count is 0" if status == 0 else "\nFAIL: " + "; ".join(reasons))
    return status


if __name__ == "__main__":
    sys.exit(main())
