"""An in-process hub (real app, real SQLite data directory, real policy engine) for fuzzing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import text

from exchange.config import load_settings
from exchange.hub.app import create_app
from exchange.hub.services import HubServices

BASE = "http://hub-fz.test"


@dataclass
class Hub:
    client: TestClient
    services: HubServices
    operator: str
    clinician: str

    def count(self, rtype: str | None = None) -> int:
        """Resources stored (all versions), of one type or of all but the audit trail."""
        query = "SELECT count(*) FROM fhir_resource WHERE " + (
            "rtype = :t" if rtype else "rtype != 'AuditEvent'"
        )
        with self.services.engine.connect() as conn:
            return int(conn.execute(text(query), {"t": rtype}).scalar_one())


@contextmanager
def running_hub(root: Path) -> Iterator[Hub]:
    settings = load_settings(data_dir=root, dev_mode=True, dev_idp=True, public_url=BASE)
    app = create_app(settings)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        services: HubServices = app.state.services
        assert services.idp is not None
        operator = services.idp.issue(sub="op-fz", role="operator", org=None)
        clinician = services.idp.issue(sub="dr-fz", role="clinician", org="org-a")
        yield Hub(client, services, operator, clinician)
