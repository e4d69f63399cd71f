"""Site credentials and the node admin verbs (api-key, shred-tenant)."""

import io

import pytest

from exchange.cli import main
from exchange.config import load_settings
from exchange.errors import Forbidden, NotAuthenticated
from exchange.node.services import build
from exchange.security.keystore import KeyUnavailable
from tests.dicomdata import generated

TENANTS = '{"t1": {"organization": "org-1"}, "t2": {"organization": "org-2"}}'


@pytest.fixture
def node_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("EXCHANGE_TENANTS", TENANTS)
    monkeypatch.setenv("EXCHANGE_DATA_DIR", str(tmp_path / "node"))
    return tmp_path / "node"


def test_api_key_is_bound_to_its_tenant_and_stored_hashed(node_env, capsys):
    assert main(["node", "api-key", "--tenant", "t1", "--label", "modality gateway"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("exk_")
    services = build(load_settings())
    try:
        assert services.credentials.tenant_for(None, key) == "t1"
        assert services.credentials.tenant_for(f"ApiKey {key}", None) == "t1"
        assert services.credentials.tenant_for(f"Bearer {key}", None) == "t1"
        with pytest.raises(NotAuthenticated):
            services.credentials.tenant_for(None, key + "x")
    finally:
        services.close()
    assert key.encode() not in (node_env / "exchange.db").read_bytes()


def test_revoked_key_no_longer_works(node_env, capsys):
    main(["node", "api-key", "--tenant", "t2"])
    key = capsys.readouterr().out.strip()
    assert main(["node", "api-key", "--tenant", "t2", "--revoke"]) == 0
    services = build(load_settings())
    try:
        with pytest.raises(NotAuthenticated):
            services.credentials.tenant_for(None, key)
    finally:
        services.close()


def test_no_credential_is_401_and_tokens_need_an_issuer(node_env):
    services = build(load_settings())
    try:
        with pytest.raises(NotAuthenticated) as raised:
            services.credentials.tenant_for(None, None)
        assert "WWW-Authenticate" in raised.value.headers
        with pytest.raises(NotAuthenticated, match="API keys only"):
            services.credentials.tenant_for("Bearer a.b.c", None)
    finally:
        services.close()


def test_site_token_must_be_a_system_of_a_tenant_organisation(node_env, monkeypatch, tmp_path):
    from exchange.security.devidp import DevIdentityProvider
    from exchange.security.keys import load_or_create

    key = load_or_create(tmp_path / "idp.pem")
    idp = DevIdentityProvider("http://127.0.0.1:9/idp", key, "exchange")
    monkeypatch.setenv("EXCHANGE_ISSUERS", '[{"issuer": "http://127.0.0.1:9/idp"}]')
    services = build(load_settings())
    from exchange.security.tokens import JwtValidator, static_resolver

    services.credentials._tokens = JwtValidator(
        {idp.issuer: static_resolver(key.private.public_key())}, "exchange"
    )
    try:
        system = idp.issue(sub="pacs", role="system", org="org-2")
        assert services.credentials.tenant_for(f"Bearer {system}", None) == "t2"
        clinician = idp.issue(sub="dr", role="clinician", org="org-2")
        with pytest.raises(Forbidden, match="user tokens"):
            services.credentials.tenant_for(f"Bearer {clinician}", None)
        stranger = idp.issue(sub="pacs", role="system", org="org-9")
        with pytest.raises(Forbidden, match="not a tenant"):
            services.credentials.tenant_for(f"Bearer {stranger}", None)
    finally:
        services.close()


def test_shred_tenant_needs_confirmation_and_destroys_the_data(node_env, capsys, monkeypatch):
    services = build(load_settings())
    try:
        stored = services.store.store("t1", io.BytesIO(generated()[0]))
        services.store.store("t2", io.BytesIO(generated(accession="other")[0]))
    finally:
        services.close()

    assert main(["node", "shred-tenant", "--tenant", "t1"]) == 2
    assert "--confirm t1" in capsys.readouterr().err
    assert main(["node", "shred-tenant", "--tenant", "t1", "--confirm", "t1"]) == 0

    # The node refuses to start with the shredded tenant still configured ...
    assert main(["node", "api-key", "--tenant", "t2"]) == 2
    assert "crypto-shredded" in capsys.readouterr().err
    # ... and without it, t1's instance cannot be read by anyone, while t2 is intact.
    monkeypatch.setenv("EXCHANGE_TENANTS", '{"t2": {"organization": "org-2"}}')
    services = build(load_settings())
    try:
        assert len(services.store.instances("t2")) == 1
        with pytest.raises(KeyUnavailable):
            services.store.instances("t1")
        with pytest.raises(KeyUnavailable), services.store.open("t1", stored.sop_uid):
            pass
    finally:
        services.close()
