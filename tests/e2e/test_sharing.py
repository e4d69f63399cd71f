"""Issue 8, provider sharing end to end: share, view through the broker, one hop, revoke.

Real processes on loopback: a hub with the development IdP and two site nodes
(site-a for org-a, site-b for org-b); org-c and org-d have no node. The HIE runs
opt-in here (a copy of policies/ with mode opt-in), so another organisation sees a
study only when a consent permits it: whatever C1 sees, the share gave. Grants live
``GRANT_TTL`` seconds, so the test of an outstanding grant is short.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from exchange.federation import LocalFederation
from tests.e2e.test_brokered_federation import SITES, Hub, import_study, subject_of

pytestmark = pytest.mark.e2e

POLICIES = Path(__file__).resolve().parents[2] / "policies"
GRANT_TTL = 5
AUDIT = "https://exchange.example.org/fhir/CodeSystem/audit"
SHARED_FURTHER = "shared studies cannot be shared further"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root: Path = tmp_path_factory.mktemp("sharing")
    policies = root / "policies"
    shutil.copytree(POLICIES, policies)
    data = json.loads((policies / "data.json").read_text())
    data["exchange"]["settings"]["mode"] = "opt-in"
    (policies / "data.json").write_text(json.dumps(data))
    hub_env = {"EXCHANGE_POLICY_DIR": str(policies), "EXCHANGE_GRANT_TTL_SECONDS": str(GRANT_TTL)}
    with LocalFederation(root=root, nodes=SITES, hub_env=hub_env) as fed:
        yield fed


@pytest.fixture(scope="module")
def hub(federation: LocalFederation) -> Iterator[Hub]:
    h = Hub(federation)
    yield h
    h.http.close()


def share(hub: Hub, token: str, study: str, *recipients: str, **extra: Any) -> httpx.Response:
    parameters: list[dict[str, Any]] = [
        {"name": "recipient", "valueReference": {"reference": r}} for r in recipients
    ]
    if "note" in extra:
        parameters.append({"name": "note", "valueString": extra["note"]})
    body = {"resourceType": "Parameters", "parameter": parameters}
    return hub.fhir("POST", f"ImagingStudy/{study}/$share", token, json=body)


def outcome(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/fhir+json", response.text
    return str(response.json()["issue"][0]["diagnostics"])


def metadata(hub: Hub, token: str, uid: str) -> httpx.Response:
    return hub.http.get(
        f"/dicomweb/studies/{uid}/metadata", headers={"Authorization": f"Bearer {token}"}
    )


def audited(hub: Hub, study: str, action: str) -> list[dict[str, Any]]:
    found = hub.search(
        f"AuditEvent?entity=ImagingStudy/{study}&subtype={AUDIT}|{action}&_count=100",
        hub.operator,
    )
    return [e["resource"] for e in found.get("entry", [])]


def by(event: dict[str, Any]) -> str:
    return str(event["agent"][0]["who"]["identifier"]["value"])


# -- acceptance 1: share, view, one hop, revoke -----------------------------------------------


def test_share_view_no_second_hop_and_revocation(hub: Hub) -> None:
    federation = hub.federation
    uid, originals = import_study(federation, "site-b", "SHR-101", slices=3)
    study = hub.wait_indexed(uid)
    b1 = hub.clinician("org-b", sub="dr-b1")
    c1 = hub.clinician("org-c", sub="dr-c1")
    by_uid = f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}"
    assert hub.search(by_uid, c1)["total"] == 0  # opt-in: nothing without consent
    assert metadata(hub, c1, uid).status_code == 403

    made = share(hub, b1, study["id"], "Practitioner/dr-c1", note="second opinion")
    assert made.status_code == 201, made.text
    consent = made.json()
    assert made.headers["location"].endswith(f"/fhir/Consent/{consent['id']}/_history/1")

    # C1 finds the study and views it through the broker with a real DICOMweb client
    assert hub.search(by_uid, c1)["total"] == 1
    client = hub.dicomweb(c1)
    seen = client.retrieve_study_metadata(uid)
    assert sorted(m["00080018"]["Value"][0] for m in seen) == sorted(
        str(d.SOPInstanceUID) for d in originals
    )
    first = originals[0]
    rendered = client.retrieve_instance_rendered(
        uid, str(first.SeriesInstanceUID), str(first.SOPInstanceUID), media_types=("image/png",)
    )
    assert rendered[:8] == b"\x89PNG\r\n\x1a\n"

    # one hop: C1 cannot pass it on to D1
    onward = share(hub, c1, study["id"], "Practitioner/dr-d1")
    assert onward.status_code == 403
    assert outcome(onward) == SHARED_FURTHER

    # a grant C1 holds at the node, issued before the revocation
    node = f"{federation.node('site-b').url}/dicomweb/studies/{uid}/metadata"
    held = federation.grant("site-b", uid, "view", ttl=GRANT_TTL, caller="dr-c1")
    assert httpx.get(node, headers={"Authorization": f"Bearer {held}"}).status_code == 200

    started = time.monotonic()
    revoked = hub.http.post(
        f"/fhir/Consent/{consent['id']}/$revoke", headers={"Authorization": f"Bearer {b1}"}
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "inactive"
    while (after := metadata(hub, c1, uid)).status_code == 200:
        assert time.monotonic() - started < 60, "C1 still views 60 s after the revocation"
        time.sleep(0.05)
    refused_in = time.monotonic() - started
    print(f"C1's first refusal came {refused_in * 1000:.0f} ms after B1 sent the revocation")
    assert refused_in < 60
    assert after.status_code == 403
    assert "the share of this study with you was revoked" in outcome(after)
    assert hub.search(by_uid, c1)["total"] == 0

    while httpx.get(node, headers={"Authorization": f"Bearer {held}"}).status_code == 200:
        assert time.monotonic() - started < 60, "an outstanding grant outlived 60 s"
        time.sleep(0.25)
    expired_in = time.monotonic() - started
    print(f"C1's outstanding grant stopped working {expired_in:.1f} s after the revocation")
    assert expired_in < 60

    # every share and revocation left its AuditEvent
    shares = audited(hub, study["id"], "share")
    assert sorted((by(e), e["outcome"]) for e in shares) == [("dr-b1", "0"), ("dr-c1", "4")]
    refusal = next(e for e in shares if e["outcome"] == "4")
    assert refusal["outcomeDesc"] == SHARED_FURTHER
    (revocation,) = audited(hub, study["id"], "revoke")
    assert (by(revocation), revocation["outcome"]) == ("dr-b1", "0")
    assert f"Consent/{consent['id']}" in json.dumps(revocation["entity"])


# -- acceptance 2: no share of what the sharer may not view -----------------------------------


def test_a_study_the_sharer_may_not_view_is_not_shared(hub: Hub) -> None:
    uid, _ = import_study(hub.federation, "site-b", "SHR-202")
    study = hub.wait_indexed(uid)
    hub.consent(subject_of(study), {"type": "deny"})  # the patient opts out

    a1 = hub.clinician("org-a", sub="dr-a1")  # another organisation: may not view it
    refused = share(hub, a1, study["id"], "Practitioner/dr-c1")
    assert refused.status_code == 403
    said = outcome(refused)
    assert "you may only share studies you may view" in said
    assert "opted out" in said
    holder = share(hub, hub.clinician("org-b", sub="dr-b1"), study["id"], "Practitioner/dr-c1")
    assert holder.status_code == 403
    assert outcome(holder) == "the patient has opted out of sharing their images"
    refusals = audited(hub, study["id"], "share")
    assert sorted(by(e) for e in refusals if e["outcome"] == "4") == ["dr-a1", "dr-b1"]
    consents = hub.search(f"Consent?patient={subject_of(study)}", hub.operator)
    assert consents["total"] == 1  # only the opt-out: nothing was shared


# -- operators: the list and the CLI ----------------------------------------------------------


def test_operators_list_and_revoke_shares(hub: Hub) -> None:
    federation = hub.federation
    uid, _ = import_study(federation, "site-b", "SHR-303")
    study = hub.wait_indexed(uid)
    patient = subject_of(study)
    made = share(hub, hub.clinician("org-b", sub="dr-b1"), study["id"], "Organization/org-c")
    assert made.status_code == 201, made.text
    cid = made.json()["id"]
    c7 = hub.clinician("org-c", sub="dr-c7")  # anyone at org-c
    assert metadata(hub, c7, uid).status_code == 200

    listed = hub.http.get(
        f"/admin/shares?patient={patient}", headers={"Authorization": f"Bearer {hub.operator}"}
    )
    assert listed.status_code == 200, listed.text
    (entry,) = listed.json()["shares"]
    assert (entry["id"], entry["study"], entry["sharer"]) == (
        cid,
        study["id"],
        "Practitioner/dr-b1",
    )
    assert entry["recipients"] == ["Organization/org-c"]
    by_category = hub.search(
        f"Consent?patient={patient}&category="
        "https://exchange.example.org/fhir/CodeSystem/consent-kind|provider-share",
        hub.operator,
    )
    assert by_category["total"] == 1

    printed = federation.exchange("hub", "share", "list", "--patient", patient, "--json")
    assert [s["id"] for s in json.loads(printed)] == [cid]
    said = federation.exchange("hub", "share", "revoke", cid)
    assert said.strip() == f"revoked Consent/{cid} (now version 2, inactive)"
    assert metadata(hub, c7, uid).status_code == 403
    assert (
        json.loads(federation.exchange("hub", "share", "list", "--patient", patient, "--json"))
        == []
    )
    assert "intact" in federation.exchange("hub", "audit", "verify")
