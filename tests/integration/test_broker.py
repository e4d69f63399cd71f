"""The hub's DICOMweb broker with real processes: a hub (development IdP) and two site nodes.

Studies are STOWed to the nodes with the sites' API keys and published to the hub's
index by the sites' systems (node publishing is off here, so the index holds exactly
what these tests put there). Callers use the real ``dicomweb-client`` against
``{hub}/dicomweb``, as a viewer would.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from requests import HTTPError

from exchange.dicom import imagingstudy
from exchange.dicom.samples import StudySpec, study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create

pytestmark = pytest.mark.integration

SITES = [
    NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a"),
    NodeSpec(node_id="site-b", organization="org-b", tenant="tenant-b"),
]
FHIR = "application/fhir+json"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Study:
    uid: str
    site: str
    patient: str  # the hub's Patient id
    resource: str  # the hub's ImagingStudy id
    files: list[bytes]

    @property
    def datasets(self) -> list[Dataset]:
        return [pydicom.dcmread(io.BytesIO(f)) for f in self.files]


@dataclass
class World:
    federation: LocalFederation
    idp: DevIdentityProvider
    studies: dict[str, Study] = field(default_factory=dict)

    @property
    def hub(self) -> str:
        return self.federation.hub.url

    def token(self, sub: str, role: str, org: str | None, *purposes: str) -> str:
        return self.idp.issue(sub=sub, role=role, org=org, purpose=list(purposes) or None)

    def clinician(self, org: str, purpose: str = "TREAT", sub: str | None = None) -> str:
        return self.token(sub or f"dr-{org}", "clinician", org, purpose)

    @property
    def operator(self) -> str:
        return self.token("op-olu", "operator", "hie", "HOPERAT")

    def dicomweb(self, token: str, **headers: str) -> DICOMwebClient:
        return DICOMwebClient(
            url=f"{self.hub}/dicomweb", headers={"Authorization": f"Bearer {token}", **headers}
        )

    def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(f"{self.hub}{path}", headers=headers, timeout=30)

    def fhir(self, method: str, path: str, token: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR}
        return httpx.request(
            method, f"{self.hub}/fhir/{path}", json=body, headers=headers, timeout=30
        )


def _endpoint(world: World, spec: NodeSpec) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "identifier": [{"system": "urn:exchange:node", "value": spec.node_id}],
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "managingOrganization": {"reference": f"Organization/{spec.organization}"},
        "payloadType": [{"text": "DICOM"}],
        "address": f"{world.federation.node(spec.node_id).url}/dicomweb",
    }


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _stow(world: World, spec: NodeSpec, key: str, files: list[bytes]) -> None:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
            for f in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    response = httpx.post(
        f"{world.federation.node(spec.node_id).url}/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "X-API-Key": key,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text


def _publish(world: World, spec: NodeSpec, mrn: str, date: str, slices: int) -> Study:
    """STOW a generated study to the site's node and publish it as the site's system would."""
    datasets = study(
        StudySpec(
            patient_id=mrn,
            patient_name=f"Broker^{mrn}",
            accession=uuid.uuid4().hex[:12],
            study_date=date,
            slices=slices,
            size=64,
        )
    )
    files = [_part10(ds) for ds in datasets]
    _stow(world, spec, world.federation.api_key(spec.node_id), files)
    system = world.token(spec.node_id, "system", spec.organization)
    mrn_system = f"urn:exchange:{spec.organization}:mrn"
    attributes = [ds.to_json_dict() for ds in datasets]
    patient = imagingstudy.patient(
        attributes[0], mrn_system=mrn_system, organization=spec.organization
    )
    made = world.fhir("PUT", f"Patient?identifier={mrn_system}|{mrn}", system, patient)
    assert made.status_code in (200, 201), made.text
    patient_id = str(made.json()["id"])
    body = imagingstudy.build(
        attributes,
        endpoint=f"Endpoint/{spec.node_id}",
        mrn_system=mrn_system,
        patient_reference=f"Patient/{patient_id}",
    )
    uid = str(datasets[0].StudyInstanceUID)
    put = world.fhir("PUT", f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}", system, body)
    assert put.status_code in (200, 201), put.text
    return Study(uid, spec.node_id, patient_id, str(put.json()["id"]), files)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp("broker")
    with LocalFederation(root=root, nodes=SITES, publishing=False) as federation:
        idp = DevIdentityProvider(
            f"{federation.hub.url}/idp",
            load_or_create(key_path(federation.hub.data_dir)),
            "exchange",
        )
        world = World(federation, idp)
        for spec in SITES:
            system = world.token(spec.node_id, "system", spec.organization)
            put = world.fhir("PUT", f"Endpoint/{spec.node_id}", system, _endpoint(world, spec))
            assert put.status_code in (200, 201), put.text
        a, b = SITES
        world.studies["shared"] = _publish(world, a, "BRK-1", "20260301", 3)
        world.studies["private"] = _publish(world, a, "BRK-2", "20260201", 2)
        world.studies["remote"] = _publish(world, b, "BRK-3", "20260101", 2)
        yield world


def _study_uids(results: list[dict[str, Any]]) -> list[str]:
    return [r["0020000D"]["Value"][0] for r in results]


def _outcome(response: httpx.Response) -> str:
    assert response.headers["content-type"] == FHIR, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


def _parts(response: httpx.Response) -> list[bytes]:
    boundary = re.search(r"boundary=([^;\s]+)", response.headers["content-type"])
    assert boundary is not None
    delimiter = b"--" + boundary.group(1).strip('"').encode()
    parts = []
    for piece in response.content.split(delimiter)[1:]:
        if piece.startswith(b"--"):
            break
        parts.append(piece.partition(b"\r\n\r\n")[2][:-2])
    return parts


# -- discovery and view ---------------------------------------------------------------------


def test_studies_are_found_across_sites_through_the_broker(world: World) -> None:
    client = world.dicomweb(world.clinician("org-b"))
    shared, private, remote = (world.studies[k] for k in ("shared", "private", "remote"))
    found = client.search_for_studies()
    assert _study_uids(found) == [shared.uid, private.uid, remote.uid]  # newest first
    assert {r["00081190"]["Value"][0] for r in found} == {
        f"{world.hub}/dicomweb/studies/{s.uid}" for s in (shared, private, remote)
    }
    by_patient = client.search_for_studies(search_filters={"PatientID": "BRK-1"})
    assert _study_uids(by_patient) == [shared.uid]
    assert by_patient[0]["00100020"]["Value"] == ["BRK-1"]


def test_a_viewer_gets_metadata_frames_and_rendered_images(world: World) -> None:
    token = world.clinician("org-b")
    client = world.dicomweb(token)
    shared = world.studies["shared"]
    originals = shared.datasets
    metadata = client.retrieve_study_metadata(shared.uid)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(
        str(d.SOPInstanceUID) for d in originals
    )
    raw = world.get(f"/dicomweb/studies/{shared.uid}/metadata", token)
    node = world.federation.node("site-a").url
    assert node not in raw.text  # BulkDataURIs point at the broker
    assert f"{world.hub}/dicomweb/studies/{shared.uid}/series/" in raw.text

    first = originals[0]
    series, sop = str(first.SeriesInstanceUID), str(first.SOPInstanceUID)
    frames = client.retrieve_instance_frames(shared.uid, series, sop, frame_numbers=[1])
    assert frames[0] == first.PixelData
    rendered = client.retrieve_instance_rendered(
        shared.uid, series, sop, media_types=("image/png",)
    )
    assert rendered[:8] == b"\x89PNG\r\n\x1a\n"
    series_found = client.search_for_series(shared.uid)
    assert [s["0020000E"]["Value"][0] for s in series_found] == [series]


def test_raw_instances_need_export_which_the_custodian_has(world: World) -> None:
    shared = world.studies["shared"]
    viewer = world.dicomweb(world.clinician("org-b"))
    with pytest.raises(HTTPError) as refused:
        viewer.retrieve_study(shared.uid)
    assert refused.value.response.status_code == 403
    reason = refused.value.response.json()["issue"][0]["diagnostics"]
    assert "original images" in reason

    custodian = world.dicomweb(world.clinician("org-a"))
    instances = custodian.retrieve_study(shared.uid)
    originals = {str(d.SOPInstanceUID): d for d in shared.datasets}
    assert sorted(originals) == sorted(str(i.SOPInstanceUID) for i in instances)
    for instance in instances:
        assert instance.PixelData == originals[str(instance.SOPInstanceUID)].PixelData

    # the bytes are the node's, untouched: the files as sent (their preamble was zeros)
    raw = world.get(
        f"/dicomweb/studies/{shared.uid}", world.clinician("org-a"), Accept=DICOM_ACCEPT
    )
    assert raw.status_code == 200
    assert sorted(_parts(raw)) == sorted(shared.files)


def test_the_node_never_takes_the_callers_own_token(world: World) -> None:
    shared = world.studies["shared"]
    node = world.federation.node("site-a").url
    direct = httpx.get(
        f"{node}/dicomweb/studies/{shared.uid}/metadata",
        headers={"Authorization": f"Bearer {world.clinician('org-a')}"},
    )
    assert direct.status_code == 401


def test_unknown_studies_and_missing_tokens(world: World) -> None:
    missing = world.get("/dicomweb/studies/1.2.3.4.5/metadata", world.clinician("org-a"))
    assert missing.status_code == 404
    _outcome(missing)
    anonymous = world.get(f"/dicomweb/studies/{world.studies['shared'].uid}/metadata")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")


# -- consent, break-the-glass, audit ------------------------------------------------------------


def _opt_out(world: World, patient: str) -> None:
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "dateTime": "2026-11-01T09:00:00Z",
        "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
        "provision": {"type": "deny"},
    }
    made = world.fhir("POST", "Consent", world.operator, consent)
    assert made.status_code == 201, made.text


def test_opt_out_refuses_other_organisations_and_break_the_glass_needs_a_reason(
    world: World,
) -> None:
    private = world.studies["private"]
    path = f"/dicomweb/studies/{private.uid}/metadata"
    _opt_out(world, private.patient)

    refused = world.get(path, world.clinician("org-b"))
    assert refused.status_code == 403
    assert "opted out" in _outcome(refused)
    found = world.dicomweb(world.clinician("org-b")).search_for_studies()
    assert private.uid not in _study_uids(found)
    assert world.get(path, world.clinician("org-a")).status_code == 200  # the custodian

    emergency = world.clinician("org-b", "ETREAT", sub="dr-er")
    assert world.get(path, emergency).status_code == 403
    glass = world.dicomweb(emergency, **{"X-Break-Glass-Reason": "unconscious in the ED"})
    assert len(glass.retrieve_study_metadata(private.uid)) == 2

    events = world.fhir(
        "GET", f"AuditEvent?entity=ImagingStudy/{private.resource}&_count=100", world.operator
    )
    assert events.status_code == 200, events.text
    flagged = [
        e["resource"]
        for e in events.json().get("entry", [])
        if "unconscious in the ED" in json.dumps(e["resource"])
    ]
    assert len(flagged) == 1
    assert flagged[0]["outcome"] == "0"
    assert "emergency-access" in json.dumps(flagged[0])


def test_every_broker_request_leaves_an_audit_event(world: World) -> None:
    caller = f"dr-counted-{uuid.uuid4().hex[:6]}"
    token = world.clinician("org-b", sub=caller)
    shared = world.studies["shared"]
    first = shared.datasets[0]
    instance = f"/dicomweb/studies/{shared.uid}/series/{first.SeriesInstanceUID}/instances/"
    instance += str(first.SOPInstanceUID)
    asked = [
        ("/dicomweb/studies?PatientID=BRK-1", 200),
        (f"/dicomweb/studies/{shared.uid}/metadata", 200),
        (f"{instance}/rendered", 200),
        (f"/dicomweb/studies/{shared.uid}/series", 200),
        (f"/dicomweb/studies/{shared.uid}", 403),
        ("/dicomweb/studies/1.2.3.4.5/metadata", 404),
    ]
    for path, status in asked:
        assert world.get(path, token).status_code == status, path

    exported = world.federation.exchange("hub", "audit", "export", "--out", "-")
    mine = [
        event
        for event in map(json.loads, exported.splitlines())
        if caller in json.dumps(event.get("agent", []))
    ]
    assert len(mine) == len(asked)
    assert sum(1 for e in mine if e["outcome"] != "0") == 2


# -- a site down -------------------------------------------------------------------------------


def test_a_site_that_is_down_is_a_502_and_is_left_out_of_searches(world: World) -> None:
    remote, shared = world.studies["remote"], world.studies["shared"]
    node = world.federation.node("site-b")
    port = node.url.rsplit(":", 1)[1]
    world.federation.kill("site-b")
    try:
        token = world.clinician("org-a")
        down = world.get(f"/dicomweb/studies/{remote.uid}/metadata", token)
        assert down.status_code == 502
        text = _outcome(down)
        assert "org-b" in text
        assert port not in text

        search = world.get("/dicomweb/studies", token)
        assert search.status_code == 200
        assert remote.uid not in _study_uids(search.json())
        assert shared.uid in _study_uids(search.json())
        assert "site org-b did not answer" in search.headers["warning"]
    finally:
        world.federation.restart("site-b")
    deadline = time.monotonic() + 10
    while world.get(f"/dicomweb/studies/{remote.uid}/metadata", token).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
