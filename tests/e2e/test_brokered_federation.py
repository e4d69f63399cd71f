"""Issue 7 end to end: publish, discover under consent, retrieve through the broker, audit.

Real processes on loopback: a hub with the development IdP and two site nodes that
publish through their outboxes. Clients are the ones users have: plain httpx for
FHIR, ``dicomweb-client`` for DICOMweb. Every test uses its own synthetic patients,
so the tests do not see each other's consents.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from requests import HTTPError, Session

from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security import devidp
from exchange.security.keys import load_or_create

pytestmark = pytest.mark.e2e

SITES = [
    NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a"),
    NodeSpec(node_id="site-b", organization="org-b", tenant="tenant-b"),
]
INDEX_WAIT_SECONDS = 20.0
#: EXCHANGE_TEST_TLS=1: the same tests over HTTPS, nodes requiring the hub's client certificate.
TLS = os.environ.get("EXCHANGE_TEST_TLS") == "1"
FHIR = "application/fhir+json"


class Hub:
    """The federation as its users reach it: tokens from the dev IdP, FHIR over httpx."""

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation
        self.url = federation.hub.url
        key = load_or_create(devidp.key_path(federation.hub.data_dir))
        self.idp = devidp.DevIdentityProvider(f"{self.url}/idp", key, "exchange")
        self.http = federation.http(base_url=self.url, timeout=30)

    def token(
        self,
        sub: str,
        role: str,
        org: str | None,
        purpose: list[str] | None = None,
        patient: str | None = None,
        ttl: int = 3600,
    ) -> str:
        return self.idp.issue(
            sub=sub, role=role, org=org, purpose=purpose, patient=patient, ttl=ttl
        )

    @property
    def operator(self) -> str:
        return self.token("op-olu", "operator", "hie", ["HOPERAT"])

    def clinician(self, org: str, sub: str | None = None, purpose: str = "TREAT") -> str:
        return self.token(sub or f"dr-{org}", "clinician", org, [purpose])

    def fhir(self, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        if "json" in kw:
            headers["Content-Type"] = FHIR
        return self.http.request(method, f"/fhir/{path}", headers=headers, **kw)

    def search(self, path: str, token: str, **kw: Any) -> dict[str, Any]:
        response = self.fhir("GET", path, token, **kw)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def dicomweb(self, token: str, headers: dict[str, str] | None = None) -> DICOMwebClient:
        session = Session()
        if self.federation.tls:
            session.trust_env = False  # else REQUESTS_CA_BUNDLE would override ``verify``
            session.verify = str(self.federation.pki.ca.cert)
        return DICOMwebClient(
            url=f"{self.url}/dicomweb",
            session=session,
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
        )

    def wait_indexed(self, uid: str) -> dict[str, Any]:
        """The study's ImagingStudy once the site's outbox has delivered it."""
        deadline = time.monotonic() + INDEX_WAIT_SECONDS
        while True:
            found = self.search(
                f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}", self.operator
            )
            if found.get("total") == 1:
                return dict(found["entry"][0]["resource"])
            assert time.monotonic() < deadline, f"study not indexed within {INDEX_WAIT_SECONDS}s"
            time.sleep(0.2)

    def consent(self, patient_id: str, provision: dict[str, Any]) -> str:
        body = {
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
            "patient": {"reference": f"Patient/{patient_id}"},
            "dateTime": "2026-11-01T09:00:00Z",
            "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
            "provision": provision,
        }
        response = self.fhir("POST", "Consent", self.operator, json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def org_actor(org: str) -> dict[str, Any]:
    return {
        "role": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "IRCP",
                }
            ]
        },
        "reference": {"reference": f"Organization/{org}"},
    }


EXPORT_PERMIT_ACTIONS = [
    {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "use"},
            {
                "system": "https://exchange.example.org/fhir/CodeSystem/consent-action",
                "code": "export",
            },
        ]
    }
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root: Path = tmp_path_factory.mktemp("brokered")
    with LocalFederation(root=root, nodes=SITES, tls=TLS) as fed:
        yield fed


@pytest.fixture(scope="module")
def hub(federation: LocalFederation) -> Iterator[Hub]:
    h = Hub(federation)
    yield h
    h.http.close()


def import_study(
    federation: LocalFederation, site: str, mrn: str, *, slices: int = 3, modality: str = "CT"
) -> tuple[str, list[pydicom.Dataset]]:
    """Generate a study for ``mrn`` and ``exchange import`` it at ``site``."""
    folder = federation.root / "studies" / f"{site}-{mrn}-{uuid.uuid4().hex[:6]}"
    paths = write_study(
        StudySpec(
            patient_id=mrn,
            patient_name=f"Synthetic^{mrn}",
            accession=uuid.uuid4().hex[:12],
            modality=modality,
            slices=slices,
            size=64,
            issuer=next(s.organization for s in SITES if s.node_id == site),
        ),
        folder,
    )
    federation.import_into(site, folder)
    datasets = [pydicom.dcmread(p) for p in paths]
    return str(datasets[0].StudyInstanceUID), datasets


def subject_of(study: dict[str, Any]) -> str:
    return str(study["subject"]["reference"]).removeprefix("Patient/")


# -- acceptance 1 and 3: publish, discover, retrieve; view versus export --------------


def test_published_study_is_found_and_retrieved_through_the_broker(hub: Hub) -> None:
    uid, originals = import_study(hub.federation, "site-a", "E2E-101", slices=3)
    started = time.monotonic()
    study = hub.wait_indexed(uid)
    print(f"indexed {time.monotonic() - started:.2f} s after the import finished")
    patient = hub.search(f"Patient/{subject_of(study)}", hub.operator)
    mrn = next(i for i in patient["identifier"] if i["value"] == "E2E-101")

    reader = hub.clinician("org-b")
    found = hub.search(
        f"ImagingStudy?patient.identifier={mrn['system']}|E2E-101&_include=ImagingStudy:endpoint",
        reader,
    )
    assert found["total"] == 1
    kinds = {e["resource"]["resourceType"]: e["resource"] for e in found["entry"]}
    assert kinds["ImagingStudy"]["id"] == study["id"]
    assert kinds["Endpoint"]["address"] == f"{hub.url}/dicomweb"  # never the node

    client = hub.dicomweb(reader)
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": uid})
    assert [s["0020000D"]["Value"][0] for s in studies] == [uid]
    metadata = client.retrieve_study_metadata(uid)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(
        str(d.SOPInstanceUID) for d in originals
    )
    first = originals[0]
    frames = client.retrieve_instance_frames(
        uid, str(first.SeriesInstanceUID), str(first.SOPInstanceUID), frame_numbers=[1]
    )
    assert frames[0] == first.PixelData
    rendered = client.retrieve_instance_rendered(
        uid, str(first.SeriesInstanceUID), str(first.SOPInstanceUID), media_types=("image/png",)
    )
    assert rendered[:8] == b"\x89PNG\r\n\x1a\n"

    # view only: the original files are refused ...
    with pytest.raises(HTTPError) as refused:
        client.retrieve_study(uid)
    assert refused.value.response.status_code == 403
    # ... until the patient permits export to organisation B.
    hub.consent(
        subject_of(study),
        {"type": "permit", "actor": [org_actor("org-b")], "action": EXPORT_PERMIT_ACTIONS},
    )
    instances = client.retrieve_study(uid)
    by_uid = {str(d.SOPInstanceUID): d for d in originals}
    assert sorted(by_uid) == sorted(str(i.SOPInstanceUID) for i in instances)
    for instance in instances:
        original = by_uid[str(instance.SOPInstanceUID)]
        assert instance.PixelData == original.PixelData
        assert instance.PatientID == original.PatientID


# -- acceptance 2: opt-out, custodian, break-the-glass --------------------------------


def test_opt_out_hides_the_study_from_other_organisations_only(hub: Hub) -> None:
    uid, _ = import_study(hub.federation, "site-a", "E2E-202")
    study = hub.wait_indexed(uid)
    by_uid = f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}"
    reader = hub.clinician("org-b")
    assert hub.search(by_uid, reader)["total"] == 1

    hub.consent(subject_of(study), {"type": "deny"})

    hidden = hub.search(by_uid, reader)
    assert hidden["total"] == 0
    assert not hidden.get("entry")
    counted = hub.search(f"{by_uid}&_summary=count", reader)
    assert counted["total"] == 0
    read = hub.fhir("GET", f"ImagingStudy/{study['id']}", reader)
    assert read.status_code == 403
    assert "opted out" in read.text
    retrieval = hub.http.get(
        f"/dicomweb/studies/{uid}/metadata", headers={"Authorization": f"Bearer {reader}"}
    )
    assert retrieval.status_code == 403
    assert uid not in retrieval.text.replace(f"studies/{uid}", "")

    own = hub.clinician("org-a")
    assert hub.search(by_uid, own)["total"] == 1
    assert len(hub.dicomweb(own).retrieve_study_metadata(uid)) == 3

    emergency = hub.token("dr-er", "clinician", "org-b", ["ETREAT"])
    no_reason = hub.http.get(
        f"/dicomweb/studies/{uid}/metadata", headers={"Authorization": f"Bearer {emergency}"}
    )
    assert no_reason.status_code == 403
    assert "reason" in no_reason.text
    glass = hub.dicomweb(emergency, {"X-Break-Glass-Reason": "unconscious patient in ED"})
    assert len(glass.retrieve_study_metadata(uid)) == 3

    events = hub.search(f"AuditEvent?entity=ImagingStudy/{study['id']}&_count=100", hub.operator)
    flagged = [
        e["resource"]
        for e in events.get("entry", [])
        if "unconscious patient in ED" in json.dumps(e["resource"])
    ]
    assert flagged, "the break-the-glass access left no AuditEvent with its reason"
    assert all(e["outcome"] == "0" for e in flagged)
    assert any(
        c.get("code") == "ETREAT"
        for e in flagged
        for p in e.get("purposeOfEvent", [])
        for c in p.get("coding", [])
    )


# -- acceptance 4: the node takes only grants, for their study and node, in time ------


def test_node_accepts_only_live_grants_for_its_own_study(hub: Hub) -> None:
    federation = hub.federation
    uid, _ = import_study(federation, "site-a", "E2E-404")
    other_uid, _ = import_study(federation, "site-a", "E2E-405")
    node = federation.node("site-a").url
    path = f"{node}/dicomweb/studies/{uid}/metadata"

    # As the hub calls nodes (over TLS: presenting the hub's client certificate).
    http = federation.http(as_hub=True)
    user = hub.clinician("org-a")
    assert http.get(path, headers={"Authorization": f"Bearer {user}"}).status_code == 401
    good = federation.grant("site-a", uid, "view")
    assert http.get(path, headers={"Authorization": f"Bearer {good}"}).status_code == 200
    elsewhere = federation.grant("site-a", other_uid, "view")
    assert http.get(path, headers={"Authorization": f"Bearer {elsewhere}"}).status_code == 403
    other_node = federation.grant("site-b", uid, "view")
    assert http.get(path, headers={"Authorization": f"Bearer {other_node}"}).status_code == 401
    short = federation.grant("site-a", uid, "view", ttl=1)
    time.sleep(7)  # lifetime 1 s + the node's 5 s clock leeway
    expired = http.get(path, headers={"Authorization": f"Bearer {short}"})
    http.close()
    assert expired.status_code == 401
    assert "expired" in expired.text


# -- acceptance 7: the audit chain verifies and every request left its record ---------


def test_every_request_is_audited_and_the_chain_verifies(hub: Hub) -> None:
    uid, _ = import_study(hub.federation, "site-b", "E2E-707")
    study = hub.wait_indexed(uid)
    caller = f"dr-counted-{uuid.uuid4().hex[:6]}"
    token = hub.clinician("org-a", sub=caller)
    client = hub.dicomweb(token)
    made = 0
    for _ in range(3):
        hub.search(f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}", token)
        client.retrieve_study_metadata(uid)
        made += 2
    assert hub.fhir("GET", f"ImagingStudy/{study['id']}", token).status_code == 200
    made += 1
    with pytest.raises(HTTPError):
        client.retrieve_study(uid)  # refused: view only; a refusal is audited too
    made += 1

    exported = hub.federation.exchange("hub", "audit", "export", "--out", "-")
    mine = [
        event
        for event in map(json.loads, exported.splitlines())
        if caller in json.dumps(event.get("agent", []))
    ]
    assert len(mine) == made
    assert sum(1 for e in mine if e["outcome"] != "0") == 1

    verified = hub.federation.exchange("hub", "audit", "verify")
    assert "intact" in verified


# -- acceptance 5: differential test of consent-filtered discovery -------------------

DIFF_PATIENTS = 8
DIFF_ROUNDS = 25
PAGE = 3
CONSENT_KINDS = ("none", "opt-out", "deny-b", "permit-c-payment", "deny-b+permit-c")


def _publish_indexed_study(hub: Hub, site: str, org: str, patient_id: str, n: int) -> str:
    """An ImagingStudy published by the site's system, as its outbox would."""
    example = (
        Path(__file__).resolve().parents[2] / "fhir_profiles/examples/imagingstudy-example.json"
    )
    body = json.loads(example.read_text())
    body.pop("id")
    uid = f"2.25.{uuid.uuid4().int}"
    body["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
    body["subject"] = {"reference": f"Patient/{patient_id}"}
    body["endpoint"] = [{"reference": f"Endpoint/diff-{site}"}]
    body["started"] = f"2026-0{1 + n % 9}-1{n % 10}"
    system = hub.token(site, "system", org, ["HOPERAT"])
    response = hub.fhir(
        "PUT", f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}", system, json=body
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _expected(study: dict[str, str], consent: str, caller: dict[str, str]) -> bool:
    """An independent reading of the HIE's rules for the generated cases (opt-out HIE)."""
    if caller["role"] == "operator":
        return True
    if caller["role"] == "patient":
        return caller["patient"] == study["patient"]
    if caller["org"] == study["org"]:
        return True  # the holding organisation's own staff
    denied = consent == "opt-out" or ("deny-b" in consent and caller["org"] == "org-b")
    if denied:
        return False
    if caller["purpose"] == "TREAT":
        return True  # shared for treatment unless the patient said otherwise
    return "permit-c" in consent and caller["org"] == "org-c" and caller["purpose"] == "HPAYMT"


def _provisions(kind: str) -> list[dict[str, Any]]:
    payment = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HPAYMT"}
    return {
        "none": [],
        "opt-out": [{"type": "deny"}],
        "deny-b": [{"type": "deny", "actor": [org_actor("org-b")]}],
        "permit-c-payment": [
            {"type": "permit", "actor": [org_actor("org-c")], "purpose": [payment]}
        ],
        "deny-b+permit-c": [
            {"type": "deny", "actor": [org_actor("org-b")]},
            {"type": "permit", "actor": [org_actor("org-c")], "purpose": [payment]},
        ],
    }[kind]


def test_discovery_shows_exactly_what_the_policy_allows(hub: Hub) -> None:
    import random

    rng = random.Random(7)
    sites = {"site-a": "org-a", "site-b": "org-b"}
    for site, org in sites.items():
        system = hub.token(site, "system", org, ["HOPERAT"])
        endpoint = {
            "resourceType": "Endpoint",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "managingOrganization": {"reference": f"Organization/{org}"},
            "payloadType": [{"text": "DICOM"}],
            "address": f"{hub.federation.node(site).url}/dicomweb",
        }
        put = hub.fhir("PUT", f"Endpoint/diff-{site}", system, json=endpoint)
        assert put.status_code in (200, 201), put.text

    studies: dict[str, dict[str, str]] = {}
    patients: list[str] = []
    for n in range(DIFF_PATIENTS):
        site = "site-a" if n % 2 == 0 else "site-b"
        org = sites[site]
        system = hub.token(site, "system", org, ["HOPERAT"])
        mrn = f"DIFF-{uuid.uuid4().hex[:8]}"
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": f"urn:test:{org}:mrn", "value": mrn}],
            "managingOrganization": {"reference": f"Organization/{org}"},
        }
        made = hub.fhir("PUT", f"Patient?identifier=urn:test:{org}:mrn|{mrn}", system, json=patient)
        assert made.status_code == 201, made.text
        pid = str(made.json()["id"])
        patients.append(pid)
        for k in range(2):
            sid = _publish_indexed_study(hub, site, org, pid, n * 2 + k)
            studies[sid] = {"patient": pid, "org": org}

    clinicians = [
        {"role": "clinician", "org": org, "purpose": purpose}
        for org, purpose in [
            ("org-a", "TREAT"),
            ("org-b", "TREAT"),
            ("org-c", "TREAT"),
            ("org-c", "HPAYMT"),
            ("org-b", "HPAYMT"),
        ]
    ]
    consents: dict[str, list[str]] = {p: [] for p in patients}
    combinations = 0
    for _ in range(DIFF_ROUNDS):
        kinds = {p: rng.choice(CONSENT_KINDS) for p in patients}
        for pid, kind in kinds.items():
            for cid in consents[pid]:
                gone = hub.fhir("DELETE", f"Consent/{cid}", hub.operator)
                assert gone.status_code == 200, gone.text
            consents[pid] = [hub.consent(pid, p) for p in _provisions(kind)]
        callers = [
            *clinicians,
            {"role": "operator"},
            {"role": "patient", "patient": rng.choice(patients)},
            {"role": "patient", "patient": rng.choice(patients)},
        ]
        for caller in callers:
            combinations += 1
            if caller["role"] == "clinician":
                token = hub.clinician(caller["org"], purpose=caller["purpose"])
            elif caller["role"] == "patient":
                token = hub.token(
                    f"pt-{caller['patient']}", "patient", None, patient=caller["patient"]
                )
            else:
                token = hub.operator
            expected = {
                sid for sid, s in studies.items() if _expected(s, kinds[s["patient"]], caller)
            }
            query = f"ImagingStudy?patient={','.join(patients)}&_include=ImagingStudy:endpoint"
            seen: list[str] = []
            pages = 0
            url: str | None = f"/fhir/{query}&_count={PAGE}"
            total = None
            while url:
                page = hub.http.get(url, headers={"Authorization": f"Bearer {token}"})
                assert page.status_code == 200, page.text
                body = page.json()
                pages += 1
                total = body.get("total")
                matches = [
                    e["resource"]["id"]
                    for e in body.get("entry", [])
                    if e.get("search", {}).get("mode") == "match"
                ]
                included = [
                    e["resource"]
                    for e in body.get("entry", [])
                    if e.get("search", {}).get("mode") == "include"
                ]
                assert all(r["resourceType"] == "Endpoint" for r in included)
                seen += matches
                nxt = [link["url"] for link in body.get("link", []) if link["relation"] == "next"]
                url = nxt[0].removeprefix(hub.url) if nxt else None
            assert sorted(seen) == sorted(expected), (caller, kinds)
            assert total == len(expected)
            assert pages == max(1, -(-len(expected) // PAGE))
            count = hub.search(f"{query}&_summary=count", token)
            assert count["total"] == len(expected)
    assert combinations >= 200


# -- acceptance 6 (second half): the policy engine down releases nothing --------------


def test_policy_engine_down_returns_no_study_and_no_byte(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    opa = subprocess.Popen(
        [sys.executable, "-m", "tests.opa_stub", "--policy-dir", str(root / "policies")],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert opa.stdout is not None
        opa_url = opa.stdout.readline().strip()
        engine = {"EXCHANGE_POLICY_ENGINE": "server", "EXCHANGE_OPA_URL": opa_url}
        with LocalFederation(
            root=tmp_path_factory.mktemp("policy-down"), nodes=SITES, hub_env=engine, tls=TLS
        ) as federation:
            hub = Hub(federation)
            uid, _ = import_study(federation, "site-a", "E2E-606")
            hub.wait_indexed(uid)
            reader = hub.clinician("org-b")
            by_uid = f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}"
            assert hub.search(by_uid, reader)["total"] == 1
            metadata = f"/dicomweb/studies/{uid}/metadata"
            auth = {"Authorization": f"Bearer {reader}"}
            assert hub.http.get(metadata, headers=auth).status_code == 200

            opa.terminate()
            opa.wait(timeout=10)

            found = hub.fhir("GET", by_uid, reader)
            assert found.status_code in (200, 503), found.text
            assert found.json().get("total", 0) == 0
            assert "ImagingStudy" not in json.dumps(found.json().get("entry", []))
            retrieval = hub.http.get(metadata, headers=auth)
            assert retrieval.status_code in (403, 503)
            assert "application/dicom" not in retrieval.headers.get("content-type", "")
            assert "00080018" not in retrieval.text  # no SOP Instance UID, i.e. no metadata
            hub.http.close()
    finally:
        if opa.poll() is None:
            opa.terminate()
            opa.wait(timeout=10)


# -- accounting of disclosures: patients read who accessed their images ---------------


def test_patient_reads_the_disclosures_about_themselves_only(hub: Hub) -> None:
    uid, _ = import_study(hub.federation, "site-a", "E2E-808")
    study = hub.wait_indexed(uid)
    me = subject_of(study)
    other_uid, _ = import_study(hub.federation, "site-a", "E2E-809")
    someone_else = subject_of(hub.wait_indexed(other_uid))
    viewer = hub.clinician("org-b", sub="dr-viewer-808")
    assert len(hub.dicomweb(viewer).retrieve_study_metadata(uid)) == 3
    assert len(hub.dicomweb(viewer).retrieve_study_metadata(other_uid)) == 3

    patient = hub.token(f"pt-{me}", "patient", None, patient=me)
    mine = hub.search(f"AuditEvent?patient={me}&_count=200", patient)
    events = [e["resource"] for e in mine.get("entry", [])]
    views = [e for e in events if "dr-viewer-808" in json.dumps(e.get("agent", []))]
    assert views, "the patient cannot see that dr-viewer-808 looked at their images"
    seen = views[0]
    assert any(a.get("who", {}).get("reference") == "Organization/org-b" for a in seen["agent"])
    assert seen["recorded"]
    assert seen["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    assert all(f"Patient/{someone_else}" not in json.dumps(e) for e in events)

    theirs = hub.fhir("GET", f"AuditEvent?patient={someone_else}", patient)
    assert theirs.status_code in (200, 403)
    if theirs.status_code == 200:
        assert theirs.json()["total"] == 0
