"""The hub's FHIR REST API as a FHIR client sees it, on SQLite and on PostgreSQL.

Each test runs twice: against the session's federation (SQLite) and against a
hub of its own on a throwaway PostgreSQL server.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from exchange.federation import LocalFederation
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests.pg import postgres_server, unavailable_reason

pytestmark = pytest.mark.integration

FHIR = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UID_ROOT = "1.2.826.0.1.3680043.10.1386"


@dataclass
class Hub:
    url: str
    tokens: dict[str, str]
    http: httpx.Client

    @property
    def fhir(self) -> str:
        return f"{self.url}/fhir"

    def headers(self, who: str = "operator", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}", "Content-Type": FHIR, **extra}

    def client(self, who: str = "operator"):
        from fhirpy import SyncFHIRClient

        return SyncFHIRClient(self.fhir, authorization=f"Bearer {self.tokens[who]}")

    def post(self, resource: dict, who: str = "operator") -> dict:
        answer = self.http.post(
            f"{self.fhir}/{resource['resourceType']}", json=resource, headers=self.headers(who)
        )
        assert answer.status_code == 201, answer.text
        return answer.json()

    def get(self, path: str, who: str = "operator", **params) -> httpx.Response:
        return self.http.get(f"{self.fhir}/{path}", params=params, headers=self.headers(who))


def _tokens(url: str, data_dir: Path) -> dict[str, str]:
    idp = DevIdentityProvider(f"{url}/idp", load_or_create(key_path(data_dir)), "exchange")
    return {
        "operator": idp.issue(sub="op", role="operator", org="hie"),
        "site": idp.issue(sub="site-a-publisher", role="system", org="org-a"),
        "clinician": idp.issue(sub="dr", role="clinician", org="org-a"),
        # another organisation's clinician who states no purpose of use
        "outsider": idp.issue(sub="dr-z", role="clinician", org="org-z"),
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hub(request, tmp_path_factory):
    if request.param == "sqlite":
        service = request.getfixturevalue("federation").hub
        with httpx.Client(timeout=30) as http:
            yield Hub(service.url, _tokens(service.url, service.data_dir), http)
        return
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_server() as url:
        root = Path(
            tempfile.mkdtemp(prefix="exchange-fhir-pg-", dir=tmp_path_factory.getbasetemp())
        )
        with LocalFederation(root, [], hub_env={"EXCHANGE_DATABASE_URL": url}) as federation:
            service = federation.hub
            with httpx.Client(timeout=30) as http:
                yield Hub(service.url, _tokens(service.url, service.data_dir), http)


# -- resources shaped like the profiles want them ---------------------------------


def endpoint(name: str = "Hub broker") -> dict:
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "name": name,
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM"}],
        "address": "https://hub.example/dicomweb",
        "managingOrganization": {"reference": "Organization/org-a"},
    }


def patient(mrn: str, family: str = "Synthetic") -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:exchange:site-a:mrn", "value": mrn}],
        "managingOrganization": {"reference": "Organization/org-a"},
        "name": [{"family": family, "given": ["Test"]}],
        "gender": "female",
        "birthDate": "1980-02-03",
    }


def study(uid: str, patient_id: str, endpoint_id: str, modality: str = "CT") -> dict:
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "started": "2026-03-10T12:00:00Z",
        "modality": [{"system": DCM, "code": modality}],
        "endpoint": [{"reference": f"Endpoint/{endpoint_id}"}],
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [
            {
                "uid": f"{uid}.1",
                "number": 1,
                "modality": {"system": DCM, "code": modality},
                "numberOfInstances": 1,
                "instance": [
                    {
                        "uid": f"{uid}.1.1",
                        "number": 1,
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
                        },
                    }
                ],
            }
        ],
    }


def new_uid() -> str:
    return f"{UID_ROOT}.{uuid.uuid4().int % 10**12}"


@pytest.fixture
def subject(hub):
    """A fresh patient and endpoint, so each test's searches see only its own studies."""
    mrn = f"MRN-{uuid.uuid4().hex[:10]}"
    return hub.post(patient(mrn)), hub.post(endpoint())


def _bundle(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == FHIR
    data = response.json()
    Bundle.model_validate(data)
    return data


# -- the tests ---------------------------------------------------------------------


def test_capability_statement_lists_what_is_supported(hub):
    statement = httpx.get(f"{hub.fhir}/metadata").json()
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    study_caps = by_type["ImagingStudy"]
    assert {i["code"] for i in study_caps["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
        "create",
        "update",
        "delete",
    }
    params = {p["name"]: p["type"] for p in study_caps["searchParam"]}
    assert params["started"] == "date"
    assert params["patient"] == "reference"
    assert "ImagingStudy:endpoint" in study_caps["searchInclude"]
    assert study_caps["conditionalUpdate"] is True
    assert study_caps["conditionalDelete"] == "not-supported"
    audit = by_type["AuditEvent"]
    assert {i["code"] for i in audit["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
    }


def test_a_client_creates_reads_and_publishes_idempotently(hub, subject):
    pat, ep = subject
    client = hub.client("site")
    uid = new_uid()
    published = client.resource("ImagingStudy", **study(uid, pat["id"], ep["id"]))
    searchset = client.resources("ImagingStudy").search(identifier=f"urn:dicom:uid|urn:oid:{uid}")

    first, created = searchset.update(published)
    assert created
    again, created_again = searchset.update(published)
    assert not created_again
    assert again.id == first.id
    assert again["meta"]["versionId"] == "1"  # the same content is not a new version

    changed = client.resource("ImagingStudy", **study(uid, pat["id"], ep["id"], modality="MR"))
    updated, _ = searchset.update(changed)
    assert updated["meta"]["versionId"] == "2"
    fetched = client.reference("ImagingStudy", first.id).to_resource()
    assert fetched["modality"][0]["code"] == "MR"

    history = _bundle(hub.get(f"ImagingStudy/{first.id}/_history"))
    assert history["type"] == "history"
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


def test_conditional_create_with_if_none_exist(hub, subject):
    pat, ep = subject
    uid = new_uid()
    headers = hub.headers("site", **{"If-None-Exist": f"identifier=urn:dicom:uid|urn:oid:{uid}"})
    body = study(uid, pat["id"], ep["id"])
    first = hub.http.post(f"{hub.fhir}/ImagingStudy", json=body, headers=headers)
    second = hub.http.post(f"{hub.fhir}/ImagingStudy", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]


def test_search_and_page_through_imaging_studies(hub, subject):
    pat, ep = subject
    for _ in range(23):
        hub.post(study(new_uid(), pat["id"], ep["id"]), who="site")
    client = hub.client("operator")
    found = client.resources("ImagingStudy").search(patient=pat["id"]).limit(5).fetch_all()
    assert len(found) == len({s.id for s in found}) == 23
    assert client.resources("ImagingStudy").search(patient=pat["id"]).count() == 23

    first = _bundle(hub.get("ImagingStudy", patient=pat["id"], _count=5, _sort="-_lastUpdated"))
    assert first["total"] == 23
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert links["next"].startswith(f"{hub.fhir}/ImagingStudy?")
    second = _bundle(hub.http.get(links["next"], headers=hub.headers()))
    previous = {link["relation"]: link["url"] for link in second["link"]}["previous"]
    assert _bundle(hub.http.get(previous, headers=hub.headers()))["entry"] == first["entry"]

    mrn = pat["identifier"][0]["value"]
    chained = _bundle(
        hub.get("ImagingStudy", **{"patient.identifier": f"urn:exchange:site-a:mrn|{mrn}"})
    )
    assert chained["total"] == 23
    posted = hub.http.post(
        f"{hub.fhir}/ImagingStudy/_search",
        content=f"patient={pat['id']}&started=ge2026-03-01&_summary=count",
        headers={**hub.headers(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert _bundle(posted)["total"] == 23
    assert "entry" not in posted.json()
    assert _bundle(hub.get("ImagingStudy", patient=pat["id"], started="lt2026-03-01"))["total"] == 0


def test_include_returns_the_endpoints(hub, subject):
    pat, ep = subject
    for _ in range(2):
        hub.post(study(new_uid(), pat["id"], ep["id"]), who="site")
    found = _bundle(
        hub.get(
            "ImagingStudy",
            patient=pat["id"],
            _include=["ImagingStudy:endpoint", "ImagingStudy:subject"],
        )
    )
    modes = [(e["search"]["mode"], e["resource"]["resourceType"]) for e in found["entry"]]
    assert modes == [
        ("match", "ImagingStudy"),
        ("match", "ImagingStudy"),
        ("include", "Endpoint"),
        ("include", "Patient"),
    ]
    assert found["total"] == 2  # includes are not counted
    assert found["entry"][2]["fullUrl"] == f"{hub.fhir}/Endpoint/{ep['id']}"


def test_paging_over_a_thousand_results_returns_each_once(hub):
    system = f"urn:test:paging:{uuid.uuid4().hex}"
    started = time.monotonic()

    def create(n: int) -> str:
        org = {"resourceType": "Organization", "identifier": [{"system": system, "value": str(n)}]}
        return hub.post(org)["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = set(pool.map(create, range(1000)))
    print(f"1000 creates: {time.monotonic() - started:.1f}s")

    seen: list[str] = []
    url: str | None = f"{hub.fhir}/Organization?identifier={system}|&_count=150"
    while url:
        page = _bundle(hub.http.get(url, headers=hub.headers()))
        assert page["total"] == 1000
        seen += [e["resource"]["id"] for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert len(seen) == 1000
    assert set(seen) == created

    counted = _bundle(hub.get("Organization", identifier=f"{system}|", _summary="count"))
    assert counted["total"] == 1000
    assert "entry" not in counted
    capped = _bundle(hub.get("Organization", identifier=f"{system}|", _count=100000))
    assert len([e for e in capped["entry"] if e["search"]["mode"] == "match"]) == 500
    assert capped["entry"][-1]["search"]["mode"] == "outcome"


def test_unknown_parameters_are_400_unless_lenient(hub):
    strict = hub.get("Organization", colour="red")
    assert strict.status_code == 400
    assert strict.json()["resourceType"] == "OperationOutcome"
    assert "colour" in strict.json()["issue"][0]["diagnostics"]
    lenient = hub.http.get(
        f"{hub.fhir}/Organization",
        params={"colour": "red", "_count": 1},
        headers=hub.headers(Prefer="handling=lenient"),
    )
    data = _bundle(lenient)
    assert data["entry"][-1]["search"]["mode"] == "outcome"
    assert "colour" not in data["link"][0]["url"]
    assert hub.get("ImagingStudy", started="yesterday").status_code == 400


def test_string_searches_ignore_case_and_accents(hub):
    tag = uuid.uuid4().hex[:8]
    umlaut = hub.post(patient(f"S-{tag}", family=f"Müller{tag}"))["id"]
    spelled = hub.post(patient(f"T-{tag}", family=f"Mueller{tag}"))["id"]

    def found(**params) -> list[str]:
        return [e["resource"]["id"] for e in _bundle(hub.get("Patient", **params)).get("entry", [])]

    assert found(family=f"MULLER{tag[:4]}") == [umlaut]
    assert found(name=f"müller{tag}", gender="female", birthdate="1980") == [umlaut]
    assert found(**{"family:exact": f"Müller{tag}"}) == [umlaut]
    assert found(**{"family:exact": f"muller{tag}"}) == []
    assert sorted(found(**{"name:contains": f"LLER{tag}"})) == sorted([umlaut, spelled])


def test_elements_and_summary(hub, subject):
    pat, _ep = subject
    data = _bundle(hub.get("Patient", _id=pat["id"], _elements="name"))
    resource = data["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "name"}
    assert resource["meta"]["tag"][0]["code"] == "SUBSETTED"


def test_versions_if_match_delete_and_gone(hub):
    headers = hub.headers()
    created = hub.post({"resourceType": "Organization", "name": "Short-lived"})
    rid = created["id"]
    url = f"{hub.fhir}/Organization/{rid}"
    body = {"resourceType": "Organization", "id": rid, "name": "Renamed"}
    stale = hub.http.put(url, json=body, headers={**headers, "If-Match": 'W/"9"'})
    assert stale.status_code == 412
    minimal = hub.http.put(
        url, json=body, headers={**headers, "If-Match": 'W/"1"', "Prefer": "return=minimal"}
    )
    assert (minimal.status_code, minimal.content) == (200, b"")
    assert minimal.headers["etag"] == 'W/"2"'
    assert hub.http.get(url, headers={**headers, "If-None-Match": 'W/"2"'}).status_code == 304

    assert hub.http.delete(url, headers={**headers, "If-Match": 'W/"1"'}).status_code == 412
    deleted = hub.http.delete(url, headers=headers)
    assert deleted.status_code == 200
    assert deleted.json()["resourceType"] == "OperationOutcome"
    gone = hub.http.get(url, headers=headers)
    assert gone.status_code == 410
    assert gone.json()["issue"][0]["code"] == "deleted"
    assert hub.http.get(f"{url}/_history/2", headers=headers).json()["name"] == "Renamed"
    history = _bundle(hub.http.get(f"{url}/_history", headers=headers))
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "PUT", "POST"]
    assert "resource" not in history["entry"][0]
    assert _bundle(hub.get("Organization", _id=rid))["total"] == 0
    assert hub.http.get(f"{hub.fhir}/Organization/no-such-id", headers=headers).status_code == 404


def test_audit_events_cannot_be_changed_by_clients(hub):
    for method in ("PUT", "DELETE"):
        answer = hub.http.request(
            method,
            f"{hub.fhir}/AuditEvent/x",
            json={"resourceType": "AuditEvent"},
            headers=hub.headers(),
        )
        assert answer.status_code == 405
    assert _bundle(hub.get("AuditEvent", _summary="count"))["total"] >= 0


def test_clinicians_find_only_the_studies_the_policy_lets_them_see(hub, subject):
    pat, ep = subject
    created = hub.post(study(new_uid(), pat["id"], ep["id"]), who="site")
    # the holding organisation's own clinician finds it ...
    own = _bundle(hub.get("ImagingStudy", who="clinician", _id=created["id"]))
    assert own["total"] == 1
    # ... another organisation's clinician without a purpose of use sees no trace of it
    hidden = _bundle(hub.get("ImagingStudy", who="outsider", _id=created["id"]))
    assert hidden["total"] == 0
    assert "entry" not in hidden
    counted = _bundle(hub.get("ImagingStudy", who="outsider", _id=created["id"], _summary="count"))
    assert counted["total"] == 0
    refused = hub.get(f"ImagingStudy/{created['id']}", who="outsider")
    assert refused.status_code == 403
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert "purpose of use" in refused.text
    # the directory is theirs to search; a DICOMweb address is the hub's broker
    endpoints = _bundle(hub.get("Endpoint", who="clinician", _id=ep["id"]))
    assert endpoints["total"] == 1
    assert endpoints["entry"][0]["resource"]["address"].endswith("/dicomweb")
    assert endpoints["entry"][0]["resource"]["address"].startswith(hub.url)


def _invalid_studies(patient_id: str, endpoint_id: str) -> list[tuple[str, dict, str]]:
    good = study(f"{UID_ROOT}.950.{uuid.uuid4().int % 10**8}", patient_id, endpoint_id)
    wrong_system = dict(
        good, identifier=[{"system": "urn:ietf:rfc:3986", "value": good["identifier"][0]["value"]}]
    )
    bad_modality = dict(good, modality=[{"system": "http://example.org/modalities", "code": "CT"}])
    return [
        (
            "missing subject",
            {k: v for k, v in good.items() if k != "subject"},
            "ImagingStudy.subject",
        ),
        ("wrong identifier system", wrong_system, "ImagingStudy.identifier[0].system"),
        ("bad date", dict(good, started="2026-13-45"), "ImagingStudy.started"),
        ("unknown modality system", bad_modality, "ImagingStudy.modality[0].system"),
    ]


def test_invalid_resources_get_precise_outcomes_and_store_nothing(hub):
    pat = hub.post(patient(f"INV-{uuid.uuid4().hex[:8]}"))
    ep = hub.post(endpoint())
    before = _bundle(hub.get("ImagingStudy", _summary="count"))["total"]
    for what, body, expression in _invalid_studies(pat["id"], ep["id"]):
        answer = hub.http.post(f"{hub.fhir}/ImagingStudy", json=body, headers=hub.headers())
        assert answer.status_code == 422, (what, answer.text)
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome"
        located = [e for issue in outcome["issue"] for e in issue.get("expression", [])]
        assert any(e.startswith(expression) for e in located), (what, located)
    wrong_type = hub.http.post(
        f"{hub.fhir}/ImagingStudy", json=patient("X-1"), headers=hub.headers()
    )
    assert wrong_type.status_code == 400
    not_json = hub.http.post(
        f"{hub.fhir}/ImagingStudy", content=b"{not json", headers=hub.headers()
    )
    assert not_json.status_code == 400
    assert not_json.json()["resourceType"] == "OperationOutcome"
    assert _bundle(hub.get("ImagingStudy", _summary="count"))["total"] == before
