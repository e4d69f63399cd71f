"""Provider sharing in process: a real hub app (index, policy, audit) and a scripted node.

The HIE runs opt-in here, so another organisation sees a study only when a consent
(a provider share is one) permits it: what a share grants is then plain to see.
The federation with real processes is tests/e2e/test_sharing.py.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from exchange.config import load_settings
from exchange.errors import AuditUnavailable, Forbidden
from exchange.fhir import resources
from exchange.hub import sharing
from exchange.hub.app import create_app
from exchange.hub.broker import Broker
from exchange.hub.services import HubServices

HUB = "http://hub.test"
NODE = "http://node-x.test:9001"
POLICIES = Path(__file__).resolve().parents[2] / "policies"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
AUDIT = "https://exchange.example.org/fhir/CodeSystem/audit"
SHARED_FURTHER = "shared studies cannot be shared further"


@dataclass
class Hub:
    client: TestClient
    services: HubServices
    patients: dict[str, str]
    node_calls: list[httpx.Request] = field(default_factory=list)

    def token(
        self,
        sub: str,
        org: str | None = None,
        role: str = "clinician",
        purposes: tuple[str, ...] = ("TREAT",),
        patient: str | None = None,
        scope: str | None = None,
    ) -> str:
        assert self.services.idp is not None
        return self.services.idp.issue(
            sub=sub,
            role=role,
            org=org,
            purpose=list(purposes) or None,
            patient=patient,
            scope=scope,
        )

    def share(
        self, token: str, study: str, body: dict[str, Any] | None = None, **kw: Any
    ) -> httpx.Response:
        payload = body if body is not None else parameters(**kw)
        return self.client.post(
            f"/fhir/ImagingStudy/{study}/$share",
            content=json.dumps(payload),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        )

    def revoke(self, token: str, consent: str) -> httpx.Response:
        return self.client.post(
            f"/fhir/Consent/{consent}/$revoke", headers={"Authorization": f"Bearer {token}"}
        )

    def metadata(self, token: str, uid: str) -> httpx.Response:
        return self.client.get(
            f"/dicomweb/studies/{uid}/metadata", headers={"Authorization": f"Bearer {token}"}
        )

    def study(self, patient: str = "p1") -> tuple[str, str]:
        """A new ImagingStudy of ``patient`` held by org-a: (id, Study Instance UID)."""
        uid = f"2.25.{uuid.uuid4().int}"
        written = self.services.resources.create(
            "ImagingStudy",
            {
                "resourceType": "ImagingStudy",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
                "status": "available",
                "subject": {"reference": f"Patient/{self.patients[patient]}"},
                "started": "2026-03-01",
                "modality": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
                ],
                "endpoint": [{"reference": "Endpoint/site-x"}],
            },
        )
        return written.stored.id, uid

    def audits(self, action: str) -> list[dict[str, Any]]:
        with self.services.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT body FROM fhir_resource WHERE rtype = 'AuditEvent' ORDER BY pk")
            ).all()
        events = [json.loads(body) for (body,) in rows]
        return [
            e
            for e in events
            if any(s.get("system") == AUDIT and s.get("code") == action for s in e["subtype"])
        ]

    def count(self, rtype: str) -> int:
        with self.services.engine.connect() as conn:
            query = text("SELECT count(*) FROM fhir_resource WHERE rtype = :t")
            return int(conn.execute(query, {"t": rtype}).scalar_one())


def parameters(
    *recipients: str,
    purpose: str | None = None,
    end: str | None = None,
    days: int | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        {"name": "recipient", "valueReference": {"reference": r}} for r in recipients
    ]
    if purpose:
        found.append({"name": "purpose", "valueCoding": {"system": ACT_REASON, "code": purpose}})
    if end:
        found.append({"name": "end", ("valueDate" if len(end) == 10 else "valueDateTime"): end})
    if days is not None:
        found.append({"name": "days", "valuePositiveInt": days})
    if note:
        found.append({"name": "note", "valueString": note})
    return {"resourceType": "Parameters", "parameter": found}


def _node(calls: list[httpx.Request]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            200,
            json=[{"00080018": {"vr": "UI", "Value": ["1.2.3"]}}],
            headers={"Content-Type": "application/dicom+json"},
        )

    return httpx.MockTransport(answer)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("sharing-hub")
    policies = root / "policies"
    shutil.copytree(POLICIES, policies)
    settings_file = policies / "data.json"
    data = json.loads(settings_file.read_text())
    data["exchange"]["settings"]["mode"] = "opt-in"
    settings_file.write_text(json.dumps(data))
    settings = load_settings(
        data_dir=root / "hub", dev_mode=True, dev_idp=True, public_url=HUB, policy_dir=policies
    )
    app = create_app(settings)
    with TestClient(app, base_url=HUB, raise_server_exceptions=False) as client:
        services: HubServices = app.state.services
        found = Hub(client, services, {})
        app.state.broker = Broker(services, _node(found.node_calls))
        repo = services.resources
        repo.update(
            "Endpoint",
            "site-x",
            {
                "resourceType": "Endpoint",
                "status": "active",
                "identifier": [{"system": "urn:exchange:node", "value": "node-x"}],
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "managingOrganization": {"reference": "Organization/org-a"},
                "payloadType": [{"text": "DICOM"}],
                "address": f"{NODE}/dicomweb",
            },
        )
        for key in ("p1", "p2"):
            written = repo.create(
                "Patient",
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:test:org-a:mrn", "value": f"MRN-{key}"}],
                    "managingOrganization": {"reference": "Organization/org-a"},
                },
            )
            found.patients[key] = written.stored.id
        yield found


def _outcome(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/fhir+json", response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


# -- sharing and what it grants ---------------------------------------------------------------


def test_the_holder_shares_and_the_recipient_views(hub: Hub) -> None:
    study, uid = hub.study()
    b1 = hub.token("dr-b1", "org-a")
    c1 = hub.token("dr-c1", "org-c")
    assert hub.metadata(c1, uid).status_code == 403  # opt-in HIE: nothing without consent
    before = len(hub.audits("share"))

    made = hub.share(b1, study, parameters("Practitioner/dr-c1", note="second opinion, left knee"))
    assert made.status_code == 201, made.text
    consent = made.json()
    assert made.headers["location"] == f"{HUB}/fhir/Consent/{consent['id']}/_history/1"
    resources.validate("Consent", consent)  # the exchange-consent profile
    assert consent["status"] == "active"
    assert consent["patient"] == {"reference": f"Patient/{hub.patients['p1']}"}
    assert consent["performer"] == [{"reference": "Practitioner/dr-b1"}]
    assert consent["policy"] == [{"uri": sharing.PROVIDER_SHARE_POLICY}]
    provision = consent["provision"]
    assert provision["type"] == "permit"
    assert provision["actor"][0]["reference"] == {"reference": "Practitioner/dr-c1"}
    assert provision["actor"][0]["role"]["coding"][0]["code"] == "IRCP"
    assert provision["action"][0]["coding"][0]["code"] == "access"
    assert provision["purpose"] == [{"system": ACT_REASON, "code": "TREAT"}]
    assert provision["data"] == [
        {"meaning": "instance", "reference": {"reference": f"ImagingStudy/{study}"}}
    ]
    start = datetime.fromisoformat(provision["period"]["start"])
    end = datetime.fromisoformat(provision["period"]["end"])
    assert end - start == timedelta(days=30)  # policies/data.json sharing.default_days
    assert consent["extension"][0]["valueString"] == "second opinion, left knee"

    # the recipient finds it and views it through the broker; nobody else of org-c does
    found = hub.client.get(
        f"/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}",
        headers={"Authorization": f"Bearer {c1}"},
    )
    assert found.json()["total"] == 1
    assert hub.metadata(c1, uid).status_code == 200
    colleague = hub.token("dr-c2", "org-c")
    assert hub.metadata(colleague, uid).status_code == 403
    # viewing is not downloading
    raw = hub.client.get(f"/dicomweb/studies/{uid}", headers={"Authorization": f"Bearer {c1}"})
    assert raw.status_code == 403
    assert "original images" in _outcome(raw)

    events = hub.audits("share")[before:]
    assert len(events) == 1
    assert events[0]["outcome"] == "0"
    what = [e.get("what", {}).get("reference") for e in events[0]["entity"]]
    assert f"ImagingStudy/{study}" in what
    assert f"Consent/{consent['id']}" in what
    assert "second opinion" not in json.dumps(events[0])  # the note stays in the Consent


def test_a_provenance_names_the_sharer_and_is_for_operators(hub: Hub) -> None:
    study, _ = hub.study()
    made = hub.share(hub.token("dr-b1", "org-a"), study, parameters("Organization/org-c"))
    assert made.status_code == 201, made.text
    cid = made.json()["id"]
    operator = hub.token("op", "hie", role="operator", purposes=("HOPERAT",))
    found = hub.client.get(
        f"/fhir/Provenance?target=Consent/{cid}", headers={"Authorization": f"Bearer {operator}"}
    )
    assert found.status_code == 200, found.text
    (entry,) = found.json()["entry"]
    provenance = entry["resource"]
    assert provenance["agent"][0]["who"] == {"reference": "Practitioner/dr-b1"}
    assert provenance["agent"][0]["onBehalfOf"] == {"reference": "Organization/org-a"}
    assert provenance["entity"] == [
        {"role": "source", "what": {"reference": f"ImagingStudy/{study}"}}
    ]
    assert provenance["reason"][0]["coding"][0]["code"] == "TREAT"
    clinician = hub.token("dr-b1", "org-a")
    refused = hub.client.get(
        f"/fhir/Provenance?target=Consent/{cid}", headers={"Authorization": f"Bearer {clinician}"}
    )
    assert refused.status_code == 403
    written = hub.client.post(
        "/fhir/Provenance",
        content=json.dumps(provenance),
        headers={"Authorization": f"Bearer {operator}", "Content-Type": "application/fhir+json"},
    )
    assert written.status_code == 405  # written by the hub only


def test_a_recipient_cannot_share_on(hub: Hub) -> None:
    study, _ = hub.study()
    assert (
        hub.share(hub.token("dr-b1", "org-a"), study, parameters("Organization/org-c")).status_code
        == 201
    )
    before = (hub.count("Consent"), len(hub.audits("share")))
    again = hub.share(hub.token("dr-c1", "org-c"), study, parameters("Practitioner/dr-d1"))
    assert again.status_code == 403
    assert _outcome(again) == SHARED_FURTHER
    assert hub.count("Consent") == before[0]
    (refusal,) = hub.audits("share")[before[1] :]
    assert refusal["outcome"] == "4"
    assert refusal["outcomeDesc"] == SHARED_FURTHER


def test_whoever_may_not_view_cannot_share(hub: Hub) -> None:
    study, _ = hub.study("p2")
    stranger = hub.share(hub.token("dr-b9", "org-b"), study, parameters("Practitioner/dr-c1"))
    assert stranger.status_code == 403
    assert "you may only share studies you may view" in _outcome(stranger)
    operator = hub.token("op", "hie", role="operator", purposes=("HOPERAT",))
    opt_out = {
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
        "patient": {"reference": f"Patient/{hub.patients['p2']}"},
        "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
        "provision": {"type": "deny"},
    }
    made = hub.client.post(
        "/fhir/Consent",
        content=json.dumps(opt_out),
        headers={"Authorization": f"Bearer {operator}", "Content-Type": "application/fhir+json"},
    )
    assert made.status_code == 201, made.text
    holder = hub.share(hub.token("dr-b1", "org-a"), study, parameters("Practitioner/dr-c1"))
    assert holder.status_code == 403
    assert _outcome(holder) == "the patient has opted out of sharing their images"


def test_patients_share_their_own_studies(hub: Hub) -> None:
    study, uid = hub.study()
    me = hub.token(
        "pat-1",
        role="patient",
        purposes=(),
        patient=hub.patients["p1"],
        scope="patient/ImagingStudy.rs patient/Consent.cu",
    )
    made = hub.share(me, study, parameters("Practitioner/dr-e1"))
    assert made.status_code == 201, made.text
    assert made.json()["performer"] == [{"reference": f"Patient/{hub.patients['p1']}"}]
    assert hub.metadata(hub.token("dr-e1", "org-e"), uid).status_code == 200
    other, _ = hub.study("p2")
    refused = hub.share(me, other, parameters("Practitioner/dr-e1"))
    assert refused.status_code == 403
    assert _outcome(refused) == "patients may share only their own studies"


def test_sharing_needs_a_token_that_may_write_consents(hub: Hub) -> None:
    study, _ = hub.study()
    narrow = hub.token("dr-b1", "org-a", scope="user/ImagingStudy.rs")
    refused = hub.share(narrow, study, parameters("Practitioner/dr-c1"))
    assert refused.status_code == 403
    assert "scopes" in _outcome(refused)
    assert hub.client.post(f"/fhir/ImagingStudy/{study}/$share").status_code == 401


# -- periods and bad requests -----------------------------------------------------------------


def test_periods_default_to_the_hies_and_never_exceed_its_maximum(hub: Hub) -> None:
    study, _ = hub.study()
    b1 = hub.token("dr-b1", "org-a")
    week = hub.share(b1, study, parameters("Practitioner/dr-c1", days=7))
    period = week.json()["provision"]["period"]
    length = datetime.fromisoformat(period["end"]) - datetime.fromisoformat(period["start"])
    assert length == timedelta(days=7)
    today = datetime.now(UTC).date()
    by_date = hub.share(
        b1, study, parameters("Practitioner/dr-c1", end=str(today + timedelta(days=90)))
    )
    assert by_date.status_code == 201, by_date.text
    assert by_date.json()["provision"]["period"]["end"] == str(today + timedelta(days=90))
    soon = (datetime.now(UTC) + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    assert hub.share(b1, study, parameters("Practitioner/dr-c1", end=soon)).status_code == 201

    too_long = hub.share(b1, study, parameters("Practitioner/dr-c1", days=91))
    assert too_long.status_code == 422
    assert "at most 90 days" in _outcome(too_long)
    late = hub.share(
        b1, study, parameters("Practitioner/dr-c1", end=str(today + timedelta(days=92)))
    )
    assert late.status_code == 422
    past = hub.share(
        b1, study, parameters("Practitioner/dr-c1", end=str(today - timedelta(days=1)))
    )
    assert past.status_code == 400
    assert "has passed" in _outcome(past)
    both = hub.share(b1, study, parameters("Practitioner/dr-c1", end=str(today), days=3))
    assert both.status_code == 400


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (parameters(), 400, "needs a recipient"),
        (parameters("Patient/x"), 400, "Practitioner/<id>"),
        (parameters("Practitioner/dr-b1"), 400, "with yourself"),
        (parameters("Practitioner/dr-c1", purpose="ETREAT"), 400, "break-the-glass"),
        (parameters("Practitioner/dr-c1", purpose="NOPE"), 422, "purpose"),
        (parameters("Practitioner/dr-c1", note="x" * 1001), 400, "longer than"),
        ({"resourceType": "Parameters", "parameter": [{"name": "whom"}]}, 400, "unknown parameter"),
        (
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "recipient", "valueString": "x"}],
            },
            400,
            "valueReference",
        ),
        ({"resourceType": "Patient"}, 400, "Parameters"),
        (
            {"resourceType": "Parameters", "parameter": [{"name": "days", "valueInteger": "x"}]},
            422,
            "Parameters",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(
    hub: Hub, body: dict[str, Any], status: int, says: str
) -> None:
    study, _ = hub.study()
    before = hub.count("Consent")
    answer = hub.share(hub.token("dr-b1", "org-a"), study, body)
    assert answer.status_code == status, answer.text
    text_ = json.dumps(answer.json())
    assert says in text_
    assert hub.count("Consent") == before


def test_unknown_study_and_wrong_media_type(hub: Hub) -> None:
    b1 = hub.token("dr-b1", "org-a")
    assert hub.share(b1, "no-such-study", parameters("Practitioner/dr-c1")).status_code == 404
    study, _ = hub.study()
    wrong = hub.client.post(
        f"/fhir/ImagingStudy/{study}/$share",
        content=b"recipient=x",
        headers={"Authorization": f"Bearer {b1}", "Content-Type": "text/plain"},
    )
    assert wrong.status_code == 415


# -- revoking ---------------------------------------------------------------------------------


def test_the_sharer_revokes_and_the_recipient_is_refused_at_once(hub: Hub) -> None:
    study, uid = hub.study()
    b1 = hub.token("dr-b1", "org-a")
    c1 = hub.token("dr-c1", "org-c")
    cid = hub.share(b1, study, parameters("Practitioner/dr-c1")).json()["id"]
    assert hub.metadata(c1, uid).status_code == 200
    before = len(hub.audits("revoke"))

    ended = hub.revoke(b1, cid)
    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "inactive"
    assert ended.json()["meta"]["versionId"] == "2"
    refused = hub.metadata(c1, uid)
    assert refused.status_code == 403
    assert "the share of this study with you was revoked" in _outcome(refused)
    operator = hub.token("op", "hie", role="operator", purposes=("HOPERAT",))
    history = hub.client.get(
        f"/fhir/Consent/{cid}/_history", headers={"Authorization": f"Bearer {operator}"}
    ).json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["inactive", "active"]

    again = hub.revoke(b1, cid)  # idempotent: no new version
    assert again.status_code == 200
    assert again.json()["meta"]["versionId"] == "2"
    events = hub.audits("revoke")[before:]
    assert [e["outcome"] for e in events] == ["0", "0"]
    assert f"Consent/{cid}" in json.dumps(events[0]["entity"])


def test_who_may_revoke(hub: Hub) -> None:
    study, _ = hub.study()
    b1 = hub.token("dr-b1", "org-a")
    allowed = {
        "holding organisation": hub.token("dr-b2", "org-a"),
        "patient": hub.token(
            "pat-1",
            role="patient",
            purposes=(),
            patient=hub.patients["p1"],
            scope="patient/Consent.cu",
        ),
        "operator": hub.token("op", "hie", role="operator", purposes=("HOPERAT",)),
    }
    for who, token in allowed.items():
        cid = hub.share(b1, study, parameters("Practitioner/dr-c1")).json()["id"]
        answer = hub.revoke(token, cid)
        assert answer.status_code == 200, (who, answer.text)
    cid = hub.share(b1, study, parameters("Practitioner/dr-c1")).json()["id"]
    for token in (hub.token("dr-c1", "org-c"), hub.token("dr-b9", "org-b")):
        refused = hub.revoke(token, cid)
        assert refused.status_code == 403
        assert "can revoke this share" in _outcome(refused)
    assert hub.audits("revoke")[-1]["outcome"] == "4"


def test_only_shares_are_revoked_here(hub: Hub) -> None:
    operator = hub.token("op", "hie", role="operator", purposes=("HOPERAT",))
    assert hub.revoke(operator, "no-such-consent").status_code == 404
    own = hub.services.resources.create(
        "Consent",
        {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{hub.patients['p2']}"},
            "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
            "provision": {"type": "permit"},
        },
    )
    refused = hub.revoke(operator, own.stored.id)
    assert refused.status_code == 400
    assert "not a provider share" in _outcome(refused)


# -- operators' list --------------------------------------------------------------------------


def test_operators_list_a_patients_active_shares(hub: Hub) -> None:
    study, _ = hub.study("p2")
    p2 = hub.patients["p2"]
    # p2 opted out above, so the patient shares (patients may) rather than the holder
    me = hub.token("pat-2", role="patient", purposes=(), patient=p2, scope="patient/Consent.cu")
    kept = hub.share(me, study, parameters("Practitioner/dr-f1", purpose="COC", note="for the GP"))
    assert kept.status_code == 201, kept.text
    gone = hub.share(me, study, parameters("Organization/org-f")).json()["id"]
    assert hub.revoke(me, gone).status_code == 200
    operator = hub.token("op", "hie", role="operator", purposes=("HOPERAT",))

    listed = hub.client.get(
        f"/admin/shares?patient={p2}", headers={"Authorization": f"Bearer {operator}"}
    )
    assert listed.status_code == 200, listed.text
    (share,) = listed.json()["shares"]
    assert share["id"] == kept.json()["id"]
    assert share["study"] == study
    assert share["sharer"] == f"Patient/{p2}"
    assert share["recipients"] == ["Practitioner/dr-f1"]
    assert share["purpose"] == "COC"
    assert share["note"] == "for the GP"
    assert set(share["period"]) == {"start", "end"}

    clinician = hub.client.get(
        f"/admin/shares?patient={p2}",
        headers={"Authorization": f"Bearer {hub.token('dr-b1', 'org-a')}"},
    )
    assert clinician.status_code == 403
    assert clinician.json()["error"]["message"] == "only HIE operators may list a patient's shares"
    missing = hub.client.get("/admin/shares", headers={"Authorization": f"Bearer {operator}"})
    assert missing.status_code == 400
    assert "patient" in missing.json()["error"]["message"]


# -- failure --------------------------------------------------------------------------------


def test_a_share_that_cannot_be_audited_is_withdrawn(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, uid = hub.study()
    audit = hub.services.audit

    def broken(_event: dict[str, Any]) -> str:
        raise AuditUnavailable("the audit trail could not be written, so access is refused")

    monkeypatch.setattr(audit, "record", broken)
    answer = hub.share(hub.token("dr-b1", "org-a"), study, parameters("Practitioner/dr-g1"))
    monkeypatch.undo()
    assert answer.status_code == 503
    shares = [
        s
        for s in sharing.shares_of_patients(
            hub.services.resources,  # type: ignore[arg-type]
            [hub.patients["p1"]],
            datetime.now(UTC),
            every=True,
        )
        if s.study == study
    ]
    assert [s.status for s in shares] == ["entered-in-error"]
    assert hub.metadata(hub.token("dr-g1", "org-g"), uid).status_code == 403


def test_an_expired_share_grants_nothing(hub: Hub) -> None:
    study, uid = hub.study()
    b1 = hub.services.tokens.validate(hub.token("dr-b1", "org-a"))
    long_ago = datetime.now(UTC) - timedelta(days=10)
    stored = sharing.share_study(
        hub.services,
        b1,
        study,
        sharing.ShareRequest(("Practitioner/dr-h1",), days=2),
        None,
        long_ago,
    )
    assert stored.body["provision"]["period"]["end"] < datetime.now(UTC).isoformat()
    refused = hub.metadata(hub.token("dr-h1", "org-h"), uid)
    assert refused.status_code == 403
    assert "the share of this study with you ended on" in _outcome(refused)
    # ... and its recipient, no longer one, is refused sharing for want of a view
    with pytest.raises(Forbidden, match="you may only share studies you may view"):
        sharing.share_study(
            hub.services,
            hub.services.tokens.validate(hub.token("dr-h1", "org-h")),
            study,
            sharing.ShareRequest(("Practitioner/dr-i1",)),
            None,
        )


def test_a_hub_reading_an_external_consent_registry_does_not_share(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "hub",
        dev_mode=True,
        dev_idp=True,
        public_url=HUB,
        consent_source="registry",
        consent_registry_url="http://registry.test/fhir",
    )
    app = create_app(settings)
    with TestClient(app, base_url=HUB, raise_server_exceptions=False) as client:
        services: HubServices = app.state.services
        assert services.idp is not None
        token = services.idp.issue(sub="dr-b1", role="clinician", org="org-a", purpose=["TREAT"])
        answer = client.post(
            "/fhir/ImagingStudy/s1/$share",
            content=json.dumps(parameters("Practitioner/dr-c1")),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        )
    assert answer.status_code == 501
    assert "external registry" in _outcome(answer)
