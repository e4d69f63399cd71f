"""Run the Rego ``test_`` rules beside the policies and measure their line coverage."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from exchange.errors import ConfigurationError
from exchange.policy.engine import _first_line, load_bundle

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.M)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.M)


@dataclass(frozen=True)
class RegoTest:
    file: str
    package: str
    name: str
    passed: bool
    problem: str = ""

    @property
    def id(self) -> str:
        return f"{self.file}::{self.name}"


@dataclass(frozen=True)
class FileCoverage:
    path: str
    covered: int
    not_covered: tuple[int, ...]

    @property
    def lines(self) -> int:
        return self.covered + len(self.not_covered)

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / self.lines if self.lines else 100.0


@dataclass(frozen=True)
class TestReport:
    version: str
    tests: tuple[RegoTest, ...]
    coverage: tuple[FileCoverage, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> tuple[RegoTest, ...]:
        return tuple(t for t in self.tests if not t.passed)

    @property
    def percent(self) -> float:
        """Line coverage of the policies (test files apart), over all of them."""
        lines = sum(f.lines for f in self.coverage)
        return 100.0 * sum(f.covered for f in self.coverage) / lines if lines else 0.0


def discover(sources: tuple[tuple[str, str], ...]) -> list[tuple[str, str, str]]:
    """(file, package, rule) for every ``test_`` rule in the test files."""
    found = []
    for name, text in sources:
        package = _PACKAGE.search(text)
        if package is None:
            continue
        found += [
            (name, package.group(1), rule) for rule in dict.fromkeys(_TEST_RULE.findall(text))
        ]
    return found


def run_tests(policy_dir: Path) -> TestReport:
    """Compile the policies with their tests, run every ``test_`` rule, collect coverage."""
    bundle = load_bundle(policy_dir)
    try:
        engine = bundle.compile(include_tests=True, coverage=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # regorus raises RuntimeError, or a pyo3 panic
        raise ConfigurationError(
            f"policies in {policy_dir} do not load: {_first_line(exc)}"
        ) from None
    engine.set_input({})
    results = []
    for file, package, rule in discover(bundle.tests):
        try:
            value = engine.eval_rule(f"data.{package}.{rule}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # an error in a test is a failure, not a crash
            results.append(RegoTest(file, package, rule, False, _first_line(exc)))
            continue
        problem = "" if value is True else ("undefined" if value is None else f"gave {value!r}")
        results.append(RegoTest(file, package, rule, value is True, problem))
    report = json.loads(engine.get_coverage_report_as_json())
    seen = {f["path"]: f for f in report.get("files", [])}
    coverage = []
    for name, text in bundle.sources:
        if name in seen:
            file = seen[name]
            coverage.append(FileCoverage(name, len(file["covered"]), tuple(file["not_covered"])))
        else:  # never evaluated: regorus does not report it, so every statement line is missed
            coverage.append(FileCoverage(name, 0, _statement_lines(text)))
    return TestReport(bundle.version, tuple(results), tuple(coverage))


def _statement_lines(text: str) -> tuple[int, ...]:
    return tuple(
        n
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
        and not line.strip().startswith(("#", "package ", "import "))
        and line.strip() not in ("}", "]", ")")
    )
