"""The OPA server path fails closed: a stopped engine or garbage answers never allow.

A minimal OPA Data API (tests/opa_stub.py, over the embedded engine) serves real HTTP
on loopback: once as a separate process, once in a thread whose answers are spoiled
on purpose. Each failure mode is measured on 1,000 decisions: none may be an allow.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from exchange.policy.decisions import DecisionInput, ResourceFacts, Subject, decide, decide_batch
from exchange.policy.engine import EmbeddedEngine, PolicyError, ServerEngine
from tests.opa_stub import OpaStub

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "policies"
REQUESTS = 1000

#: Allowed by the policy when it answers: a failure must turn these into denies.
ALLOWED = [
    DecisionInput(
        Subject("dr-ada", "clinician", "site-a", ("TREAT",)),
        "view",
        ResourceFacts(study="s1", custodian="site-a", patients=("p1",)),
        (),
        datetime(2026, 6, 1, tzinfo=UTC),
    ),
    DecisionInput(
        Subject("dr-bo", "clinician", "site-b", ("TREAT",)),
        "search",
        ResourceFacts(study="s2", custodian="site-a", patients=("p1",), date="20260310"),
        (),
        datetime(2026, 6, 1, tzinfo=UTC),
    ),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def stub_process() -> Iterator[str]:
    """The stub as its own process, as an OPA server would be."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.opa_stub", "--policy-dir", str(POLICY_DIR)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def stub() -> Iterator[OpaStub]:
    with OpaStub(POLICY_DIR) as running:
        yield running


def test_server_path_answers_like_the_embedded_engine(stub_process: str):
    server = ServerEngine(stub_process, timeout=5)
    server.check()
    embedded = EmbeddedEngine(POLICY_DIR)
    for question in ALLOWED:
        there, here = decide(server, question), decide(embedded, question)
        assert there.allow
        assert here.allow
        assert (there.reasons, there.policy_version) == (here.reasons, here.policy_version)
    batch = decide_batch(server, ALLOWED * 50)
    assert all(d.allow for d in batch)


def test_stopped_engine_allows_nothing():
    server = ServerEngine(f"http://127.0.0.1:{_free_port()}", timeout=1)
    with pytest.raises(PolicyError, match="unreachable"):
        server.check()
    decisions = [decide(server, ALLOWED[n % 2]) for n in range(REQUESTS)]
    assert sum(d.allow for d in decisions) == 0
    assert all("OPA server is unreachable" in d.reason() for d in decisions)
    assert not any(d.allow for d in decide_batch(server, ALLOWED * 50))


def test_engine_stopping_midway_allows_nothing_after(stub: OpaStub):
    server = ServerEngine(stub.url, timeout=1)
    assert decide(server, ALLOWED[0]).allow
    stub.stop()
    decisions = [decide(server, ALLOWED[n % 2]) for n in range(REQUESTS)]
    assert sum(d.allow for d in decisions) == 0


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("text", "not JSON"),
        ("yes", "no yes-or-no answer"),
        ("undefined", "is undefined"),
        ("error", "HTTP 500"),
    ],
)
def test_garbage_answers_allow_nothing(stub: OpaStub, mode: str, why: str):
    server = ServerEngine(stub.url, timeout=2)
    stub.mode = mode
    decisions = [decide(server, ALLOWED[n % 2]) for n in range(REQUESTS)]
    assert stub.requests == REQUESTS
    assert sum(d.allow for d in decisions) == 0
    assert all(why in d.reason() for d in decisions), decisions[0].reason()
    batch = decide_batch(server, ALLOWED * 50)
    assert not any(d.allow for d in batch)
    with pytest.raises(PolicyError):
        server.check()


def test_a_slow_engine_times_out_to_a_deny(stub: OpaStub):
    server = ServerEngine(stub.url, timeout=0.2)
    stub.mode, stub.delay = "slow", 1.0
    decision = decide(server, ALLOWED[0])
    assert not decision.allow
    assert "did not answer within 0.2 s" in decision.reason()
