"""The hub and nodes as real processes: health, errors on the wire, FHIR basics."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create

pytestmark = pytest.mark.integration

FHIR = "application/fhir+json"


@pytest.fixture(scope="module")
def tokens(federation):
    hub = federation.hub
    idp = DevIdentityProvider(f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange")
    return {
        "operator": idp.issue(sub="op", role="operator", org="hie"),
        "clinician": idp.issue(sub="dr", role="clinician", org="org-a"),
        "expired": idp.issue(
            sub="dr", role="clinician", org="org-a", extra={"exp": 1, "iat": 0, "nbf": 0}
        ),
    }


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR}


def test_health_and_readiness_of_every_service(federation):
    for service in federation.services.values():
        assert httpx.get(f"{service.url}/healthz").status_code == 200
        ready = httpx.get(f"{service.url}/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"].values()) == {"ok"}
    hub_checks = httpx.get(f"{federation.hub.url}/readyz").json()["checks"]
    assert set(hub_checks) == {"database", "keys", "policy", "consents", "audit"}


def test_unknown_routes_answer_structured_404(federation):
    fhir = httpx.get(f"{federation.hub.url}/fhir/Observation/1")
    assert fhir.status_code == 404
    assert fhir.headers["content-type"] == FHIR
    assert fhir.json()["resourceType"] == "OperationOutcome"
    other = httpx.get(f"{federation.node('site-a').url}/no/such/route")
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not-found"


def test_capability_statement(federation):
    response = httpx.get(f"{federation.hub.url}/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    oauth = statement["rest"][0]["security"]["extension"][0]
    assert oauth["url"].endswith("/oauth-uris")
    uris = {e["url"]: e["valueUri"] for e in oauth["extension"]}
    assert uris == {
        "authorize": f"{federation.hub.url}/idp/authorize",
        "token": f"{federation.hub.url}/idp/token",
    }
    served = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {
        "ImagingStudy",
        "Patient",
        "Organization",
        "Endpoint",
        "Consent",
        "AuditEvent",
        "Provenance",
    } == served


def test_no_token_is_401_with_challenge(federation):
    response = httpx.get(f"{federation.hub.url}/fhir/Organization/x")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert response.json()["resourceType"] == "OperationOutcome"


def test_expired_token_is_401(federation, tokens):
    response = httpx.get(
        f"{federation.hub.url}/fhir/Organization/x", headers=_auth(tokens["expired"])
    )
    assert response.status_code == 401
    assert "expired" in response.json()["issue"][0]["diagnostics"]


def test_malformed_json_is_400_and_stores_nothing(federation, tokens):
    hub = federation.hub.url
    response = httpx.post(
        f"{hub}/fhir/Organization",
        content=b'{"resourceType": "Organiz',
        headers=_auth(tokens["operator"]),
    )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_oversized_body_is_413(federation, tokens):
    big = json.dumps({"resourceType": "Organization", "name": "x" * (17 * 1024 * 1024)})
    response = httpx.post(
        f"{federation.hub.url}/fhir/Organization",
        content=big,
        headers=_auth(tokens["operator"]),
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["issue"][0]["code"] == "too-costly"


def test_invalid_resource_is_422_and_wrong_type_400(federation, tokens):
    hub = federation.hub.url
    invalid = httpx.post(
        f"{hub}/fhir/Organization",
        headers=_auth(tokens["operator"]),
        json={"resourceType": "Organization", "active": "perhaps"},
    )
    assert invalid.status_code == 422
    assert "active" in invalid.json()["issue"][0]["diagnostics"]
    mismatch = httpx.post(
        f"{hub}/fhir/Organization",
        headers=_auth(tokens["operator"]),
        json={"resourceType": "Patient"},
    )
    assert mismatch.status_code == 400


def test_create_read_update_with_version_checks(federation, tokens):
    hub = federation.hub.url
    headers = _auth(tokens["operator"])
    created = httpx.post(
        f"{hub}/fhir/Organization",
        headers=headers,
        json={"resourceType": "Organization", "name": "Radiology One"},
    )
    assert created.status_code == 201
    assert created.headers["etag"] == 'W/"1"'
    rid = created.json()["id"]
    assert created.headers["location"].endswith(f"/Organization/{rid}/_history/1")

    updated = httpx.put(
        f"{hub}/fhir/Organization/{rid}",
        headers={**headers, "If-Match": 'W/"1"'},
        json={"resourceType": "Organization", "id": rid, "name": "Radiology 1"},
    )
    assert updated.status_code == 200
    assert updated.json()["meta"]["versionId"] == "2"

    stale = httpx.put(
        f"{hub}/fhir/Organization/{rid}",
        headers={**headers, "If-Match": 'W/"1"'},
        json={"resourceType": "Organization", "id": rid, "name": "Lost update"},
    )
    assert stale.status_code == 412

    current = httpx.get(f"{hub}/fhir/Organization/{rid}", headers=headers)
    assert current.json()["name"] == "Radiology 1"  # the refused write changed nothing
    first = httpx.get(f"{hub}/fhir/Organization/{rid}/_history/1", headers=headers)
    assert first.json()["name"] == "Radiology One"


def test_patient_data_is_refused_to_clinicians_with_a_plain_reason(federation, tokens):
    hub = federation.hub.url
    created = httpx.post(
        f"{hub}/fhir/Patient",
        headers=_auth(tokens["operator"]),
        json={"resourceType": "Patient", "name": [{"family": "Synthetic"}]},
    )
    assert created.status_code == 201
    refused = httpx.get(
        f"{hub}/fhir/Patient/{created.json()['id']}", headers=_auth(tokens["clinician"])
    )
    assert refused.status_code == 403
    assert "consent-checked" in refused.json()["issue"][0]["diagnostics"]
    assert "Synthetic" not in refused.text


def test_audit_events_are_not_writable_by_clients(federation, tokens):
    response = httpx.post(
        f"{federation.hub.url}/fhir/AuditEvent",
        headers=_auth(tokens["operator"]),
        json={"resourceType": "AuditEvent"},
    )
    assert response.status_code == 405


def test_scopes_are_enforced(federation, tokens):
    response = httpx.post(
        f"{federation.hub.url}/fhir/Organization",
        headers=_auth(tokens["clinician"]),
        json={"resourceType": "Organization", "name": "Not mine"},
    )
    assert response.status_code == 403


def test_fhir_client_library_reads_what_was_written(federation, tokens):
    from fhirpy import SyncFHIRClient

    client = SyncFHIRClient(
        f"{federation.hub.url}/fhir", authorization=f"Bearer {tokens['operator']}"
    )
    org = client.resource("Organization", name="Imaging Two")
    org.save()
    assert org.id
    fetched = client.reference("Organization", org.id).to_resource()
    assert fetched["name"] == "Imaging Two"


def test_grant_signing_keys_are_published(federation):
    jwks = httpx.get(f"{federation.hub.url}/.well-known/jwks.json").json()
    assert jwks["keys"][0]["kty"] == "RSA"
    assert "d" not in jwks["keys"][0]
    discovery = httpx.get(f"{federation.hub.url}/idp/.well-known/openid-configuration").json()
    assert discovery["issuer"] == f"{federation.hub.url}/idp"


def test_request_logs_carry_no_query_strings(federation, tokens):
    secret = "Doe^Jane-unique-marker"
    httpx.get(
        f"{federation.hub.url}/fhir/Organization/x",
        params={"name": secret},
        headers=_auth(tokens["operator"]),
    )
    assert secret not in federation.hub.log_path.read_text()


def test_serve_with_bad_port_exits_2_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "exchange", "serve", "hub", "--port", "notaport"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_with_bad_environment_exits_2_with_one_line(tmp_path):
    import os

    env = {**os.environ, "EXCHANGE_PORT": "99999", "EXCHANGE_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "exchange", "serve", "node"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("exchange: error: EXCHANGE_PORT")
    assert len(result.stderr.strip().splitlines()) == 1
