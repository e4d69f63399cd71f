"""Fixtures of the fuzz package: the figures are reported once, at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.harness import report_all


@pytest.fixture(scope="session", autouse=True)
def _fuzz_figures() -> Iterator[None]:
    yield
    report_all()
