"""One federation for the kill -9 modules (a hub and two nodes), started once: each start
costs seconds, and each module restarts what it kills anyway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exchange.federation import LocalFederation
from tests.faults.harness import INGEST, PUBLISHING


@pytest.fixture(scope="package")
def faults_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("faults")
    # A short retry cap: after a hub restart the outbox should not sit out a long backoff.
    env = {"EXCHANGE_OUTBOX_RETRY_MAX_SECONDS": "1"}
    with LocalFederation(root, [INGEST, PUBLISHING], node_env=env) as federation:
        yield federation
