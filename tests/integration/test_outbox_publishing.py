"""Node -> hub publishing through the outbox, with a real hub and node (processes).

A study stored at the node appears once in the hub's index; more instances update
it; a hub outage loses and duplicates nothing; deleting at the node retracts it;
``exchange node reconcile`` repairs what went wrong meanwhile.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydicom
import pytest

from exchange.config import Settings, load_settings
from exchange.database import make_engine
from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation, NodeSpec
from exchange.node import outbox
from exchange.node.catalog import TenantSeal
from exchange.node.outbox import Outbox
from exchange.node.storage import data_dir, open_keys, service_name
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests.dicomdata import generated

pytestmark = pytest.mark.integration

SPEC = NodeSpec(node_id="site-p", organization="org-p", tenant="tenant-p")
MRN_SYSTEM = "urn:exchange:org-p:mrn"
DICOM_UID = "urn:dicom:uid"
FHIR = "application/fhir+json"
WAIT = 30.0
T = TypeVar("T")


class Site:
    """The federation, an operator at the hub and the site's API key at the node."""

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation
        self.hub = federation.hub.url
        self.node = federation.node(SPEC.node_id).url
        idp = DevIdentityProvider(
            f"{self.hub}/idp", load_or_create(key_path(federation.hub.data_dir)), "exchange"
        )
        self.operator = {
            "Authorization": f"Bearer {idp.issue(sub='op', role='operator', org='hie')}"
        }
        self.key = federation.api_key(SPEC.node_id)

    def studies(self, uid: str) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.hub}/fhir/ImagingStudy",
            params={"identifier": f"{DICOM_UID}|urn:oid:{uid}"},
            headers=self.operator,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return [e["resource"] for e in answer.json().get("entry", [])]

    def read(self, reference: str) -> httpx.Response:
        return httpx.get(f"{self.hub}/fhir/{reference}", headers=self.operator, timeout=30)

    def stow(self, instances: list[bytes]) -> None:
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                for data in instances
            )
            + f"--{boundary}--\r\n".encode()
        )
        answer = httpx.post(
            f"{self.node}/dicomweb/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Authorization": f"ApiKey {self.key}",
            },
            timeout=60,
        )
        assert answer.status_code == 200, answer.text

    def delete(self, uid: str, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"ApiKey {key or self.key}"} if key != "" else {}
        return httpx.delete(f"{self.node}/dicomweb/studies/{uid}", headers=headers, timeout=30)

    def reconcile(self, *args: str) -> str:
        return self.federation.exchange(SPEC.node_id, "node", "reconcile", *args)

    def _settings(self) -> Settings:
        env = self.federation.node(SPEC.node_id).env
        return load_settings(
            data_dir=Path(env["EXCHANGE_DATA_DIR"]),
            node_id=SPEC.node_id,
            tenants=json.loads(env["EXCHANGE_TENANTS"]),
            database_url=env.get("EXCHANGE_DATABASE_URL"),
        )

    def outbox(self) -> Outbox:
        """The node's outbox, opened beside the running node (same SQLite database)."""
        settings = self._settings()
        return Outbox(make_engine(settings.database(service_name(settings))))

    def seal(self) -> TenantSeal:
        settings = self._settings()
        return TenantSeal.of(open_keys(settings, data_dir(settings)), SPEC.tenant)


def eventually(check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("publishing")
    # Short retry cap: the outage test should not wait for a 30 s backoff.
    env = {"EXCHANGE_OUTBOX_RETRY_MAX_SECONDS": "2"}
    with LocalFederation(root, [SPEC], node_env=env) as federation:
        yield Site(federation)


def _uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


def test_a_stored_study_is_published_once_and_updated_in_place(site):
    first = generated(patient_id="PUB-MRN-1", accession="PUB-1", slices=4)
    uid = _uid(first[0])
    site.stow(first[:2])
    (study,) = eventually(lambda: site.studies(uid), "the study at the hub")
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 2)
    # Subject: a Patient carrying the site's MRN, managed by the site's organisation.
    assert study["subject"]["identifier"] == {"system": MRN_SYSTEM, "value": "PUB-MRN-1"}
    patient = site.read(study["subject"]["reference"]).json()
    assert {"system": MRN_SYSTEM, "value": "PUB-MRN-1"}.items() <= patient["identifier"][0].items()
    assert patient["managingOrganization"]["reference"] == "Organization/org-p"
    # Endpoint: the node's own, with the identifier the broker uses as the grant audience.
    (reference,) = [e["reference"] for e in study["endpoint"]]
    endpoint = site.read(reference).json()
    assert {"system": "urn:exchange:node", "value": SPEC.node_id} in endpoint["identifier"]
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["managingOrganization"]["reference"] == "Organization/org-p"
    assert endpoint["address"] == f"{site.node}/dicomweb"

    site.stow(first[2:])

    def updated() -> list[dict[str, Any]] | None:
        found = site.studies(uid)
        return found if found and found[0]["numberOfInstances"] == 4 else None

    (again,) = eventually(updated, "the study updated with the new instances")
    assert again["id"] == study["id"]
    assert again["meta"]["versionId"] == "2"
    # Sending the same study again (as after a lost acknowledgement) changes nothing.
    box, seal = site.outbox(), site.seal()
    key = seal.blind("study", uid)
    box.enqueue(SPEC.tenant, {key: outbox.seal_uid(seal, key, uid)}, outbox.PUBLISH)
    eventually(lambda: box.entries(SPEC.tenant) == [], "the resend delivered")
    (same,) = site.studies(uid)
    assert same["meta"]["versionId"] == "2"


def test_hub_down_during_an_import_of_20_studies_then_all_appear_exactly_once(site, tmp_path):
    folder = tmp_path / "twenty"
    uids = []
    for n in range(20):
        spec = StudySpec(
            patient_id=f"OUT-{n % 5}",
            patient_name=f"Outage^Patient{n % 5}",
            accession=f"OUTAGE-{n}",
            slices=1,
            size=16,
        )
        paths = write_study(spec, folder / f"s{n:02}")
        uids.append(_uid(paths[0].read_bytes()))
    site.federation.kill("hub")
    try:
        assert "20 stored" in site.federation.import_into(SPEC.node_id, folder)
        # The node stays ready: the outbox absorbs the outage.
        assert httpx.get(f"{site.node}/readyz", timeout=10).status_code == 200
        time.sleep(2)  # let the worker fail and back off at least once
    finally:
        site.federation.restart("hub")

    def all_there() -> dict[str, int] | None:
        counts = {uid: len(site.studies(uid)) for uid in uids}
        return counts if all(counts.values()) else None

    counts = eventually(all_there, "all 20 studies at the hub", timeout=60)
    assert set(counts.values()) == {1}, counts
    assert site.outbox().depth().pending == 0


def test_deleting_at_the_node_retracts_from_the_hub(site):
    instances = generated(patient_id="DEL-MRN-1", accession="DEL-1", slices=2)
    uid = _uid(instances[0])
    site.stow(instances)
    (study,) = eventually(lambda: site.studies(uid), "the study at the hub")

    assert site.delete(uid, key="").status_code == 401
    unknown = site.delete("1.2.3.4.5.6.7")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/json")
    deleted = site.delete(uid)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted_instances"] == 2

    eventually(lambda: site.studies(uid) == [], "the study gone from the hub")
    assert site.read(f"ImagingStudy/{study['id']}").status_code == 410
    assert site.delete(uid).status_code == 404  # nothing left here either


def test_reconcile_repairs_what_the_hub_lost_refused_or_should_not_have(site):
    lost = generated(patient_id="REC-MRN-1", accession="REC-1", slices=2)
    refused = generated(patient_id="REC-MRN-2", accession="REC-2", slices=1)
    lost_uid, refused_uid = _uid(lost[0]), _uid(refused[0])
    site.stow(lost)
    site.stow(refused)
    (lost_study,) = eventually(lambda: site.studies(lost_uid), "the first study at the hub")
    (refused_study,) = eventually(lambda: site.studies(refused_uid), "the second at the hub")

    # Someone deletes a study at the hub; another's publication is parked as failed (as a
    # hub refusal would leave it) and gone from the hub too.
    for study in (lost_study, refused_study):
        gone = httpx.delete(
            f"{site.hub}/fhir/ImagingStudy/{study['id']}", headers=site.operator, timeout=30
        )
        assert gone.status_code == 200, gone.text
    box, seal = site.outbox(), site.seal()
    key = seal.blind("study", refused_uid)
    box.enqueue(
        SPEC.tenant, {key: outbox.seal_uid(seal, key, refused_uid)}, outbox.PUBLISH, delay=3600
    )
    (parked,) = box.entries(SPEC.tenant)
    assert box.claim(parked)
    assert box.fail(parked, "HTTP 422: simulated refusal")
    # And the hub lists a study through this node's Endpoint that the node does not hold.
    stray_uid = "1.2.826.0.1.3680043.10.1386.999.1"
    stray = {**lost_study, "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{stray_uid}"}]}
    stray.pop("id"), stray.pop("meta")
    created = httpx.post(
        f"{site.hub}/fhir/ImagingStudy",
        json=stray,
        headers={**site.operator, "Content-Type": FHIR},
        timeout=30,
    )
    assert created.status_code == 201, created.text

    admin = httpx.get(
        f"{site.node}/admin/outbox", headers={"Authorization": f"ApiKey {site.key}"}, timeout=10
    ).json()
    assert admin["failed"] == 1
    assert admin["failures"][0]["error"] == "HTTP 422: simulated refusal"

    dry = site.reconcile("--dry-run")
    assert "would publish 2, would retract 1, would retry 1" in dry, dry
    assert site.studies(lost_uid) == []  # a dry run changes nothing

    summary = site.reconcile("--wait")
    assert "published 2, retracted 1, failed (retried) 1" in summary, summary
    assert "0 pending, 0 failed" in summary, summary
    assert len(site.studies(lost_uid)) == 1
    assert len(site.studies(refused_uid)) == 1
    assert site.studies(stray_uid) == []
    again = site.reconcile("--dry-run")
    assert "would publish 0, would retract 0, would retry 0" in again, again


def test_reconcile_says_so_in_one_line_when_the_hub_is_unreachable(site, tmp_path):
    env = {**site.federation.node(SPEC.node_id).env, "EXCHANGE_HUB_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "exchange", "node", "reconcile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "could not be reached" in lines[0]
