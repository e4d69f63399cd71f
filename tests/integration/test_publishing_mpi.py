"""Sites publish only what they hold; the master patient index links one person's records.

Runs on SQLite and on PostgreSQL (a throwaway server), against a real hub process.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exchange.federation import LocalFederation
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests.pg import postgres_server, unavailable_reason

pytestmark = pytest.mark.integration

HIE = "urn:oid:2.16.840.1.113883.3.7777.1"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
FHIR = "application/fhir+json"


class Hub:
    def __init__(self, url: str, idp: DevIdentityProvider) -> None:
        self.url = f"{url}/fhir"
        self.base = url
        self.tokens = {
            "a": idp.issue(sub="site-a", role="system", org="org-a"),
            "b": idp.issue(sub="site-b", role="system", org="org-b"),
            "operator": idp.issue(sub="op", role="operator", org="hie"),
            "clinician": idp.issue(sub="dr", role="clinician", org="org-a"),
        }

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}", "Content-Type": FHIR}

    def put(self, who: str, path: str, body: dict) -> httpx.Response:
        return httpx.put(f"{self.url}/{path}", json=body, headers=self.headers(who), timeout=30)

    def get(self, who: str, path: str, **params: str) -> httpx.Response:
        return httpx.get(f"{self.url}/{path}", params=params, headers=self.headers(who), timeout=30)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hub(request) -> Iterator[Hub]:
    env = {"EXCHANGE_HIE_IDENTIFIER_SYSTEM": HIE}
    with _database(request.param) as url:
        if url:
            env["EXCHANGE_DATABASE_URL"] = url
        root = Path(tempfile.mkdtemp(prefix="exchange-mpi-"))
        with LocalFederation(root, [], hub_env=env) as federation:
            idp = DevIdentityProvider(
                f"{federation.hub.url}/idp",
                load_or_create(key_path(federation.hub.data_dir)),
                "exchange",
            )
            hub = Hub(federation.hub.url, idp)
            for site in ("a", "b"):
                assert hub.put(site, f"Endpoint/site-{site}", _endpoint(site)).status_code in (
                    200,
                    201,
                )
            yield hub


def _database(kind: str):  # type: ignore[no-untyped-def]
    import contextlib

    if kind == "sqlite":
        return contextlib.nullcontext(None)
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    return postgres_server()


def _endpoint(site: str, org: str | None = None, code: str = "dicom-wado-rs") -> dict:
    return {
        "resourceType": "Endpoint",
        "id": f"site-{site}",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": code,
        },
        "managingOrganization": {"reference": f"Organization/{org or 'org-' + site}"},
        "payloadType": [{"text": "DICOM"}],
        "address": f"https://site-{site}.example.org/dicomweb",
    }


def _patient(
    site: str, mrn: str, hie: str | None, family: str = "Synthetic", given: str = "Avery"
) -> dict:
    identifiers = [{"system": f"urn:exchange:site-{site}:mrn", "value": mrn}]
    if hie:
        identifiers.append({"system": HIE, "value": hie})
    return {
        "resourceType": "Patient",
        "identifier": identifiers,
        "managingOrganization": {"reference": f"Organization/org-{site}"},
        "name": [{"family": family, "given": [given]}],
        "birthDate": "1970-01-01",
        "gender": "other",
    }


def _study(uid: str, patient: str, endpoint: str) -> dict:
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "started": "2026-03-10",
        "modality": [{"system": DCM, "code": "CT"}],
        "endpoint": [{"reference": endpoint}],
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


def _publish_patient(hub: Hub, site: str, body: dict) -> dict:
    mrn = body["identifier"][0]
    response = hub.put(site, f"Patient?identifier={mrn['system']}|{mrn['value']}", body)
    assert response.status_code in (200, 201), response.text
    return response.json()


def _publish_study(hub: Hub, site: str, body: dict) -> httpx.Response:
    uid = body["identifier"][0]["value"]
    return hub.put(site, f"ImagingStudy?identifier=urn:dicom:uid|{uid}", body)


def test_site_may_only_manage_its_own_endpoint(hub):
    refused = hub.put("a", "Endpoint/site-a", _endpoint("a", org="org-b"))
    assert refused.status_code == 403
    assert "own organisation" in refused.json()["issue"][0]["diagnostics"]
    takeover = hub.put("a", "Endpoint/site-b", _endpoint("b"))
    assert takeover.status_code == 403


def test_publishing_a_study_through_another_sites_endpoint_is_refused(hub):
    patient = _publish_patient(hub, "a", _patient("a", "A-EP", None))
    response = _publish_study(
        hub, "a", _study("1.2.826.0.1.3680043.10.1386.900.1", patient["id"], "Endpoint/site-b")
    )
    assert response.status_code == 403
    assert "another organisation" in response.json()["issue"][0]["diagnostics"]


def test_publishing_is_idempotent_and_a_study_cannot_be_taken_over(hub):
    patient = _publish_patient(hub, "a", _patient("a", "A-IDEM", None))
    study = _study("1.2.826.0.1.3680043.10.1386.900.2", patient["id"], "Endpoint/site-a")
    first = _publish_study(hub, "a", study)
    assert first.status_code == 201, first.text
    again = _publish_study(hub, "a", study)
    assert again.status_code == 200
    assert again.json()["meta"]["versionId"] == "1"
    stolen = _publish_study(hub, "b", {**study, "endpoint": [{"reference": "Endpoint/site-b"}]})
    assert stolen.status_code == 403
    assert hub.get("operator", f"ImagingStudy/{first.json()['id']}").json()["endpoint"] == [
        {"reference": "Endpoint/site-a"}
    ]


def test_a_study_needs_a_dicomweb_endpoint(hub):
    assert (
        hub.put(
            "a",
            "Endpoint/site-a-fax",
            {**_endpoint("a", code="direct-project"), "id": "site-a-fax"},
        ).status_code
        == 201
    )
    patient = _publish_patient(hub, "a", _patient("a", "A-FAX", None))
    response = _publish_study(
        hub, "a", _study("1.2.826.0.1.3680043.10.1386.900.3", patient["id"], "Endpoint/site-a-fax")
    )
    assert response.status_code == 422


def test_same_hie_identifier_links_records_and_search_spans_sites(hub):
    pa = _publish_patient(hub, "a", _patient("a", "A-2001", "HIE-2001"))
    pb = _publish_patient(hub, "b", _patient("b", "B-9001", "HIE-2001"))
    linked = hub.get("operator", f"Patient/{pa['id']}").json()
    assert {"other": {"reference": f"Patient/{pb['id']}"}, "type": "seealso"} in linked["link"]
    assert (
        _publish_study(
            hub, "a", _study("1.2.826.0.1.3680043.10.1386.901.1", pa["id"], "Endpoint/site-a")
        ).status_code
        == 201
    )
    assert (
        _publish_study(
            hub, "b", _study("1.2.826.0.1.3680043.10.1386.901.2", pb["id"], "Endpoint/site-b")
        ).status_code
        == 201
    )

    for params in (
        {"patient": pa["id"]},
        {"patient": f"Patient/{pb['id']}"},
        {"patient.identifier": "urn:exchange:site-a:mrn|A-2001"},
    ):
        found = hub.get("operator", "ImagingStudy", **params).json()
        assert found["total"] == 2, params
        endpoints = {e["resource"]["endpoint"][0]["reference"] for e in found["entry"]}
        assert endpoints == {"Endpoint/site-a", "Endpoint/site-b"}

    # The site re-publishing its record (it knows nothing of links) changes nothing.
    again = _publish_patient(hub, "a", _patient("a", "A-2001", "HIE-2001"))
    assert again["meta"]["versionId"] == linked["meta"]["versionId"]
    assert again["link"] == linked["link"]


def test_probable_match_waits_for_an_operator(hub):
    pa = _publish_patient(hub, "a", _patient("a", "A-3001", None, "Probable", "Casey"))
    pb = _publish_patient(hub, "b", _patient("b", "B-3001", None, "Probable", "Casey"))
    assert "link" not in hub.get("operator", f"Patient/{pa['id']}").json()
    review = httpx.get(f"{hub.base}/admin/mpi/review", headers=hub.headers("operator")).json()
    pair = {f"Patient/{pa['id']}", f"Patient/{pb['id']}"}
    assert any(set(item["patients"]) == pair for item in review["items"])

    denied = httpx.post(
        f"{hub.base}/admin/mpi/link",
        headers=hub.headers("clinician"),
        json={"patients": sorted(pair)},
    )
    assert denied.status_code == 403
    assert (
        httpx.post(
            f"{hub.base}/admin/mpi/link",
            headers=hub.headers("operator"),
            json={"patients": sorted(pair)},
        ).status_code
        == 200
    )
    assert (
        _publish_study(
            hub, "b", _study("1.2.826.0.1.3680043.10.1386.902.1", pb["id"], "Endpoint/site-b")
        ).status_code
        == 201
    )
    assert hub.get("operator", "ImagingStudy", patient=pa["id"]).json()["total"] == 1

    assert (
        httpx.post(
            f"{hub.base}/admin/mpi/unlink",
            headers=hub.headers("operator"),
            json={"patients": sorted(pair)},
        ).status_code
        == 200
    )
    assert hub.get("operator", "ImagingStudy", patient=pa["id"]).json()["total"] == 0
    assert "link" not in hub.get("operator", f"Patient/{pa['id']}").json()
