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


def test_not_yet_valid_token_is_refused(idp, validator):
    later = int(time.time()) + 300  # well beyond the 30 s leeway
    token = idp.issue(sub="dr-a", role="clinician", org="org-a", extra={"nbf": later})
    with pytest.raises(NotAuthenticated, match="not valid yet"):
        validator.validate(token)


def test_not_before_within_the_leeway_is_accepted(idp, validator):
    soon = int(time.time()) + 10  # a clock a few seconds apart is not an attack
    token = idp.issue(sub="dr-a", role="clinician", org="org-a", extra={"nbf": soon})
    assert validator.validate(token).sub == "dr-a"


def test_tampered_payload_is_refused(idp, validator):
    import json

    header, payload, signature = idp.issue(sub="dr-a", role="patient", org="org-a").split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["role"] = "operator"
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    with pytest.raises(NotAuthenticated, match="signature"):
        validator.validate(f"{header}.{forged}.{signature}")


class _JwksServer:
    """A real JWKS endpoint on loopback whose key set can be rotated, counting fetches."""

    def __init__(self, jwks):
        import http.server
        import json
        import threading

        self.jwks = jwks
        self.fetches = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.fetches += 1
                body = json.dumps(owner.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_unknown_kid_after_refresh_is_refused_and_a_rotated_key_accepted(tmp_path, monkeypatch):
    from exchange.security.tokens import jwks_resolver

    # PyJWKClient forces at most one refresh per cooldown (30 s) after a fetch: step past it.
    real_monotonic, skipped = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + skipped[0])

    old, new, stranger = (load_or_create(tmp_path / f"{n}.pem") for n in ("old", "new", "x"))
    server = _JwksServer(old.jwks())
    try:
        validator = JwtValidator({ISSUER: jwks_resolver(server.url)}, "exchange")

        def token(key):
            return DevIdentityProvider(ISSUER, key, "exchange").issue(
                sub="dr-a", role="clinician", org="org-a"
            )

        assert validator.validate(token(old)).sub == "dr-a"
        assert server.fetches == 1
        server.jwks = new.jwks()  # the issuer rotates its key
        skipped[0] += 31
        assert validator.validate(token(new)).sub == "dr-a"  # unknown kid: re-fetched, found
        assert server.fetches == 2
        skipped[0] += 31
        with pytest.raises(NotAuthenticated, match="signing key is unknown"):
            validator.validate(token(stranger))  # in neither the old nor the refreshed set
        assert server.fetches == 3  # it did look again before refusing
    finally:
        server.close()


def test_unreachable_issuer_is_a_401_not_a_crash(idp):
    from exchange.federation import free_port
    from exchange.security.tokens import issuer_resolver

    issuer = f"http://127.0.0.1:{free_port()}/idp"  # nothing listens there
    token = idp.issue(sub="dr", role="clinician", org="org-a", extra={"iss": issuer})
    validator = JwtValidator({issuer: issuer_resolver(issuer)}, "exchange")
    with pytest.raises(NotAuthenticated, match="signing key"):
        validator.validate(token)
