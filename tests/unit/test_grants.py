"""Hub grants: every claim checked, nothing else accepted."""

import time

import jwt
import pytest

from exchange.errors import Forbidden, NotAuthenticated
from exchange.security import grants
from exchange.security.devidp import DevIdentityProvider
from exchange.security.keys import load_or_create
from exchange.security.tokens import static_resolver

HUB = "http://127.0.0.1:1"
STUDY = "1.2.826.0.1.3680043.10.1386.1"


@pytest.fixture(scope="module")
def hub_key(tmp_path_factory):
    return load_or_create(tmp_path_factory.mktemp("hub") / "grant.pem")


@pytest.fixture(scope="module")
def verifier(hub_key):
    return grants.GrantVerifier(HUB, "site-a", static_resolver(hub_key.private.public_key()))


def _grant(hub_key, **overrides):
    args = {
        "issuer": HUB,
        "node": "site-a",
        "caller": "dr-b",
        "study": STUDY,
        "action": "view",
        "decision": "d-1",
        "organization": "org-a",
        "ttl": 30,
    }
    args.update(overrides)
    return grants.issue(hub_key, **args)


def test_valid_view_grant(hub_key, verifier):
    grant = verifier.verify(_grant(hub_key), STUDY, "view")
    assert grant.caller == "dr-b"
    assert grant.action == "view"
    assert grant.organization == "org-a"
    assert grant.expires - time.time() <= 30


def test_export_grant_includes_view(hub_key, verifier):
    assert verifier.verify(_grant(hub_key, action="export"), STUDY, "view").action == "export"


def test_view_grant_does_not_export(hub_key, verifier):
    with pytest.raises(Forbidden, match="export grant"):
        verifier.verify(_grant(hub_key), STUDY, "export")


def test_grant_for_another_study_is_refused(hub_key, verifier):
    with pytest.raises(Forbidden, match="another study"):
        verifier.verify(_grant(hub_key), "1.2.3.4", "view")


def test_grant_for_another_node_is_refused(hub_key, verifier):
    with pytest.raises(NotAuthenticated, match="another node"):
        verifier.verify(_grant(hub_key, node="site-b"), STUDY, "view")


def test_grant_from_another_issuer_is_refused(hub_key, verifier):
    with pytest.raises(NotAuthenticated, match="not issued by this node's hub"):
        verifier.verify(_grant(hub_key, issuer="http://evil"), STUDY, "view")


def test_expired_grant_is_refused(hub_key, verifier):
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": HUB,
            "aud": "site-a",
            "sub": "x",
            "study": STUDY,
            "act": "view",
            "dec": "d",
            "jti": "j",
            "iat": now - 100,
            "exp": now - 40,
        },
        hub_key.private,
        algorithm="RS256",
        headers={"kid": hub_key.kid, "typ": grants.GRANT_TYPE},
    )
    with pytest.raises(NotAuthenticated, match="expired"):
        verifier.verify(token, STUDY, "view")


def test_long_lived_grant_is_refused(hub_key, verifier):
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": HUB,
            "aud": "site-a",
            "sub": "x",
            "study": STUDY,
            "act": "view",
            "dec": "d",
            "jti": "j",
            "iat": now,
            "exp": now + 3600,
        },
        hub_key.private,
        algorithm="RS256",
        headers={"kid": hub_key.kid, "typ": grants.GRANT_TYPE},
    )
    with pytest.raises(NotAuthenticated, match="60 s"):
        verifier.verify(token, STUDY, "view")


def test_grant_signed_by_another_key_is_refused(verifier, tmp_path):
    other = load_or_create(tmp_path / "other.pem")
    with pytest.raises(NotAuthenticated):
        verifier.verify(_grant(other), STUDY, "view")


def test_user_token_is_not_a_grant(verifier, tmp_path):
    idp = DevIdentityProvider(f"{HUB}/idp", load_or_create(tmp_path / "idp.pem"), "site-a")
    token = idp.issue(
        sub="dr", role="clinician", org="org-a", extra={"study": STUDY, "act": "export"}
    )
    with pytest.raises(NotAuthenticated, match="user tokens are not accepted"):
        verifier.verify(token, STUDY, "export")


def test_grant_lifetime_is_capped_at_issue(hub_key):
    with pytest.raises(ValueError, match="1-60"):
        _grant(hub_key, ttl=61)
