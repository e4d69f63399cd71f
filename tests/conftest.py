"""Shared fixtures: a real federation (hub + nodes as processes on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange import federation as federation_module
from exchange.federation import LocalFederation, NodeSpec

SITES = [
    NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a"),
    NodeSpec(node_id="site-b", organization="org-b", tenant="tenant-b"),
]

_federations: list[LocalFederation] = []


@pytest.fixture(scope="session", autouse=True)
def _test_database() -> Iterator[None]:
    """EXCHANGE_TEST_DATABASE=postgresql: every federation's hub and nodes get their own
    database on one throwaway PostgreSQL server for the session (started when first needed)."""
    from tests import pg

    if not pg.requested():
        yield
        return
    reason = pg.unavailable_reason()
    if reason is not None:  # asked for PostgreSQL: failing beats passing on SQLite unnoticed
        pytest.exit(f"{pg.SWITCH}=postgresql, but {reason}", returncode=2)
    databases = pg.Databases()
    federation_module.database_provider = databases.create
    try:
        yield
    finally:
        federation_module.database_provider = None
        databases.close()


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A hub (development IdP on) and two site nodes, shared by the session's tests."""
    root: Path = tmp_path_factory.mktemp("federation")
    fed = LocalFederation(root=root, nodes=SITES)
    fed.start()
    _federations.append(fed)
    try:
        yield fed
    finally:
        fed.stop()
        _federations.remove(fed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Show the federation's logs beside a failing test that used it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _federations:
        report.sections.append(("federation logs", _federations[-1].logs()))
