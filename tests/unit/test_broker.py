"""The broker in process: a real hub app (index, policy, audit, grants) and a scripted node.

The node is an ``httpx.MockTransport`` behind the broker's client, so each test can
make it answer, fail, stall or break, and see exactly what the broker sent it.
The federation with real nodes is in tests/integration/test_broker.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from exchange.config import load_settings
from exchange.errors import Unavailable
from exchange.hub.app import create_app
from exchange.hub.broker import Broker, NodeStreamBroken, _relay, gathered
from exchange.hub.services import HubServices
from exchange.policy.engine import PolicyError
from exchange.security.grants import GRANT_TYPE

HUB = "http://hub.test"
NODE_X = "http://node-x.test:9001"
NODE_Y = "http://node-y.test:9002"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UID_1, UID_2, UID_3, UID_4 = "1.2.826.1.1", "1.2.826.1.2", "1.2.826.1.3", "1.2.826.1.4"


@dataclass
class Node:
    """Scripted node answers; every request the broker made is kept."""

    seen: list[httpx.Request] = field(default_factory=list)
    answer: Callable[[httpx.Request], httpx.Response] | None = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.answer is not None:
            return self.answer(request)
        return _default_answer(request)


def _default_answer(request: httpx.Request) -> httpx.Response:
    base = f"{request.url.scheme}://{request.url.host}:{request.url.port}/dicomweb"
    if request.url.path == "/dicomweb/studies":
        uid = request.url.params["StudyInstanceUID"]
        study = {
            "0020000D": {"vr": "UI", "Value": [uid]},
            "00081190": {"vr": "UR", "Value": [f"{base}/studies/{uid}"]},
        }
        return httpx.Response(200, json=[study], headers={"Content-Type": "application/dicom+json"})
    body = json.dumps(
        [{"7FE00010": {"vr": "OW", "BulkDataURI": f"{base}{request.url.path[9:]}/bulkdata"}}]
    )
    return httpx.Response(
        200,
        content=body.encode(),
        headers={
            "Content-Type": "application/dicom+json",
            "Connection": "keep-alive",
            "Server": "node",
            "Set-Cookie": "node=1",
        },
    )


@dataclass
class Hub:
    app: FastAPI
    client: TestClient
    services: HubServices
    node: Node
    patients: dict[str, str]
    studies: dict[str, str]

    def token(
        self, org: str, *purposes: str, sub: str | None = None, role: str = "clinician"
    ) -> str:
        assert self.services.idp is not None
        return self.services.idp.issue(
            sub=sub or f"dr-{org}", role=role, org=org, purpose=list(purposes) or ["TREAT"]
        )

    def get(self, path: str, token: str | None, **headers: str) -> httpx.Response:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.get(path, headers=headers)

    def audit_count(self) -> int:
        with self.services.engine.connect() as conn:
            query = text("SELECT count(*) FROM fhir_resource WHERE rtype = 'AuditEvent'")
            return int(conn.execute(query).scalar_one())

    def last_audit(self) -> dict[str, Any]:
        with self.services.engine.connect() as conn:
            query = text(
                "SELECT body FROM fhir_resource WHERE rtype = 'AuditEvent' ORDER BY pk DESC LIMIT 1"
            )
            return dict(json.loads(conn.execute(query).scalar_one()))


def _endpoint(org: str, address: str, node_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "managingOrganization": {"reference": f"Organization/{org}"},
        "payloadType": [{"text": "DICOM"}],
        "address": f"{address}/dicomweb",
    }
    if node_id:
        body["identifier"] = [{"system": "urn:exchange:node", "value": node_id}]
    return body


def _study(uid: str, patient: str, endpoint: str, started: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "started": started,
        "modality": [{"system": DCM, "code": "CT"}],
        "endpoint": [{"reference": f"Endpoint/{endpoint}"}],
    }


def _opt_out(patient: str) -> dict[str, Any]:
    return {
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
        "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
        "provision": {"type": "deny"},
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root: Path = tmp_path_factory.mktemp("broker-hub")
    settings = load_settings(
        data_dir=root, dev_mode=True, dev_idp=True, public_url=HUB, broker_read_timeout_seconds=1
    )
    app = create_app(settings)
    node = Node()
    with TestClient(app, base_url=HUB, raise_server_exceptions=False) as client:
        services: HubServices = app.state.services
        app.state.broker = Broker(services, httpx.MockTransport(node.handle))
        repo = services.resources
        repo.update("Endpoint", "site-x", _endpoint("org-a", NODE_X, "node-x"))
        repo.update("Endpoint", "site-y", _endpoint("org-b", NODE_Y, None))
        patients = {}
        for key, org in (("p1", "org-a"), ("p2", "org-a"), ("p3", "org-b")):
            written = repo.create(
                "Patient",
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": f"urn:test:{org}:mrn", "value": f"MRN-{key}"}],
                    "managingOrganization": {"reference": f"Organization/{org}"},
                },
            )
            patients[key] = written.stored.id
        studies = {}
        for uid, patient, endpoint, started in (
            (UID_1, "p1", "site-x", "2026-03-01"),
            (UID_2, "p2", "site-x", "2026-02-01"),  # p2 opts out below
            (UID_3, "p3", "site-y", "2026-01-01"),
            (UID_4, "p1", "site-x", "2025-12-01"),
        ):
            stored = repo.create("ImagingStudy", _study(uid, patients[patient], endpoint, started))
            studies[uid] = stored.stored.id
        repo.create("Consent", _opt_out(patients["p2"]))
        yield Hub(app, client, services, node, patients, studies)


@pytest.fixture(autouse=True)
def fresh_node(hub: Hub) -> None:
    hub.node.seen.clear()
    hub.node.answer = None


def _claims(request: httpx.Request) -> dict[str, Any]:
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    assert jwt.get_unverified_header(token)["typ"] == GRANT_TYPE
    return dict(jwt.decode(token, options={"verify_signature": False}))


def _outcome(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/fhir+json"
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


# -- within a study ---------------------------------------------------------------------------


def test_metadata_is_fetched_with_a_grant_and_relayed_with_broker_urls(hub: Hub) -> None:
    token = hub.token("org-b")
    before = hub.audit_count()
    response = hub.get(
        f"/dicomweb/studies/{UID_1}/metadata?x=1", token, Accept="application/dicom+json"
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    assert NODE_X not in response.text
    assert f"{HUB}/dicomweb/studies/{UID_1}/metadata/bulkdata" in response.text
    assert "set-cookie" not in response.headers
    assert response.headers.get("server") != "node"

    (sent,) = hub.node.seen
    assert str(sent.url) == f"{NODE_X}/dicomweb/studies/{UID_1}/metadata?x=1"
    assert sent.headers["accept"] == "application/dicom+json"
    assert token not in sent.headers["authorization"]  # never the caller's token
    claims = _claims(sent)
    assert claims["aud"] == "node-x"  # the Endpoint's urn:exchange:node identifier
    assert claims["iss"] == HUB
    assert (claims["study"], claims["act"], claims["sub"]) == (UID_1, "view", "dr-org-b")
    assert claims["org"] == "org-a"
    assert claims["exp"] - claims["iat"] <= 60
    assert hub.audit_count() == before + 1


def test_grant_audience_falls_back_to_the_endpoint_id(hub: Hub) -> None:
    assert hub.get(f"/dicomweb/studies/{UID_3}/metadata", hub.token("org-a")).status_code == 200
    assert _claims(hub.node.seen[0])["aud"] == "site-y"


def test_raw_instances_are_an_export_refused_to_a_viewer(hub: Hub) -> None:
    before = hub.audit_count()
    response = hub.get(f"/dicomweb/studies/{UID_1}", hub.token("org-b"))
    assert response.status_code == 403
    assert "original images" in _outcome(response)
    assert hub.node.seen == []
    assert hub.audit_count() == before + 1  # the refusal is audited


def test_the_custodian_exports_with_an_export_grant(hub: Hub) -> None:
    hub.node.answer = lambda request: httpx.Response(
        200,
        content=b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
    )
    response = hub.get(
        f"/dicomweb/studies/{UID_1}/series/{UID_1}.1",
        hub.token("org-a"),
        Accept='multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert response.status_code == 200
    assert response.content.endswith(b"--b--\r\n")
    assert response.headers["content-type"].startswith("multipart/related")
    (sent,) = hub.node.seen
    assert sent.url.path == f"/dicomweb/studies/{UID_1}/series/{UID_1}.1"
    assert sent.headers["accept"].endswith("transfer-syntax=*")
    assert _claims(sent)["act"] == "export"


def test_opt_out_is_a_403_with_the_reason(hub: Hub) -> None:
    response = hub.get(f"/dicomweb/studies/{UID_2}/metadata", hub.token("org-b"))
    assert response.status_code == 403
    assert "opted out" in _outcome(response)
    assert hub.node.seen == []
    # the holding organisation still sees it
    assert hub.get(f"/dicomweb/studies/{UID_2}/metadata", hub.token("org-a")).status_code == 200


def test_break_the_glass_needs_a_stated_reason(hub: Hub) -> None:
    emergency = hub.token("org-b", "ETREAT", sub="dr-er")
    path = f"/dicomweb/studies/{UID_2}/rendered"
    assert hub.get(path, emergency).status_code == 403
    assert hub.node.seen == []
    refused = hub.last_audit()
    assert refused["outcome"] == "4"
    allowed = hub.get(path, emergency, **{"X-Break-Glass-Reason": "unconscious in ED"})
    assert allowed.status_code == 200
    assert len(hub.node.seen) == 1
    event = json.dumps(hub.last_audit())
    assert "emergency-access" in event
    assert "unconscious in ED" in event


def test_policy_engine_failure_is_a_refusal(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise PolicyError("engine down")

    monkeypatch.setattr(hub.services.policy, "evaluate", broken)
    response = hub.get(f"/dicomweb/studies/{UID_1}/metadata", hub.token("org-a"))
    assert response.status_code == 403
    assert "refused" in _outcome(response)
    assert hub.node.seen == []


def test_no_audit_no_access(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(_event: Any) -> str:
        raise Unavailable("the audit trail cannot be written")

    monkeypatch.setattr(hub.services.audit, "record", down)
    response = hub.get(f"/dicomweb/studies/{UID_1}/metadata", hub.token("org-a"))
    assert response.status_code == 503
    assert hub.node.seen == []


def test_unknown_study_malformed_uid_and_no_token(hub: Hub) -> None:
    token = hub.token("org-a")
    missing = hub.get("/dicomweb/studies/1.2.999/metadata", token)
    assert missing.status_code == 404
    _outcome(missing)
    malformed = hub.get("/dicomweb/studies/1.2.x/metadata", token)
    assert malformed.status_code == 400
    assert "not a DICOM UID" in _outcome(malformed)
    bad_tag = hub.get(f"/dicomweb/studies/{UID_1}/series/1.3/instances/1.4/bulkdata/zz", token)
    assert bad_tag.status_code == 400
    anonymous = hub.get(f"/dicomweb/studies/{UID_1}/metadata", None)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    _outcome(anonymous)
    assert hub.node.seen == []


def test_node_4xx_is_passed_on_with_its_body(hub: Hub) -> None:
    error = {"error": {"status": 406, "code": "not-supported", "message": "no such syntax"}}
    hub.node.answer = lambda request: httpx.Response(406, json=error)
    response = hub.get(f"/dicomweb/studies/{UID_1}/metadata", hub.token("org-a"))
    assert response.status_code == 406
    assert response.json() == error


@pytest.mark.parametrize(
    ("failure", "status", "says"),
    [
        (httpx.ConnectError("refused"), 502, "cannot be reached"),
        (httpx.ReadTimeout("slow"), 504, "did not answer in time"),
        (httpx.Response(401, json={"error": "bad grant"}), 502, "did not accept the hub's grant"),
        (httpx.Response(500, text="boom"), 502, "failed (HTTP 500)"),
    ],
)
def test_node_failures_name_the_site_not_its_address(
    hub: Hub, failure: Exception | httpx.Response, status: int, says: str
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(failure, Exception):
            raise failure
        return failure

    hub.node.answer = answer
    response = hub.get(f"/dicomweb/studies/{UID_1}/metadata", hub.token("org-a"))
    assert response.status_code == status
    text = _outcome(response)
    assert says in text
    assert "org-a" in text
    assert "node-x.test" not in text
    assert "9001" not in text


def test_a_node_answer_that_breaks_off_cuts_the_stream() -> None:
    class Breaking(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"x" * 10
            raise httpx.ReadError("connection reset")

    upstream = httpx.Response(200, stream=Breaking())

    async def relay() -> None:
        chunks = gathered(upstream)
        async for _chunk in _relay(b"first", chunks, upstream, None, "site org-a"):
            pass

    with pytest.raises(NodeStreamBroken):
        anyio.run(relay)
    assert upstream.is_closed


# -- across sites -------------------------------------------------------------------------------


def _uids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [s["0020000D"]["Value"][0] for s in response.json()]


def test_study_search_merges_sites_newest_first_without_hidden_studies(hub: Hub) -> None:
    response = hub.get("/dicomweb/studies", hub.token("org-b"))
    assert _uids(response) == [UID_1, UID_3, UID_4]  # UID_2: opted out
    assert response.headers["content-type"] == "application/dicom+json"
    retrieve = [s["00081190"]["Value"][0] for s in response.json()]
    assert retrieve == [f"{HUB}/dicomweb/studies/{u}" for u in (UID_1, UID_3, UID_4)]
    assert "warning" not in response.headers
    # each node was asked for its own study only, with a view grant for it
    asked = {r.url.params["StudyInstanceUID"]: _claims(r) for r in hub.node.seen}
    assert set(asked) == {UID_1, UID_3, UID_4}
    assert {c["act"] for c in asked.values()} == {"view"}
    assert asked[UID_3]["aud"] == "site-y"


def test_a_hidden_study_never_shifts_a_page(hub: Hub) -> None:
    token = hub.token("org-b")
    first = hub.get("/dicomweb/studies?limit=2", token)
    assert _uids(first) == [UID_1, UID_3]
    assert "additional results" in first.headers["warning"]
    assert _uids(hub.get("/dicomweb/studies?limit=2&offset=2", token)) == [UID_4]
    # the custodian sees the opted-out study in its place
    own = hub.token("org-a")
    assert _uids(hub.get("/dicomweb/studies?limit=2", own)) == [UID_1, UID_2]


def test_study_search_keys(hub: Hub) -> None:
    token = hub.token("org-a")
    assert _uids(hub.get(f"/dicomweb/studies?StudyInstanceUID={UID_3},{UID_4}", token)) == [
        UID_3,
        UID_4,
    ]
    assert _uids(hub.get("/dicomweb/studies?PatientID=MRN-p1", token)) == [UID_1, UID_4]
    assert _uids(hub.get("/dicomweb/studies?StudyDate=20260101-20260215", token)) == [
        UID_2,
        UID_3,
    ]
    assert _uids(hub.get("/dicomweb/studies?ModalitiesInStudy=MR", token)) == []
    refused = hub.get("/dicomweb/studies?PatientName=DOE", token)
    assert refused.status_code == 400
    assert "PatientName" in _outcome(refused)


def test_study_search_is_one_audit_event(hub: Hub) -> None:
    before = hub.audit_count()
    hub.get("/dicomweb/studies?PatientID=MRN-p1", hub.token("org-a"))
    assert hub.audit_count() == before + 1


def test_a_failing_site_is_left_out_and_named_in_a_warning(hub: Hub) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "node-y.test":
            raise httpx.ConnectError("down")
        return _default_answer(request)

    hub.node.answer = answer
    response = hub.get("/dicomweb/studies", hub.token("org-b"))
    assert _uids(response) == [UID_1, UID_4]
    assert "site org-b did not answer" in response.headers["warning"]
    assert "node-y.test" not in response.headers["warning"]


def test_includefield_is_passed_to_the_nodes(hub: Hub) -> None:
    hub.get(
        f"/dicomweb/studies?StudyInstanceUID={UID_1}&includefield=StudyDescription",
        hub.token("org-a"),
    )
    (sent,) = hub.node.seen
    assert sent.url.params.get_list("includefield") == ["StudyDescription"]


class _Pieces(httpx.AsyncByteStream):
    """A node body arriving in socket-sized pieces, possibly breaking off."""

    def __init__(self, body: bytes, size: int = 65536, fail_at: int | None = None) -> None:
        self.body, self.size, self.fail_at = body, size, fail_at

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), self.size):
            if self.fail_at is not None and start >= self.fail_at:
                raise httpx.ReadError("connection reset")
            yield self.body[start : start + self.size]


def test_large_answers_stream_through_whole_and_rewritten(hub: Hub) -> None:
    item = b'{"00081190":{"vr":"UR","Value":["' + NODE_X.encode() + b'/dicomweb/studies/1.2"]}}'
    body = b"[" + b",".join([item] * 40_000) + b"]"  # ~3.4 MB, URLs across every boundary
    assert len(body) > 3 * 1024 * 1024
    hub.node.answer = lambda request: httpx.Response(
        200,
        headers={"Content-Type": "application/dicom+json", "Content-Length": str(len(body))},
        stream=_Pieces(body, size=65_521),
    )
    response = hub.get(f"/dicomweb/studies/{UID_1}/metadata", hub.token("org-a"))
    assert response.status_code == 200
    expected = body.replace(NODE_X.encode() + b"/dicomweb", f"{HUB}/dicomweb".encode())
    assert response.content == expected
    assert response.headers.get("content-length") in (None, str(len(expected)))


def test_raw_bytes_pass_untouched_with_their_length(hub: Hub) -> None:
    body = bytes(range(256)) * 12_289  # ~3 MiB, not a multiple of the chunk size
    hub.node.answer = lambda request: httpx.Response(
        200,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=x',
            "Content-Length": str(len(body)),
        },
        stream=_Pieces(body),
    )
    response = hub.get(f"/dicomweb/studies/{UID_1}", hub.token("org-a"))
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-length"] == str(len(body))


def test_a_node_that_breaks_off_before_its_first_chunk_is_a_502(hub: Hub) -> None:
    hub.node.answer = lambda request: httpx.Response(
        200,
        headers={"Content-Type": "application/dicom+json"},
        stream=_Pieces(b"x" * 10, fail_at=0),
    )
    response = hub.get(f"/dicomweb/studies/{UID_1}/metadata", hub.token("org-a"))
    assert response.status_code == 502
    assert "broke off" in _outcome(response)
