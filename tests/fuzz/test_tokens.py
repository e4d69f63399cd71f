"""Fuzzing token parsing: user tokens (``JwtValidator``), hub grants (``GrantVerifier``)
and the ``Authorization`` header.

Properties: a mutated or forged token is refused with ``NotAuthenticated`` (or, for a
grant naming another study or action, ``Forbidden``), never accepted with claims other
than the ones really signed, and never crashes. A token really signed by a trusted
issuer but carrying claims of odd types is refused or read into a well-typed principal.
"""

from __future__ import annotations

import base64
import contextlib
import json
from functools import cache
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from exchange.errors import Forbidden, NotAuthenticated
from exchange.security import grants
from exchange.security.keys import SigningKey, load_or_create
from exchange.security.tokens import (
    JwtValidator,
    Principal,
    bearer_token,
    now,
    static_resolver,
)
from tests.fuzz.harness import fuzz, tally

TOKENS = tally("tokens")
GRANTS = tally("grants")
ISSUER = "https://idp.fuzz.test"
AUDIENCE = "exchange"
HUB = "https://hub.fuzz.test"
NODE = "node-fz"
STUDY = "2.25.4242"


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return load_or_create(tmp_path_factory.mktemp("fuzz-keys") / "key.pem")


@cache
def _validator(key: SigningKey) -> JwtValidator:
    return JwtValidator({ISSUER: static_resolver(key.private.public_key())}, AUDIENCE)


def _claims() -> dict[str, Any]:
    issued = now()
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "dr-fuzz",
        "iat": issued,
        "exp": issued + 300,
        "role": "clinician",
        "org": "org-fz",
        "scope": "user/ImagingStudy.rs",
        "purpose_of_use": ["TREAT"],
        "jti": "fz-1",
    }


def _sign(key: SigningKey, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(
        claims, key.private, algorithm="RS256", headers={"kid": key.kid, **(headers or {})}
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def mutated_tokens(draw: st.DrawFn, valid: str) -> str:
    header, payload, signature = valid.split(".")
    kind = draw(
        st.sampled_from(("flip", "truncate", "segments", "header", "payload", "alg", "garbage"))
    )
    if kind == "flip":
        chars = list(valid)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(chars) - 1))
            chars[at] = draw(st.sampled_from("AZaz09-_.=+/ \x00é"))
        return "".join(chars)
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "segments":
        parts = draw(st.lists(st.sampled_from((header, payload, signature, "", "e30")), max_size=5))
        return ".".join(parts)
    if kind == "header":
        fake = draw(_JSON | st.fixed_dictionaries({"alg": _JSON, "typ": _JSON, "kid": _JSON}))
        return f"{_b64(json.dumps(fake).encode())}.{payload}.{signature}"
    if kind == "payload":
        claims = _claims()
        claims.update(draw(st.dictionaries(st.sampled_from(sorted(claims)), _JSON, max_size=3)))
        return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    if kind == "alg":  # algorithm confusion: none, HMAC keyed with the public key
        alg = draw(st.sampled_from(("none", "HS256", "RS512", "ES256", "PS256")))
        new_header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        return f"{new_header}.{payload}." + ("" if alg == "none" else signature)
    return draw(st.text(max_size=200))


def _validate(key: SigningKey, token: str) -> Principal | None:
    try:
        return _validator(key).validate(token)
    except NotAuthenticated:
        return None


def _well_typed(principal: Principal) -> None:
    assert isinstance(principal.sub, str)
    assert isinstance(principal.role, str)
    assert principal.organization is None or isinstance(principal.organization, str)
    assert principal.patient is None or isinstance(principal.patient, str)
    assert principal.fhir_user is None or isinstance(principal.fhir_user, str)
    assert principal.token_id is None or isinstance(principal.token_id, str)
    assert all(isinstance(p, str) for p in principal.purpose_of_use)
    assert all(isinstance(s, str) for s in principal.scopes)


@given(st.data())
@fuzz(examples=300)
def test_mutated_tokens_are_refused(key: SigningKey, data: st.DataObject) -> None:
    claims = _claims()
    valid = _sign(key, claims)
    token = data.draw(mutated_tokens(valid))
    with TOKENS.example():
        principal = _validate(key, token)
        if principal is not None:  # only the very claims that were signed
            assert dict(principal.claims) == claims
            _well_typed(principal)


@given(st.dictionaries(st.sampled_from(sorted(_claims())), _JSON, max_size=4), st.booleans())
@fuzz(examples=200)
def test_signed_tokens_with_odd_claims_are_refused_or_well_typed(
    key: SigningKey, changes: dict[str, Any], drop: bool
) -> None:
    claims = _claims()
    claims.update(changes)
    if drop and changes:
        del claims[next(iter(changes))]
    with TOKENS.example():
        try:
            token = _sign(key, claims)
        except (TypeError, ValueError):
            return  # PyJWT will not encode it (e.g. a non-JSON float)
        principal = _validate(key, token)
        if principal is not None:
            _well_typed(principal)


def test_an_hmac_token_keyed_with_the_public_key_is_refused(key: SigningKey) -> None:
    public = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = (
        jwt.api_jws.PyJWS().encode(json.dumps(_claims()).encode(), public, algorithm="HS256")
        if False
        else _b64(b'{"alg":"HS256","typ":"JWT"}')
        + "."
        + _b64(json.dumps(_claims()).encode())
        + "."
        + _b64(public[:32])
    )
    assert _validate(key, forged) is None


@given(st.text(max_size=300) | st.none())
@fuzz(examples=200)
def test_any_authorization_header_is_a_token_or_a_refusal(header: str | None) -> None:
    with TOKENS.example(), contextlib.suppress(NotAuthenticated):
        assert isinstance(bearer_token(header), str)


# -- hub grants ----------------------------------------------------------------------


def _grant_claims() -> dict[str, Any]:
    issued = now()
    return {
        "iss": HUB,
        "aud": NODE,
        "sub": "dr-fuzz",
        "study": STUDY,
        "act": "view",
        "dec": "d-1",
        "jti": "g-1",
        "iat": issued,
        "exp": issued + 30,
    }


@given(st.data(), st.sampled_from(grants.ACTIONS), st.sampled_from((STUDY, "2.25.1")))
@fuzz(examples=250)
def test_mutated_or_odd_grants_are_refused(
    key: SigningKey, data: st.DataObject, needed: grants.Action, study: str
) -> None:
    verifier = grants.GrantVerifier(HUB, NODE, static_resolver(key.private.public_key()))
    claims = _grant_claims()
    if data.draw(st.booleans()):
        claims.update(
            data.draw(st.dictionaries(st.sampled_from(sorted(claims)), _JSON, max_size=3))
        )
    try:
        valid = _sign(key, claims, {"typ": grants.GRANT_TYPE})
    except (TypeError, ValueError):
        return
    token = data.draw(mutated_tokens(valid) | st.just(valid))
    with GRANTS.example():
        try:
            grant = verifier.verify(token, study, needed)
        except (NotAuthenticated, Forbidden):
            return
        assert grant.study == study
        assert grant.action in grants.ACTIONS
        assert grant.permits(needed)
        assert grant.organization is None or isinstance(grant.organization, str)
