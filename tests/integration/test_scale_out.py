"""Several hub processes (and several node processes) on one PostgreSQL database, as behind
a load balancer: one linear audit chain, one resource per conditional update, and outbox
delivery exactly once in effect."""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import Engine, text

from exchange.database import make_engine
from exchange.federation import LocalFederation, NodeSpec
from exchange.node.outbox import PUBLISH, Outbox
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests import pg
from tests.dicomdata import generated

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(pg.unavailable_reason() is not None, reason=pg.unavailable_reason() or ""),
    pytest.mark.skipif(pg.requested(), reason="on PostgreSQL already (its own server)"),
]

SPEC = NodeSpec("site-s", "org-s", "tenant-s")
FHIR = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass
class World:
    federation: LocalFederation
    hubs: list[str]
    idp: DevIdentityProvider
    hub_db: Engine
    node_db: Engine
    databases: pg.Databases

    def headers(self, sub: str, role: str, org: str) -> dict[str, str]:
        token = self.idp.issue(sub=sub, role=role, org=org)
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR}

    def scalar(self, sql: str, **params: object) -> int:
        with self.hub_db.connect() as conn:
            return int(conn.execute(text(sql), params).scalar_one())


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    databases = pg.Databases()
    try:
        hub_url, node_url = databases.create("hub"), databases.create("node")
        root = Path(tempfile.mkdtemp(prefix="exchange-scale-"))
        federation = LocalFederation(
            root,
            [SPEC],
            hub_env={"EXCHANGE_DATABASE_URL": hub_url},
            node_env={"EXCHANGE_DATABASE_URL": node_url, "EXCHANGE_OUTBOX_POLL_SECONDS": "0.2"},
        )
        with federation:
            # A second hub and a second node process, each sharing its twin's database,
            # keys and public URL.
            second_hub = federation.replica("hub", "hub-2")
            federation.replica(SPEC.node_id, "site-s-2")
            hub = federation.hub
            idp = DevIdentityProvider(
                f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange"
            )
            hub_db, node_db = make_engine(hub_url), make_engine(node_url)
            try:
                yield World(federation, [hub.url, second_hub.url], idp, hub_db, node_db, databases)
            finally:
                hub_db.dispose()
                node_db.dispose()
    finally:
        databases.close()


def _concurrently(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    start = threading.Barrier(min(len(calls), 16))

    def run(call: Callable[[], httpx.Response]) -> httpx.Response:
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=10)
        return call()

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(run, calls))


def _records(world: World) -> int:
    out = world.federation.exchange("hub", "audit", "verify")
    found = re.match(r"audit chain intact: (\d+) records", out)
    assert found, out
    return int(found.group(1))


def test_both_hubs_serve_one_index(world: World):
    operator = world.headers("op", "operator", "hie")
    created = httpx.post(
        f"{world.hubs[0]}/fhir/Organization",
        headers=operator,
        json={"resourceType": "Organization", "name": "Scale"},
    )
    assert created.status_code == 201
    read = httpx.get(f"{world.hubs[1]}/fhir/Organization/{created.json()['id']}", headers=operator)
    assert read.json()["name"] == "Scale"


def test_nul_characters_and_searches_matching_nobody_on_postgresql(world: World):
    """Two bugs the suite found on PostgreSQL (text cannot hold NUL): both are clean now."""
    operator = world.headers("op", "operator", "hie")
    nul = httpx.get(f"{world.hubs[1]}/fhir/Patient", params={"name": "a\0b"}, headers=operator)
    assert nul.status_code == 400
    assert "NUL" in nul.json()["issue"][0]["diagnostics"]
    nobody = httpx.get(
        f"{world.hubs[0]}/fhir/Consent",
        params={"patient.identifier": "urn:example:mrn|nobody"},
        headers=operator,
    )
    assert nobody.status_code == 200
    assert nobody.json().get("entry", []) == []


def test_concurrent_audited_requests_to_both_hubs_keep_one_linear_chain(world: World):
    clinician = world.headers("dr-scale", "clinician", "org-s")

    def search(hub: str) -> httpx.Response:
        return httpx.get(
            f"{hub}/fhir/ImagingStudy",
            params={"patient": "Patient/nobody"},
            headers=clinician,
            timeout=60,
        )

    def head() -> int:
        return world.scalar("SELECT seq FROM audit_head WHERE id = 1")

    before = head()
    assert search(world.hubs[0]).status_code == 200
    per_request = head() - before
    assert per_request >= 1  # every search is audited

    requests = 60
    start = head()
    answers = _concurrently([lambda i=i: search(world.hubs[i % 2]) for i in range(requests)])
    assert Counter(a.status_code for a in answers) == {200: requests}
    assert head() - start == requests * per_request
    # verify walks seq 1..head: no gap, no fork (one link per seq), every hash chains on.
    assert _records(world) == head() == world.scalar("SELECT count(*) FROM audit_chain")


def _study(uid: str, patient: str) -> dict:
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "started": "2026-03-10",
        "modality": [{"system": DCM, "code": "CT"}],
        "endpoint": [{"reference": "Endpoint/site-x"}],
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [
            {
                "uid": f"{uid}.1",
                "modality": {"system": DCM, "code": "CT"},
                "instance": [
                    {
                        "uid": f"{uid}.1.1",
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
                        },
                    }
                ],
            }
        ],
    }


def test_concurrent_conditional_updates_through_both_hubs_leave_one_resource(world: World):
    site = world.headers("site-x", "system", "org-x")
    endpoint = {
        "resourceType": "Endpoint",
        "id": "site-x",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "managingOrganization": {"reference": "Organization/org-x"},
        "payloadType": [{"text": "DICOM"}],
        "address": "https://site-x.example.org/dicomweb",
    }
    put = httpx.put(f"{world.hubs[0]}/fhir/Endpoint/site-x", json=endpoint, headers=site)
    assert put.status_code in (200, 201), put.text

    mrn = "urn:exchange:site-x:mrn|X-RACE"
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:exchange:site-x:mrn", "value": "X-RACE"}],
        "managingOrganization": {"reference": "Organization/org-x"},
        "name": [{"family": "Synthetic", "given": ["Race"]}],
    }
    patients = _concurrently(
        [
            lambda i=i: httpx.put(
                f"{world.hubs[i % 2]}/fhir/Patient?identifier={mrn}",
                json=patient,
                headers=site,
                timeout=60,
            )
            for i in range(8)
        ]
    )
    assert sorted(p.status_code for p in patients) == [200] * 7 + [201], [
        p.text for p in patients if p.status_code not in (200, 201)
    ]
    patient_id = next(p.json()["id"] for p in patients if p.status_code == 201)
    assert {p.json()["id"] for p in patients} == {patient_id}

    uid = "1.2.826.0.1.3680043.10.1386.777.1"
    body = _study(uid, patient_id)
    studies = _concurrently(
        [
            lambda i=i: httpx.put(
                f"{world.hubs[i % 2]}/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}",
                json=body,
                headers=site,
                timeout=60,
            )
            for i in range(16)
        ]
    )
    assert sorted(s.status_code for s in studies) == [200] * 15 + [201], [
        s.text for s in studies if s.status_code not in (200, 201)
    ]
    assert {s.json()["meta"]["versionId"] for s in studies} == {"1"}
    assert (
        world.scalar(
            "SELECT count(*) FROM fhir_resource WHERE rtype = 'ImagingStudy' AND body LIKE :uid",
            uid=f'%urn:oid:{uid}"%',
        )
        == 1
    )
    assert (
        world.scalar(
            "SELECT count(*) FROM fhir_resource WHERE rtype = 'Patient' AND body LIKE '%X-RACE%'"
        )
        == 1
    )


def test_two_node_processes_on_one_database_publish_each_study_once(world: World, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    uids = set()
    for n in range(3):
        for index, data in enumerate(generated(patient_id=f"S-{n}", accession=f"S{n}", slices=2)):
            (folder / f"{n}-{index}.dcm").write_bytes(data)
            uids.add(pydicom.dcmread(folder / f"{n}-{index}.dcm").StudyInstanceUID)
    assert "6 stored" in world.federation.import_into(SPEC.node_id, folder)

    def published() -> dict[str, int]:
        return {
            uid: world.scalar(
                "SELECT count(*) FROM fhir_resource WHERE rtype = 'ImagingStudy' "
                "AND NOT deleted AND body LIKE :uid",
                uid=f'%urn:oid:{uid}"%',
            )
            for uid in uids
        }

    deadline = time.monotonic() + 60
    while (
        any(count == 0 for count in published().values()) or _outbox_rows(world.node_db)
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert published() == dict.fromkeys(uids, 1)
    assert _outbox_rows(world.node_db) == 0
    with world.hub_db.connect() as conn:
        versions = conn.execute(
            text("SELECT version FROM fhir_resource WHERE rtype = 'ImagingStudy' AND body LIKE :p"),
            {"p": "%S-_%"},
        ).scalars()
        assert set(versions) <= {1}


def _outbox_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox")).scalar_one())


def test_outbox_claims_from_two_processes_never_overlap(world: World):
    """Workers of two node processes (an engine each) take every due row exactly once."""
    url = world.databases.create("outbox")
    engines = [make_engine(url), make_engine(url)]
    boxes = [Outbox(engine) for engine in engines]
    rows = 200
    for start in range(0, rows, 50):
        boxes[0].enqueue(
            "t", {f"study-{i:04d}": b"sealed" for i in range(start, start + 50)}, PUBLISH
        )
    claimed: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def worker(box: Outbox) -> None:
        go.wait()
        while True:
            due = box.due(limit=10)
            if not due:
                return
            for entry in due:
                if box.claim(entry):
                    with lock:
                        claimed.append(entry.study_key)

    threads = [threading.Thread(target=worker, args=(boxes[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert len(claimed) == rows
    assert Counter(claimed).most_common(1)[0][1] == 1
