"""Shared fuzzing machinery: hypothesis settings per mode, example tallies, the corpus.

Two modes (``tests/reliability.py``): the short "ci" one, derandomised so that a run
is reproducible and keeps the whole package under a minute on two cores, and the long
one (``EXCHANGE_RELIABILITY=full``) with many more, random, examples. Neither keeps a
hypothesis example database: a failure found once is made a named regression test in
``test_regressions.py`` instead, so CI never depends on local state.

Each fuzz target counts the inputs it tried and the ones that escaped with an
undeclared exception (a crash) in a ``Tally``; the tallies are reported to
``tests.reliability`` once per target at the end of the session.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hypothesis import HealthCheck, settings

from tests import reliability

CORPUS = Path(__file__).parent / "corpus"

#: Examples in the long mode for each example of the short one.
FULL_FACTOR = 10

_SUPPRESSED = (
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.function_scoped_fixture,
    HealthCheck.large_base_example,
)
settings.register_profile(
    "exchange-fuzz-ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "exchange-fuzz-full",
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)


def fuzz(examples: int) -> settings:
    """Settings for one fuzz test: ``examples`` in the short mode, ``FULL_FACTOR`` times more
    in the long one.

    Not a loaded profile: other suites (schemathesis) use hypothesis in the same run.
    """
    full = reliability.full()
    parent = settings.get_profile("exchange-fuzz-full" if full else "exchange-fuzz-ci")
    return settings(parent=parent, max_examples=examples * FULL_FACTOR if full else examples)


@dataclass
class Tally:
    """Inputs tried and crashes (undeclared exceptions) of one fuzz target."""

    target: str
    inputs: int = 0
    crashes: int = 0
    #: Extra counts worth reporting (e.g. how many inputs were accepted).
    extra: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str) -> None:
        with self._lock:
            self.extra[name] = self.extra.get(name, 0) + 1

    @contextmanager
    def example(self) -> Iterator[None]:
        """Count one input; an exception escaping it counts as a crash (and propagates)."""
        with self._lock:
            self.inputs += 1
        _current.tally = self
        try:
            yield
        except Exception:
            with self._lock:
                self.crashes += 1
            raise
        finally:
            _current.tally = None


_tallies: dict[str, Tally] = {}
_current = threading.local()


def no_server_error(response: httpx.Response) -> None:
    """Assert an HTTP answer is not a 5xx, counting it (``server_errors``) if it is."""
    if response.status_code >= 500:
        current: Tally | None = getattr(_current, "tally", None)
        if current is not None:
            current.count("server_errors")
    assert response.status_code < 500, response.text[:2000]


def tally(target: str) -> Tally:
    """The tally of ``target`` (``fuzz:<target>`` in the report), shared by its tests."""
    name = f"fuzz:{target}"
    return _tallies.setdefault(name, Tally(name))


def report_all() -> None:
    """Report every target that ran, once (at the end of the session)."""
    for item in _tallies.values():
        if item.inputs:
            reliability.report(item.target, inputs=item.inputs, crashes=item.crashes, **item.extra)
            item.inputs = item.crashes = 0
            item.extra = {}


def corpus(kind: str) -> list[Path]:
    """The seed files of one kind (a folder under ``corpus/``), in a stable order."""
    return sorted(p for p in (CORPUS / kind).iterdir() if p.is_file())
