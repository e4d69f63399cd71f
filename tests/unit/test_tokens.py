import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from exchange.errors import NotAuthenticated
from exchange.security.devidp import DevIdentityProvider
from exchange.security.keys import load_or_create
from exchange.security.tokens import JwtValidator, bearer_token, static_resolver

ISSUER = "http://127.0.0.1:1/idp"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    key = load_or_create(tmp_path_factory.mktemp("idp") / "key.pem")
    return DevIdentityProvider(ISSUER, key, "exchange")


@pytest.fixture(scope="module")
def validator(idp):
    return JwtValidator({ISSUER: static_resolver(idp.key.private.public_key())}, "exchange")


def test_valid_token_gives_the_principal(idp, validator):
    token = idp.issue(sub="dr-a", role="clinician", org="org-a", purpose=["TREAT"], patient="p1")
    principal = validator.validate(token)
    assert principal.sub == "dr-a"
    assert principal.role == "clinician"
    assert principal.organization == "org-a"
    assert principal.purpose_of_use == ("TREAT",)
    assert principal.patient == "p1"
    assert "user/ImagingStudy.rs" in principal.scopes


def test_expired_token_is_refused(idp, validator):
    token = idp.issue(
        sub="dr-a",
        role="clinician",
        org="org-a",
        extra={
            "exp": int(time.time()) - 120,
            "iat": int(time.time()) - 300,
            "nbf": int(time.time()) - 300,
        },
    )
    with pytest.raises(NotAuthenticated, match="expired"):
        validator.validate(token)


def test_wrong_audience_is_refused(idp, validator):
    token = idp.issue(sub="dr-a", role="clinician", org="org-a", extra={"aud": "other"})
    with pytest.raises(NotAuthenticated, match="not meant for this service"):
        validator.validate(token)


def test_untrusted_issuer_is_refused(idp, validator):
    token = idp.issue(sub="dr-a", role="clinician", org="org-a", extra={"iss": "http://evil"})
    with pytest.raises(NotAuthenticated, match="issuer is not trusted"):
        validator.validate(token)


def test_token_signed_by_another_key_is_refused(validator):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": ISSUER,
            "aud": "exchange",
            "sub": "x",
            "iat": now,
            "exp": now + 60,
            "role": "operator",
        },
        other,
        algorithm="RS256",
    )
    with pytest.raises(NotAuthenticated, match="signature"):
        validator.validate(token)


def test_alg_none_is_refused(validator):
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": ISSUER,
            "aud": "exchange",
            "sub": "x",
            "iat": now,
            "exp": now + 60,
            "role": "operator",
        },
        None,
        algorithm="none",
    )
    with pytest.raises(NotAuthenticated, match="algorithm"):
        validator.validate(token)


def test_hmac_signed_with_the_public_key_is_refused(idp, validator):
    from cryptography.hazmat.primitives import serialization

    public_pem = idp.key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    import json

    payload = jwt.utils.base64url_encode(
        json.dumps(
            {
                "iss": ISSUER,
                "aud": "exchange",
                "sub": "x",
                "iat": now,
                "exp": now + 60,
                "role": "operator",
            }
        ).encode()
    )
    import hashlib
    import hmac

    signing_input = header + b"." + payload
    signature = jwt.utils.base64url_encode(
        hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    )
    with pytest.raises(NotAuthenticated, match="algorithm"):
        validator.validate((signing_input + b"." + signature).decode())


def test_token_without_role_is_refused(idp, validator):
    token = idp.issue(sub="x", role="operator", org="o", extra={"role": "superuser"})
    with pytest.raises(NotAuthenticated, match="role"):
        validator.validate(token)


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "token"])
def test_missing_or_malformed_authorization_header(header):
    with pytest.raises(NotAuthenticated) as raised:
        bearer_token(header)
    assert raised.value.headers["WWW-Authenticate"].startswith("Bearer ")


def test_garbage_token_is_refused(validator):
    with pytest.raises(NotAuthenticated, match="well-formed"):
        validator.validate("not.a.jwt")


def test_dev_idp_rejects_unknown_role(idp):
    with pytest.raises(ValueError, match="unknown role"):
        idp.issue(sub="x", role="admin", org="o")


def test_signing_key_persists(tmp_path):
    first = load_or_create(tmp_path / "k.pem")
    second = load_or_create(tmp_path / "k.pem")
    assert first.kid == second.kid
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert first.jwks()["keys"][0]["kid"] == first.kid
    assert "d" not in first.jwks()["keys"][0]  # never the private part
