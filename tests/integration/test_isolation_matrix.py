"""Isolation matrix (issue 11): who gets what, on every path, for every kind of caller.

One federation: node ``site-m`` hosts two tenants of two organisations (``tenant-a`` of
``org-a``, ``tenant-c`` of ``org-c``), node ``site-b`` hosts ``tenant-b`` of ``org-b``. One
small study each (SA, SC, SB). SC's patient has opted out of sharing; SB's patient lets
``org-a`` export. Every caller (clinician, system of each organisation, an HIE operator,
each study's patient and another patient) is tried on every study and path: hub FHIR
search and read, broker QIDO and WADO (metadata, frames, rendered, instances), the node
directly with the caller's own token. The expected outcome comes from ``_expected``, which
restates docs/policy.md's rules in a few lines (it does not call the policy engine), so
a policy or code change that lets data through where the rules say no is caught here.

Node-direct credentials are tried too: grants replayed for another study, another node,
another tenant's study, with the wrong action and after expiry; one tenant's STOW key
reading, deleting and storing into the other tenant's study.

Every 2xx where the matrix says no, and every denied study's data seen in a body, is a
leak; the figures go to ``reliability.report("isolation", inputs=..., leaks=...)``.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pydicom
import pytest
from pydicom.dataset import Dataset

from exchange.dicom import imagingstudy
from exchange.dicom.samples import StudySpec, study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security import grants
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests import reliability

pytestmark = pytest.mark.integration

FHIR = "application/fhir+json"
DICOM_JSON = "application/dicom+json"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

MULTI = NodeSpec("site-m", "org-a", "tenant-a", more_tenants={"tenant-c": "org-c"})
SINGLE = NodeSpec("site-b", "org-b", "tenant-b")

#: study key -> (node, endpoint id, tenant, organisation)
HOLDINGS = {
    "SA": ("site-m", "site-m-a", "tenant-a", "org-a"),
    "SC": ("site-m", "site-m-c", "tenant-c", "org-c"),
    "SB": ("site-b", "site-b", "tenant-b", "org-b"),
}
#: what the patients chose (FHIR Consents written by the HIE operator below)
OPTED_OUT = {"SC"}
EXPORT_PERMITS = {"SB": {"org-a"}}


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    org: str | None
    patient_of: str | None = None  # study key whose patient this is


CALLERS = (
    Caller("clinician-a", "clinician", "org-a"),
    Caller("clinician-b", "clinician", "org-b"),
    Caller("clinician-c", "clinician", "org-c"),
    Caller("operator", "operator", "hie"),
    Caller("system-a", "system", "org-a"),
    Caller("system-b", "system", "org-b"),
    Caller("system-c", "system", "org-c"),
    Caller("patient-of-SA", "patient", None, "SA"),
    Caller("patient-of-SC", "patient", None, "SC"),
    Caller("patient-of-SB", "patient", None, "SB"),
)


def _expected(caller: Caller, action: str, key: str) -> bool:
    """docs/policy.md, "The rules", restated for these callers (opt-out HIE, TREAT)."""
    custodian = HOLDINGS[key][3]
    if caller.role in ("clinician", "system") and caller.org == custodian:
        return True  # rule 1: the holding organisation's own staff
    if caller.role == "patient":
        return caller.patient_of == key  # rule 2: own studies only
    if caller.role == "clinician":  # rule 3: another organisation's clinician
        if key in OPTED_OUT:
            return False
        if action == "export":
            return caller.org in EXPORT_PERMITS.get(key, set())
        return True  # opt-out mode and purpose TREAT
    if caller.role == "operator":
        return action in ("search", "read")  # rule 8: the index, never images
    return False  # other organisations' systems


@dataclass
class Held:
    key: str
    uid: str
    series: str
    sop: str
    mrn: str
    name: str
    resource: str = ""
    patient: str = ""
    files: list[bytes] = field(default_factory=list)


@dataclass
class World:
    fed: LocalFederation
    idp: DevIdentityProvider
    http: httpx.Client
    studies: dict[str, Held] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> STOW API key
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def hub(self) -> str:
        return self.fed.hub.url

    def node_url(self, node: str) -> str:
        return self.fed.node(node).url

    def token(self, caller: Caller) -> str:
        if caller.name not in self.tokens:
            patient = self.studies[caller.patient_of].patient if caller.patient_of else None
            purpose = {"clinician": ["TREAT"], "operator": ["HOPERAT"]}.get(caller.role)
            self.tokens[caller.name] = self.idp.issue(
                sub=caller.name, role=caller.role, org=caller.org, purpose=purpose, patient=patient
            )
        return self.tokens[caller.name]

    def fhir(self, method: str, path: str, token: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR}
        return self.http.request(method, f"{self.hub}/fhir/{path}", json=body, headers=headers)

    def grant(
        self, node: str, key: str, action: grants.Action = "view", org: str | None = None
    ) -> str:
        """A hub grant for study ``key`` at ``node``, for ``org`` (default: its custodian)."""
        signing = load_or_create(self.fed.hub.data_dir / "keys" / "grant-signing.pem")
        return grants.issue(
            signing,
            issuer=self.hub,
            node=node,
            caller="matrix",
            study=self.studies[key].uid,
            action=action,
            decision="matrix",
            organization=org or HOLDINGS[key][3],
            ttl=30,
        )

    def expired_grant(self, key: str) -> str:
        """A correctly signed grant whose lifetime ended a minute ago (beyond the leeway)."""
        signing = load_or_create(self.fed.hub.data_dir / "keys" / "grant-signing.pem")
        issued = int(time.time()) - 90
        node, _endpoint, _tenant, org = HOLDINGS[key]
        claims = {
            "iss": self.hub,
            "aud": node,
            "sub": "matrix",
            "study": self.studies[key].uid,
            "act": "view",
            "dec": "matrix",
            "jti": uuid.uuid4().hex,
            "iat": issued,
            "exp": issued + 30,
            "org": org,
        }
        return jwt.encode(
            claims,
            signing.private,
            algorithm="RS256",
            headers={"kid": signing.kid, "typ": grants.GRANT_TYPE},
        )


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
            for f in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _stow(world: World, node: str, key: str, files: list[bytes], study: str = "") -> httpx.Response:
    body, content_type = _multipart(files)
    path = f"/dicomweb/studies/{study}" if study else "/dicomweb/studies"
    return world.http.post(
        f"{world.node_url(node)}{path}",
        content=body,
        headers={"Content-Type": content_type, "X-API-Key": key},
    )


def _endpoint(world: World, endpoint: str, node: str, org: str) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": endpoint,
        "identifier": [{"system": "urn:exchange:node", "value": node}],
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "managingOrganization": {"reference": f"Organization/{org}"},
        "payloadType": [{"text": "DICOM"}],
        "address": f"{world.node_url(node)}/dicomweb",
    }


def _hold(world: World, key: str) -> Held:
    """Store a one-instance study at its tenant and publish it as that site's system."""
    node, endpoint, tenant, org = HOLDINGS[key]
    mrn = f"ISO-{key}-{uuid.uuid4().hex[:6]}"
    name = f"Matrix^{key}{uuid.uuid4().hex[:4]}"
    datasets = study(
        StudySpec(
            patient_id=mrn, patient_name=name, accession=uuid.uuid4().hex[:12], slices=1, size=16
        )
    )
    first = datasets[0]
    held = Held(
        key,
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        str(first.SOPInstanceUID),
        mrn,
        name,
        files=[_part10(d) for d in datasets],
    )
    stored = _stow(world, node, world.keys[tenant], held.files)
    assert stored.status_code == 200, stored.text
    system = world.idp.issue(sub=f"{endpoint}-system", role="system", org=org)
    mrn_system = f"urn:exchange:{org}:mrn"
    attributes = [d.to_json_dict() for d in datasets]
    patient = imagingstudy.patient(attributes[0], mrn_system=mrn_system, organization=org)
    made = world.fhir("PUT", f"Patient?identifier={mrn_system}|{mrn}", system, patient)
    assert made.status_code in (200, 201), made.text
    held.patient = str(made.json()["id"])
    body = imagingstudy.build(
        attributes,
        endpoint=f"Endpoint/{endpoint}",
        mrn_system=mrn_system,
        patient_reference=f"Patient/{held.patient}",
    )
    put = world.fhir(
        "PUT", f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{held.uid}", system, body
    )
    assert put.status_code in (200, 201), put.text
    held.resource = str(put.json()["id"])
    return held


def _consent(patient: str, provision: dict[str, Any]) -> dict[str, Any]:
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
        "dateTime": "2026-01-01T09:00:00Z",
        "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
        "provision": provision,
    }


def _export_permit(org: str) -> dict[str, Any]:
    return {
        "type": "permit",
        "actor": [
            {
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
        ],
        "action": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                        "code": "use",
                    },
                    {
                        "system": "https://exchange.example.org/fhir/CodeSystem/consent-action",
                        "code": "export",
                    },
                ]
            }
        ],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp("isolation")
    with (
        LocalFederation(root=root, nodes=[MULTI, SINGLE], publishing=False) as fed,
        httpx.Client(timeout=30) as http,
    ):
        idp = DevIdentityProvider(
            f"{fed.hub.url}/idp", load_or_create(key_path(fed.hub.data_dir)), "exchange"
        )
        world = World(fed, idp, http)
        for tenant, node in (
            ("tenant-a", "site-m"),
            ("tenant-c", "site-m"),
            ("tenant-b", "site-b"),
        ):
            world.keys[tenant] = fed.exchange(node, "node", "api-key", "--tenant", tenant).strip()
        for _key, (node, endpoint, _tenant, org) in HOLDINGS.items():
            system = idp.issue(sub=f"{endpoint}-system", role="system", org=org)
            put = world.fhir(
                "PUT", f"Endpoint/{endpoint}", system, _endpoint(world, endpoint, node, org)
            )
            assert put.status_code in (200, 201), put.text
        for key in HOLDINGS:
            world.studies[key] = _hold(world, key)
        operator = world.token(Caller("operator", "operator", "hie"))
        for key in OPTED_OUT:
            made = world.fhir(
                "POST",
                "Consent",
                operator,
                _consent(world.studies[key].patient, {"type": "deny"}),
            )
            assert made.status_code == 201, made.text
        for key, orgs in EXPORT_PERMITS.items():
            for org in orgs:
                provision = {"type": "permit", "provision": [_export_permit(org)]}
                made = world.fhir(
                    "POST", "Consent", operator, _consent(world.studies[key].patient, provision)
                )
                assert made.status_code == 201, made.text
        yield world


# -- the matrix -------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    expected: bool
    status: int
    got: bool
    leaked: str = ""  # what denied data was seen, if any

    @property
    def ok(self) -> bool:
        return self.expected == self.got and not self.leaked


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    @property
    def leaks(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.leaked or (o.got and not o.expected)]

    def failures(self) -> str:
        bad = [o for o in self.outcomes if not o.ok]
        return "\n".join(
            f"{o.case}: expected {'allow' if o.expected else 'deny'}, got {o.status}"
            f"{' (allowed)' if o.got else ''}{' LEAK ' + o.leaked if o.leaked else ''}"
            for o in bad
        )


TALLY = Tally()


def _secrets_of(held: Held) -> tuple[str, ...]:
    """What of a study must never appear in a body its caller may not see."""
    return (held.uid, held.series, held.sop, held.mrn, held.name.split("^")[1])


def _seen(response: httpx.Response, held: Held) -> str:
    text = response.content.decode("latin-1")
    return ",".join(s for s in _secrets_of(held) if s in text)


#: path name -> (action asked of the policy, how to request it)
HUB_PATHS = {
    "fhir-search": "search",
    "fhir-read": "read",
    "broker-qido-studies": "search",
    "broker-qido-series": "view",
    "broker-metadata": "view",
    "broker-frames": "view",
    "broker-rendered": "view",
    "broker-instances": "export",
}


def _hub_request(world: World, path: str, held: Held, token: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {token}"}
    study = f"{world.hub}/dicomweb/studies/{held.uid}"
    instance = f"{study}/series/{held.series}/instances/{held.sop}"
    if path == "fhir-search":
        return world.http.get(
            f"{world.hub}/fhir/ImagingStudy",
            params={"identifier": f"urn:dicom:uid|urn:oid:{held.uid}"},
            headers=auth,
        )
    if path == "fhir-read":
        return world.http.get(f"{world.hub}/fhir/ImagingStudy/{held.resource}", headers=auth)
    if path == "broker-qido-studies":
        return world.http.get(
            f"{world.hub}/dicomweb/studies",
            params={"StudyInstanceUID": held.uid},
            headers=auth | {"Accept": DICOM_JSON},
        )
    if path == "broker-qido-series":
        return world.http.get(f"{study}/series", headers=auth | {"Accept": DICOM_JSON})
    if path == "broker-metadata":
        return world.http.get(f"{study}/metadata", headers=auth | {"Accept": DICOM_JSON})
    if path == "broker-frames":
        return world.http.get(f"{instance}/frames/1", headers=auth | {"Accept": FRAMES_ACCEPT})
    if path == "broker-rendered":
        return world.http.get(f"{instance}/rendered", headers=auth | {"Accept": "image/png"})
    assert path == "broker-instances"
    return world.http.get(study, headers=auth | {"Accept": DICOM_ACCEPT})


def _judge_hub(path: str, response: httpx.Response, held: Held) -> tuple[bool, str]:
    """(whether the caller got the study, denied data seen when it did not)."""
    if path == "fhir-search":
        assert response.status_code == 200, response.text
        body = response.json()
        entries = body.get("entry", [])
        got = held.resource in [e["resource"]["id"] for e in entries]
        if got:
            return True, ""
        # the self link echoes the caller's own query; what was found must not name the study
        # (nor count it: no entries, no total above zero)
        seen = ",".join(s for s in _secrets_of(held) if s in json.dumps(entries))
        return False, seen + (" total" if body.get("total") else "")
    if path == "broker-qido-studies":
        assert response.status_code in (200, 204), response.text
        found = response.json() if response.content else []
        got = any(held.uid in str(r.get("0020000D")) for r in found)
        return got, ("" if got else _seen(response, held))
    got = 200 <= response.status_code < 300
    if not got:
        assert response.status_code in (401, 403, 404), (response.status_code, response.text)
        return False, _seen(response, held)
    return True, ""


def test_hub_paths_follow_the_policy_for_every_caller_and_study(world: World) -> None:
    outcomes = []
    for caller in CALLERS:
        token = world.token(caller)
        for key, held in world.studies.items():
            for path, action in HUB_PATHS.items():
                response = _hub_request(world, path, held, token)
                got, seen = _judge_hub(path, response, held)
                expected = _expected(caller, action, key)
                # a study found must carry its data; one not found must carry none of it
                outcome = Outcome(
                    f"{caller.name} {path} {key}", expected, response.status_code, got, seen
                )
                TALLY.add(outcome)
                outcomes.append(outcome)
    bad = [o for o in outcomes if not o.ok]
    assert not bad, Tally(bad).failures()
    # the matrix is not trivially all-deny or all-allow
    assert 0 < sum(o.got for o in outcomes) < len(outcomes)


#: node paths tried with each caller's own hub token: all refused (a node takes grants only,
#: and site credentials only for its own tenant's search).
NODE_PATHS = ("node-qido-studies", "node-qido-series", "node-metadata", "node-instances")


def _node_request(
    world: World, path: str, held: Held, headers: dict[str, str], node: str | None = None
) -> httpx.Response:
    node = node or HOLDINGS[held.key][0]
    base = f"{world.node_url(node)}/dicomweb"
    study = f"{base}/studies/{held.uid}"
    if path == "node-qido-studies":
        return world.http.get(
            f"{base}/studies", params={"StudyInstanceUID": held.uid}, headers=headers
        )
    if path == "node-qido-series":
        return world.http.get(f"{study}/series", headers=headers)
    if path == "node-metadata":
        return world.http.get(f"{study}/metadata", headers=headers)
    if path == "node-frames":
        instance = f"{study}/series/{held.series}/instances/{held.sop}"
        return world.http.get(f"{instance}/frames/1", headers=headers | {"Accept": FRAMES_ACCEPT})
    assert path == "node-instances"
    return world.http.get(study, headers=headers | {"Accept": DICOM_ACCEPT})


def _judge_node(path: str, response: httpx.Response, held: Held) -> tuple[bool, str]:
    if path == "node-qido-studies" and response.status_code == 200:
        got = held.uid in response.text
        return got, ("" if got else _seen(response, held))
    got = 200 <= response.status_code < 300
    if not got:
        assert response.status_code in (401, 403, 404), (response.status_code, response.text)
        return False, _seen(response, held)
    return True, ""


def test_user_tokens_replayed_to_a_node_are_refused(world: World) -> None:
    """Only a site system's token of the tenant's own organisation may search there."""
    outcomes = []
    for caller in CALLERS:
        headers = {"Authorization": f"Bearer {world.token(caller)}"}
        for key, held in world.studies.items():
            for path in NODE_PATHS:
                response = _node_request(world, path, held, headers)
                got, seen = _judge_node(path, response, held)
                own_site_search = (
                    path == "node-qido-studies"
                    and caller.role == "system"
                    and caller.org == HOLDINGS[key][3]
                )
                outcome = Outcome(
                    f"{caller.name} token at node {path} {key}",
                    own_site_search,
                    response.status_code,
                    got,
                    seen,
                )
                TALLY.add(outcome)
                outcomes.append(outcome)
    bad = [o for o in outcomes if not o.ok]
    assert not bad, Tally(bad).failures()


def test_grants_work_only_for_their_study_node_tenant_action_and_time(world: World) -> None:
    sa, sc, sb = (world.studies[k] for k in ("SA", "SC", "SB"))
    cases: list[tuple[str, str, Held, dict[str, str], str | None, bool]] = []

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    for key in HOLDINGS:
        held, node = world.studies[key], HOLDINGS[key][0]
        view, export = world.grant(node, key), world.grant(node, key, "export")
        # the right grant works (so the refusals below are not a broken node)
        for path in ("node-qido-studies", "node-qido-series", "node-metadata", "node-frames"):
            cases.append((f"view grant {key} {path}", path, held, bearer(view), None, True))
        cases.append((f"export grant {key}", "node-instances", held, bearer(export), None, True))
        # a view grant is not an export grant
        cases.append(
            (f"view grant {key} instances", "node-instances", held, bearer(view), None, False)
        )
        # after expiry
        expired = bearer(world.expired_grant(key))
        for path in ("node-metadata", "node-qido-studies"):
            cases.append((f"expired grant {key} {path}", path, held, expired, None, False))
    # replayed for another study on the same node (other tenant) and across nodes
    for granted, asked in (("SA", "SC"), ("SC", "SA"), ("SB", "SA")):
        token = bearer(world.grant(HOLDINGS[granted][0], granted, "export"))
        held = world.studies[asked]
        for path in (*NODE_PATHS, "node-frames"):
            cases.append(
                (f"grant {granted} replayed for {asked} {path}", path, held, token, None, False)
            )
    # a grant for site-m replayed at site-b, and one for site-b at site-m (same study UID path)
    for key, elsewhere in (("SA", "site-b"), ("SB", "site-m")):
        token = bearer(world.grant(HOLDINGS[key][0], key, "export"))
        for path in ("node-metadata", "node-instances", "node-qido-studies"):
            held = world.studies[key]
            cases.append(
                (f"grant {key} replayed at {elsewhere} {path}", path, held, token, elsewhere, False)
            )
    # a grant naming the other tenant's organisation for a study on the same node
    for key, org in (("SA", "org-c"), ("SC", "org-a")):
        token = bearer(world.grant("site-m", key, "export", org=org))
        held = world.studies[key]
        for path in (*NODE_PATHS, "node-frames"):
            cases.append((f"grant {key} for {org} {path}", path, held, token, None, False))
    # a grant signed by someone else's key (the dev IdP's, a key the node does not trust)
    forged = jwt.encode(
        jwt.decode(world.grant("site-m", "SA"), options={"verify_signature": False}),
        world.idp.key.private,
        algorithm="RS256",
        headers={"kid": world.idp.key.kid, "typ": grants.GRANT_TYPE},
    )
    cases.append(("grant signed by another key", "node-metadata", sa, bearer(forged), None, False))
    del sb, sc

    outcomes = []
    for name, path, held, headers, node, expected in cases:
        response = _node_request(world, path, held, headers, node)
        got, seen = _judge_node(path, response, held)
        outcome = Outcome(name, expected, response.status_code, got, seen)
        TALLY.add(outcome)
        outcomes.append(outcome)
    bad = [o for o in outcomes if not o.ok]
    assert not bad, Tally(bad).failures()


def test_a_tenants_stow_key_neither_reads_nor_writes_the_other_tenant(world: World) -> None:
    sa, sc = world.studies["SA"], world.studies["SC"]
    key_a, key_c = world.keys["tenant-a"], world.keys["tenant-c"]
    outcomes = []

    def check(name: str, response: httpx.Response, held: Held, expected: bool) -> None:
        got, seen = _judge_node(name.split()[-1], response, held)
        outcome = Outcome(name, expected, response.status_code, got, seen)
        TALLY.add(outcome)
        outcomes.append(outcome)

    # each key searches its own tenant only
    for label, key, held, expected in (
        ("A", key_a, sc, False),
        ("C", key_c, sa, False),
        ("A", key_a, sa, True),
        ("C", key_c, sc, True),
    ):
        for path in NODE_PATHS:
            response = _node_request(world, path, held, {"X-API-Key": key})
            check(
                f"key {label} {held.key} {path}",
                response,
                held,
                expected and path.endswith("studies"),
            )

    # deleting the other tenant's study with A's key: nothing of C's goes
    response = world.http.delete(
        f"{world.node_url('site-m')}/dicomweb/studies/{sc.uid}", headers={"X-API-Key": key_a}
    )
    check("key A deletes SC node-delete", response, sc, False)

    # storing into C's study with A's key lands in A's tenant, never in C's
    intruder = pydicom.dcmread(io.BytesIO(sc.files[0]))
    intruder.SOPInstanceUID = pydicom.uid.generate_uid()
    intruder.PatientName = "Intruder^Instance"
    stored = _stow(world, "site-m", key_a, [_part10(intruder)], study=sc.uid)
    assert stored.status_code in (200, 202, 409), stored.text
    export_c = {"Authorization": f"Bearer {world.grant('site-m', 'SC', 'export')}"}
    in_c = _node_request(world, "node-instances", sc, export_c)
    assert in_c.status_code == 200, in_c.text
    leaked = str(intruder.SOPInstanceUID) in in_c.text or b"Intruder" in in_c.content
    intact = all(f in in_c.content for f in sc.files)
    outcomes.append(
        Outcome("key A stores into SC", False, stored.status_code, False, "intruder" * leaked)
    )
    TALLY.add(outcomes[-1])
    assert intact, "tenant C's own instances changed after tenant A's STOW"
    bad = [o for o in outcomes if not o.ok]
    assert not bad, Tally(bad).failures()


def test_zz_report_isolation_figures(world: World) -> None:
    """Runs last in the module: the figures of every case above."""
    del world
    assert TALLY.outcomes
    reliability.report("isolation", inputs=len(TALLY.outcomes), leaks=len(TALLY.leaks))
    assert not TALLY.leaks, Tally(TALLY.leaks).failures()
