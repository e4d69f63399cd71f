"""SMART App Launch against the real hub's development IdP: code + PKCE, client credentials."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from exchange.federation import LocalFederation
from exchange.security.devidp import DevIdentityProvider, key_path, pkce_challenge

pytestmark = pytest.mark.integration

REDIRECT = "http://127.0.0.1:9/viewer/callback"
SCOPE = "openid fhirUser launch/patient user/Organization.rs user/ImagingStudy.rs"


class Launch:
    """One app's view of the hub: its FHIR base, the IdP's endpoints, an HTTP client."""

    def __init__(self, hub: str) -> None:
        self.hub = hub
        self.fhir = f"{hub}/fhir"
        self.http = httpx.Client(follow_redirects=False, timeout=10)
        config = self.http.get(f"{self.fhir}/.well-known/smart-configuration").json()
        self.authorize_url = config["authorization_endpoint"]
        self.token_url = config["token_endpoint"]

    def authorize(self, verifier: str, **changes: str | None) -> httpx.Response:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": "viewer",
            "redirect_uri": REDIRECT,
            "scope": SCOPE,
            "state": "st-1",
            "aud": self.fhir,
            "code_challenge": pkce_challenge(verifier),
            "code_challenge_method": "S256",
            "dev_sub": "dr-a",
            "dev_role": "clinician",
            "dev_org": "org-a",
            "dev_purpose": "TREAT",
            "dev_patient": "p1",
        }
        params.update(changes)
        return self.http.get(
            self.authorize_url, params={k: v for k, v in params.items() if v is not None}
        )

    def code(self, verifier: str, **changes: str | None) -> str:
        answer = self.authorize(verifier, **changes)
        assert answer.status_code == 302, answer.text
        location = urlsplit(answer.headers["location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
        query = parse_qs(location.query)
        assert query["state"] == ["st-1"]
        return query["code"][0]

    def redeem(self, code: str, verifier: str, **changes: str) -> httpx.Response:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "viewer",
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
            **changes,
        }
        return self.http.post(self.token_url, data=form)


def _verifier() -> str:
    return secrets.token_urlsafe(48)


@pytest.fixture(scope="module")
def launch(federation):
    client = Launch(federation.hub.url)
    yield client
    client.http.close()


@pytest.fixture(scope="module")
def idp(federation):
    hub = federation.hub
    return DevIdentityProvider.open(hub.data_dir, f"{hub.url}/idp", "exchange")


@pytest.fixture(scope="module")
def organization(federation, idp):
    operator = idp.issue(sub="op", role="operator", org="hie")
    created = httpx.post(
        f"{federation.hub.url}/fhir/Organization",
        json={"resourceType": "Organization", "name": "SMART launch test site"},
        headers={"Authorization": f"Bearer {operator}", "Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    return created.json()["id"]


def _oauth_error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error_description"]
    return str(body["error"])


def test_smart_configuration(launch, federation):
    response = launch.http.get(f"{launch.fhir}/.well-known/smart-configuration")
    assert response.status_code == 200
    config = response.json()
    issuer = f"{federation.hub.url}/idp"
    assert config["issuer"] == issuer
    assert config["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
    assert config["authorization_endpoint"] == f"{issuer}/authorize"
    assert config["token_endpoint"] == f"{issuer}/token"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["response_types_supported"] == ["code"]
    assert {"launch-ehr", "launch-standalone", "client-public", "context-ehr-patient"} <= set(
        config["capabilities"]
    )
    assert "permission-v2" in config["capabilities"]
    assert "launch/patient" in config["scopes_supported"]
    discovery = launch.http.get(f"{issuer}/.well-known/openid-configuration").json()
    for name in ("authorization_endpoint", "token_endpoint", "code_challenge_methods_supported"):
        assert discovery[name] == config[name]
    assert "client_credentials" in discovery["grant_types_supported"]
    assert httpx.get(config["jwks_uri"]).json()["keys"]


def test_code_flow_with_pkce_gives_a_working_token(launch, organization):
    verifier = _verifier()
    answer = launch.redeem(launch.code(verifier), verifier)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    token = answer.json()
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] > 0
    assert token["patient"] == "p1"
    assert token["fhirUser"] == "Practitioner/dr-a"
    assert set(token["scope"].split()) == set(SCOPE.split())
    id_claims = jwt.decode(token["id_token"], options={"verify_signature": False})
    assert (id_claims["aud"], id_claims["sub"]) == ("viewer", "dr-a")
    read = launch.http.get(
        f"{launch.fhir}/Organization/{organization}",
        headers={"Authorization": f"Bearer {token['access_token']}"},
    )
    assert read.status_code == 200, read.text
    assert read.json()["name"] == "SMART launch test site"


def test_token_without_the_needed_scope_is_403(launch, organization):
    verifier = _verifier()
    answer = launch.redeem(launch.code(verifier, scope="openid fhirUser"), verifier).json()
    assert answer["scope"] == "openid fhirUser"
    read = launch.http.get(
        f"{launch.fhir}/Organization/{organization}",
        headers={"Authorization": f"Bearer {answer['access_token']}"},
    )
    assert read.status_code == 403
    assert "scopes do not allow read on Organization" in read.json()["issue"][0]["diagnostics"]


def test_wrong_verifier_is_invalid_grant(launch):
    verifier = _verifier()
    code = launch.code(verifier)
    assert _oauth_error(launch.redeem(code, _verifier())) == "invalid_grant"
    # The failed attempt spent the code: the right verifier is now too late.
    assert _oauth_error(launch.redeem(code, verifier)) == "invalid_grant"


def test_code_reuse_is_invalid_grant(launch):
    verifier = _verifier()
    code = launch.code(verifier)
    assert launch.redeem(code, verifier).status_code == 200
    assert _oauth_error(launch.redeem(code, verifier)) == "invalid_grant"


def test_wrong_redirect_uri_is_invalid_grant(launch):
    verifier = _verifier()
    code = launch.code(verifier)
    answer = launch.redeem(code, verifier, redirect_uri="http://127.0.0.1:9/elsewhere")
    assert _oauth_error(answer) == "invalid_grant"


@pytest.mark.parametrize(
    "changes",
    [{"code_challenge": None}, {"code_challenge_method": "plain"}, {"aud": "http://evil/fhir"}],
)
def test_missing_pkce_or_wrong_aud_is_sent_back_as_an_error(launch, changes):
    answer = launch.authorize(_verifier(), **changes)
    assert answer.status_code == 302
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["error"] == ["invalid_request"]
    assert query["state"] == ["st-1"]
    assert "code" not in query


def test_bad_redirect_uri_is_never_redirected_to(launch):
    answer = launch.authorize(_verifier(), redirect_uri="javascript:alert(1)")
    assert answer.status_code == 400
    assert "location" not in answer.headers


def test_sign_in_form_without_a_persona(launch):
    page = launch.authorize(_verifier(), dev_sub=None)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "DEVELOPMENT IDENTITY PROVIDER" in page.text
    assert 'name="dev_sub"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for external in ("<script", "src=", "href="):  # nothing loaded from anywhere
        assert external not in page.text


def test_invalid_persona_shows_the_form_with_the_reason(launch):
    page = launch.authorize(_verifier(), dev_role="system")
    assert page.status_code == 400
    assert "client_credentials" in page.text


def test_client_credentials_for_a_site_system(launch, idp, organization):
    secret = idp.register_client("site-a-system", "org-a")
    answer = launch.http.post(
        launch.token_url, data={"grant_type": "client_credentials"}, auth=("site-a-system", secret)
    )
    assert answer.status_code == 200, answer.text
    claims = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["role"], claims["org"]) == ("site-a-system", "system", "org-a")
    read = launch.http.get(
        f"{launch.fhir}/Organization/{organization}",
        headers={"Authorization": f"Bearer {answer.json()['access_token']}"},
    )
    assert read.status_code == 200, read.text
    refused = launch.http.post(
        launch.token_url, data={"grant_type": "client_credentials"}, auth=("site-a-system", "no")
    )
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    assert refused.headers["www-authenticate"].startswith("Basic ")


def test_token_endpoint_wants_a_form(launch):
    answer = launch.http.post(launch.token_url, json={"grant_type": "client_credentials"})
    assert _oauth_error(answer) == "invalid_request"
    assert _oauth_error(launch.http.post(launch.token_url, data={"grant_type": "x"})) == (
        "unsupported_grant_type"
    )


def test_everything_is_404_when_the_dev_idp_is_off(tmp_path):
    with LocalFederation(root=tmp_path, nodes=[], hub_env={"EXCHANGE_DEV_IDP": "false"}) as fed:
        hub = fed.hub.url
        smart = httpx.get(f"{hub}/fhir/.well-known/smart-configuration")
        assert smart.status_code == 404
        assert smart.json()["resourceType"] == "OperationOutcome"
        for path in ("/idp/authorize", "/idp/.well-known/openid-configuration"):
            assert httpx.get(f"{hub}{path}").status_code == 404
        token = httpx.post(f"{hub}/idp/token", data={"grant_type": "client_credentials"})
        assert token.status_code == 404
        assert not key_path(fed.hub.data_dir).exists()  # no IdP key where no IdP runs
