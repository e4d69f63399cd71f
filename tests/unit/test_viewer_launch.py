"""The viewer's SMART launch pieces without HTTP: the dev IdP's EHR launch context and
requested purposes (issue 9), and the viewer's launch cookie and iss check."""

from __future__ import annotations

import asyncio

import jwt
import pytest

from exchange.hub import viewer
from exchange.security.devidp import (
    LAUNCH_TTL_SECONDS,
    AuthorizationRequest,
    DevIdentityProvider,
    OAuthError,
    Persona,
    pkce_challenge,
)
from exchange.security.keys import load_or_create

ISSUER = "http://127.0.0.1:1/idp"
FHIR = "http://127.0.0.1:1/fhir"
VERIFIER = "v" * 43
REDIRECT = "http://127.0.0.1:1/viewer/callback"
EHR_USER = Persona.parse("dr-c", "clinician", "org-c", "TREAT")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def idp(tmp_path, clock) -> DevIdentityProvider:
    return DevIdentityProvider(
        ISSUER, load_or_create(tmp_path / "key.pem"), "exchange", clock=clock
    )


def _request(**changes: str) -> AuthorizationRequest:
    params = {
        "response_type": "code",
        "client_id": "exchange-viewer",
        "redirect_uri": REDIRECT,
        "scope": viewer.EHR_SCOPE,
        "state": "s1",
        "aud": FHIR,
        "code_challenge": pkce_challenge(VERIFIER),
        "code_challenge_method": "S256",
        **changes,
    }
    return AuthorizationRequest.parse(params, FHIR)


def _redeem(idp: DevIdentityProvider, code: str) -> dict[str, object]:
    return idp.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "exchange-viewer",
            "redirect_uri": REDIRECT,
            "code_verifier": VERIFIER,
        }
    )


def test_ehr_launch_context_gives_patient_and_study(idp: DevIdentityProvider) -> None:
    launch = idp.launch(EHR_USER, "p1", "study-9")
    context = idp.launch_context(launch)
    assert context is not None
    assert context.patient == "p1"
    persona = Persona(EHR_USER.sub, EHR_USER.role, EHR_USER.org, EHR_USER.purpose, "p1")
    answer = _redeem(idp, idp.authorize(_request(launch=launch), persona, context))
    assert answer["patient"] == "p1"
    assert answer["fhirContext"] == [{"reference": "ImagingStudy/study-9"}]
    assert answer["need_patient_banner"] is False
    claims = jwt.decode(str(answer["access_token"]), options={"verify_signature": False})
    assert claims["purpose_of_use"] == ["TREAT"]


def test_launch_context_expires(idp: DevIdentityProvider, clock: Clock) -> None:
    launch = idp.launch(EHR_USER, "p1")
    clock.now += LAUNCH_TTL_SECONDS + 1
    assert idp.launch_context(launch) is None
    assert idp.launch_context("never-issued") is None


def test_the_idp_decides_who_may_claim_break_the_glass(idp: DevIdentityProvider) -> None:
    code = idp.authorize(_request(purpose_of_use="ETREAT"), EHR_USER)
    claims = jwt.decode(
        str(_redeem(idp, code)["access_token"]), options={"verify_signature": False}
    )
    assert claims["purpose_of_use"] == ["ETREAT"]
    patient = Persona.parse("pat-1", "patient", "", "", "p1")
    with pytest.raises(OAuthError) as refused:
        idp.authorize(_request(purpose_of_use="ETREAT"), patient)
    assert refused.value.error == "access_denied"
    with pytest.raises(OAuthError):
        _request(purpose_of_use="not a code")


def test_pending_launch_cookie_round_trip_and_damage() -> None:
    pending = viewer.PendingLaunch("st", "v" * 64, "L1", "ETREAT")
    assert viewer.PendingLaunch.from_cookie(pending.cookie()) == pending
    for bad in (None, "", "%%%", "e30"):  # e30 is "{}"
        with pytest.raises(viewer.LaunchError):
            viewer.PendingLaunch.from_cookie(bad)


def test_launch_refuses_another_iss_and_unknown_purposes() -> None:
    launcher = viewer.Launcher("http://127.0.0.1:1", "exchange-viewer")
    with pytest.raises(viewer.LaunchError, match="serves the FHIR server"):
        asyncio.run(launcher.start("http://evil.example/fhir", "L", None))
    with pytest.raises(viewer.LaunchError, match="purpose"):
        asyncio.run(launcher.start(FHIR, "L", "HACK"))


def test_handover_json_cannot_close_its_script_element() -> None:
    document = viewer.page("t", "", scripts=("handover.js",), data={"x": "</script><b>"})
    assert "</script><b>" not in document
    assert "\\u003c/script\\u003e" in document
