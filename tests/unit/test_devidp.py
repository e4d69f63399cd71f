"""The development IdP's SMART logic, without HTTP: PKCE, codes, scopes, system clients."""

import jwt
import pytest

from exchange.security.devidp import (
    CODE_TTL_SECONDS,
    AuthorizationRequest,
    DevIdentityProvider,
    OAuthError,
    Persona,
    pkce_challenge,
)
from exchange.security.keys import load_or_create
from exchange.security.tokens import JwtValidator, static_resolver

ISSUER = "http://127.0.0.1:1/idp"
FHIR = "http://127.0.0.1:1/fhir"
VERIFIER = "v" * 43 + "-._~"
REDIRECT = "http://127.0.0.1:9/callback"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return load_or_create(tmp_path_factory.mktemp("idp") / "key.pem")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def idp(key, tmp_path, clock):
    return DevIdentityProvider(
        ISSUER, key, "exchange", clients_file=tmp_path / "clients.json", clock=clock
    )


@pytest.fixture
def validator(key):
    return JwtValidator({ISSUER: static_resolver(key.private.public_key())}, "exchange")


def _params(**changes):
    params = {
        "response_type": "code",
        "client_id": "viewer",
        "redirect_uri": REDIRECT,
        "scope": "openid fhirUser launch/patient user/ImagingStudy.rs system/Patient.cruds",
        "state": "s1",
        "aud": FHIR,
        "code_challenge": pkce_challenge(VERIFIER),
        "code_challenge_method": "S256",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


def _redeem(**changes):
    form = {
        "grant_type": "authorization_code",
        "client_id": "viewer",
        "redirect_uri": REDIRECT,
        "code_verifier": VERIFIER,
    }
    form.update(changes)
    return form


CLINICIAN = Persona.parse("dr-a", "clinician", "org-a", "TREAT", "p1")


def test_pkce_s256_matches_rfc_7636_appendix_b():
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_code_flow_gives_a_token_the_hub_accepts(idp, validator):
    code = idp.authorize(AuthorizationRequest.parse(_params(nonce="n1"), FHIR), CLINICIAN)
    answer = idp.token(_redeem(code=code))
    assert answer["token_type"] == "Bearer"
    assert answer["patient"] == "p1"
    assert answer["need_patient_banner"] is True  # standalone: no EHR shows a banner
    # System scopes are never given to a person, whatever the app asked for.
    assert answer["scope"] == "openid fhirUser launch/patient user/ImagingStudy.rs"
    principal = validator.validate(answer["access_token"])
    assert (principal.sub, principal.role, principal.organization) == ("dr-a", "clinician", "org-a")
    assert principal.purpose_of_use == ("TREAT",)
    assert principal.scopes == frozenset(answer["scope"].split())
    id_token = jwt.decode(
        answer["id_token"],
        key=idp.key.private.public_key(),
        algorithms=["RS256"],
        audience="viewer",
    )
    assert id_token["fhirUser"] == f"{FHIR}/Practitioner/dr-a"
    assert id_token["nonce"] == "n1"


def test_ehr_launch_needs_no_banner(idp):
    request = AuthorizationRequest.parse(_params(launch="xyz", scope="launch openid"), FHIR)
    answer = idp.token(_redeem(code=idp.authorize(request, CLINICIAN)))
    assert answer["need_patient_banner"] is False


def test_no_resource_scope_asked_means_none_granted(idp, validator):
    # An empty grant must not fall back to the role's default scopes.
    request = AuthorizationRequest.parse(_params(scope="openid offline_access"), FHIR)
    answer = idp.token(_redeem(code=idp.authorize(request, CLINICIAN)))
    assert answer["scope"] == "openid"
    assert validator.validate(answer["access_token"]).scopes == frozenset({"openid"})


def test_patient_gets_no_user_scopes(idp):
    persona = Persona.parse("pat-1", "patient", patient="p1")
    request = AuthorizationRequest.parse(
        _params(scope="patient/ImagingStudy.rs user/ImagingStudy.rs"), FHIR
    )
    answer = idp.token(_redeem(code=idp.authorize(request, persona)))
    assert answer["scope"] == "patient/ImagingStudy.rs"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"code_verifier": "w" * 43}, "code_verifier"),
        ({"code_verifier": "short"}, "code_verifier"),
        ({"redirect_uri": "http://127.0.0.1:9/other"}, "redirect_uri"),
        ({"client_id": "another"}, "another client"),
    ],
)
def test_bad_redemption_is_invalid_grant_and_spends_the_code(idp, changes, message):
    code = idp.authorize(AuthorizationRequest.parse(_params(), FHIR), CLINICIAN)
    with pytest.raises(OAuthError, match=message) as raised:
        idp.token(_redeem(code=code, **changes))
    assert raised.value.error == "invalid_grant"
    with pytest.raises(OAuthError, match="already used"):
        idp.token(_redeem(code=code))


def test_code_is_single_use(idp):
    code = idp.authorize(AuthorizationRequest.parse(_params(), FHIR), CLINICIAN)
    idp.token(_redeem(code=code))
    with pytest.raises(OAuthError) as raised:
        idp.token(_redeem(code=code))
    assert raised.value.error == "invalid_grant"


def test_code_expires(idp, clock):
    code = idp.authorize(AuthorizationRequest.parse(_params(), FHIR), CLINICIAN)
    clock.now += CODE_TTL_SECONDS + 1
    with pytest.raises(OAuthError, match="expired") as raised:
        idp.token(_redeem(code=code))
    assert raised.value.error == "invalid_grant"


@pytest.mark.parametrize(
    ("changes", "error", "redirect"),
    [
        ({"client_id": None}, "invalid_request", False),
        ({"redirect_uri": "javascript:alert(1)"}, "invalid_request", False),
        ({"redirect_uri": "http://x/cb#frag"}, "invalid_request", False),
        ({"response_type": "token"}, "unsupported_response_type", True),
        ({"code_challenge": None}, "invalid_request", True),
        ({"code_challenge_method": "plain"}, "invalid_request", True),
        ({"code_challenge_method": None}, "invalid_request", True),
        ({"aud": "http://evil.example/fhir"}, "invalid_request", True),
        ({"aud": None}, "invalid_request", True),
        ({"state": None}, "invalid_request", True),
        ({"scope": " "}, "invalid_scope", True),
    ],
)
def test_bad_authorization_requests(changes, error, redirect):
    with pytest.raises(OAuthError) as raised:
        AuthorizationRequest.parse(_params(**changes), FHIR)
    assert raised.value.error == error
    assert raised.value.redirect is redirect


@pytest.mark.parametrize(
    "fields",
    [
        ("", "clinician"),
        ("dr a", "clinician"),
        ("dr", "superuser"),
        ("dr", "system"),
        ("dr", "clinician", "org a"),
        ("dr", "clinician", "o", "treat"),
        ("dr", "clinician", "o", "TREAT", "p/1"),
    ],
)
def test_bad_personas_are_refused(fields):
    with pytest.raises(ValueError):  # noqa: PT011 - the message is for the form
        Persona.parse(*fields)


def test_persona_purposes_split_on_commas_and_spaces():
    assert Persona.parse("dr", "clinician", purpose="TREAT, ETREAT").purpose == ("TREAT", "ETREAT")


def test_client_credentials_for_a_registered_site_system(idp, validator, tmp_path):
    secret = idp.register_client("site-a-system", "org-a")
    assert (tmp_path / "clients.json").stat().st_mode & 0o777 == 0o600
    assert secret not in (tmp_path / "clients.json").read_text()  # only its hash is kept
    answer = idp.token({"grant_type": "client_credentials"}, basic=("site-a-system", secret))
    principal = validator.validate(answer["access_token"])
    assert (principal.role, principal.organization) == ("system", "org-a")
    assert principal.fhir_user is None
    assert answer["expires_in"] <= 300
    narrowed = idp.token(
        {
            "grant_type": "client_credentials",
            "client_id": "site-a-system",
            "client_secret": secret,
            "scope": "system/ImagingStudy.cruds user/Patient.rs",
        }
    )
    assert narrowed["scope"] == "system/ImagingStudy.cruds"


@pytest.mark.parametrize(
    "credentials", [("site-a-system", "wrong"), ("nobody", "x"), ("site-a-system", "")]
)
def test_client_credentials_refuse_bad_secrets(idp, credentials):
    idp.register_client("site-a-system", "org-a")
    with pytest.raises(OAuthError) as raised:
        idp.token({"grant_type": "client_credentials"}, basic=credentials)
    assert (raised.value.error, raised.value.status) == ("invalid_client", 401)


def test_re_registering_a_client_rotates_its_secret(idp):
    old = idp.register_client("site-a-system", "org-a")
    new = idp.register_client("site-a-system", "org-a")
    with pytest.raises(OAuthError):
        idp.token({"grant_type": "client_credentials"}, basic=("site-a-system", old))
    assert idp.token({"grant_type": "client_credentials"}, basic=("site-a-system", new))


def test_unknown_grant_type(idp):
    with pytest.raises(OAuthError) as raised:
        idp.token({"grant_type": "password"})
    assert raised.value.error == "unsupported_grant_type"


def test_discovery_names_the_smart_endpoints(idp):
    document = idp.discovery()
    assert document["authorization_endpoint"] == f"{ISSUER}/authorize"
    assert document["token_endpoint"] == f"{ISSUER}/token"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert set(document["grant_types_supported"]) == {"authorization_code", "client_credentials"}
    assert "permission-v2" in document["capabilities"]
