"""The same hub and node code on a real PostgreSQL server."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import httpx
import pytest

from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests.dicomdata import generated
from tests.pg import postgres_server, unavailable_reason

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
]


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


def test_hub_and_node_run_on_postgresql(pg_url):
    root = Path(tempfile.mkdtemp(prefix="exchange-pgfed-"))
    spec = NodeSpec("site-p", "org-p", "tenant-p")
    with LocalFederation(
        root,
        [spec],
        hub_env={"EXCHANGE_DATABASE_URL": pg_url},
        node_env={"EXCHANGE_DATABASE_URL": pg_url},
    ) as federation:
        for service in federation.services.values():
            ready = httpx.get(f"{service.url}/readyz")
            assert ready.status_code == 200, ready.text

        hub = federation.hub
        idp = DevIdentityProvider(
            f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange"
        )
        headers = {
            "Authorization": f"Bearer {idp.issue(sub='op', role='operator', org='hie')}",
            "Content-Type": "application/fhir+json",
        }
        created = httpx.post(
            f"{hub.url}/fhir/Organization",
            headers=headers,
            content=json.dumps({"resourceType": "Organization", "name": "PG"}),
        )
        assert created.status_code == 201
        read = httpx.get(f"{hub.url}/fhir/Organization/{created.json()['id']}", headers=headers)
        assert read.json()["name"] == "PG"

        folder = root / "in"
        folder.mkdir()
        for index, data in enumerate(generated(patient_id="PG-1", accession="PG", slices=2)):
            (folder / f"{index}.dcm").write_bytes(data)
        assert "2 stored" in federation.import_into("site-p", folder)
        assert "2 already present" in federation.import_into("site-p", folder)


def test_store_on_postgresql_keeps_tenants_apart(pg_url, tmp_path):
    from exchange.database import make_engine
    from exchange.node.store import InstanceStore
    from exchange.security.keystore import FileKeyStore, master_key

    engine = make_engine(pg_url)
    keys = FileKeyStore(tmp_path / "k", master_key(None, tmp_path / "m"), ["x", "y"])
    store = InstanceStore(engine, tmp_path / "blobs", keys, 10 * 1024 * 1024)
    data = generated(patient_id="PG-2", accession="PG2")[0]
    result = store.store("x", io.BytesIO(data))
    assert [v.sop_uid for v in store.instances("x", study_uid=result.study_uid)] == [result.sop_uid]
    assert store.instances("y") == []
    out = io.BytesIO()
    store.copy_out("x", result.sop_uid, out)
    assert out.getvalue()[128:] == data[128:]
    engine.dispose()
