"""The summary table and exit status of ``make reliability`` (benchmarks/reliability.py)."""

from __future__ import annotations

import json

from benchmarks.reliability import read_figures, suite_paths, summarise, table, verdict
from tests import reliability


def _records(tmp_path, monkeypatch, *reports):
    monkeypatch.setenv("EXCHANGE_RELIABILITY_REPORT_DIR", str(tmp_path))
    for suite, figures in reports:
        reliability.report(suite, **figures)
    return read_figures(tmp_path / "figures.ndjson")


def test_a_clean_run_sums_each_suite_into_one_row_and_passes(tmp_path, monkeypatch):
    records = _records(
        tmp_path,
        monkeypatch,
        ("faults:ingest", {"inputs": 3}),
        ("faults:ingest", {"inputs": 2}),
        ("fuzz:dicom", {"inputs": 1000}),
        ("load", {"inputs": 950, "throughput": 21.3, "orthanc_throughput": 42.6, "p99_ms": 910}),
    )
    rows = summarise(records)
    assert [r.suite for r in rows] == ["faults:ingest", "fuzz:dicom", "load"]
    assert rows[0].inputs == 5
    text = table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["suite", "inputs", "crashes"]
    assert "5xx" in lines[0]
    assert "audit gaps" in lines[0]
    assert "load errors" in lines[0]
    assert "21.3/s (p99 910 ms) vs 42.6/s (0.50x)" in text
    assert lines[-1].split()[:2] == ["total", "1955"]
    assert verdict(rows, {"pytest": 0, "load benchmark": 0}) == (0, [])


def test_any_count_above_zero_a_failed_step_or_no_figures_fail_the_run(tmp_path, monkeypatch):
    records = _records(
        tmp_path,
        monkeypatch,
        ("faults:audit", {"inputs": 50, "audit_gaps": 1}),
        ("isolation", {"inputs": 400, "leaks": 2, "server_errors": 1}),
        ("load", {"inputs": 10, "load_errors": 3, "throughput": 1.0, "orthanc_note": "missing"}),
    )
    rows = summarise(records)
    status, reasons = verdict(rows, {"pytest": 1, "load benchmark": 0})
    assert status == 1
    assert reasons == [
        "pytest exited with 1",
        "faults:audit: audit gaps = 1",
        "isolation: 5xx = 1",
        "isolation: leaks = 2",
        "load: load errors = 3",
    ]
    assert "1.0/s vs orthanc n/a" in table(rows)
    assert "note (load): missing" in table(rows)
    assert verdict([], {}) == (1, ["no figures were reported"])


def test_unreadable_lines_are_skipped_and_the_suite_is_found_by_path_or_mark(tmp_path):
    figures = tmp_path / "figures.ndjson"
    figures.write_text('{"suite": "x", "inputs": 1}\nnot json\n\n' + json.dumps({"a": 1}) + "\n")
    assert [r["suite"] for r in read_figures(figures)] == ["x"]
    assert read_figures(tmp_path / "missing.ndjson") == []

    (tmp_path / "tests" / "faults").mkdir(parents=True)
    (tmp_path / "tests" / "faults" / "test_a.py").write_text("")
    (tmp_path / "tests" / "other").mkdir()
    (tmp_path / "tests" / "other" / "test_marked.py").write_text(
        "import pytest\npytestmark = pytest.mark." + "reliability\n"
    )
    (tmp_path / "tests" / "other" / "test_plain.py").write_text("")
    assert suite_paths(tmp_path) == ["tests/faults", "tests/other/test_marked.py"]
