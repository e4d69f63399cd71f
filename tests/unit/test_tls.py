"""The development PKI, the TLS contexts and the production transport checks."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from exchange.cli import main
from exchange.config import Settings, load_settings
from exchange.errors import ConfigurationError, Forbidden
from exchange.security import tls
from exchange.web.peer import require_hub_certificate, tls_extension


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls.Layout:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    tls.init_pki(directory, hub_hosts=["hub.example.org", "10.0.0.7"], nodes=["site-a", "site-b"])
    return tls.Layout(directory)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _store(path: Path) -> Store:
    return Store([_cert(path)])


def test_writes_keys_0600_and_certificates_0644(pki: tls.Layout) -> None:
    pairs = [pki.ca, pki.client_ca, pki.hub, pki.hub_client, pki.node("site-a"), pki.node("site-b")]
    for pair in pairs:
        assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600, pair.key
        assert stat.S_IMODE(pair.cert.stat().st_mode) == 0o644, pair.cert
    assert not [p for p in pki.directory.iterdir() if p.name.startswith(".")]  # no temp files


def test_server_certificates_chain_to_the_server_ca_with_loopback_names(pki: tls.Layout) -> None:
    for pair, extra in [(pki.hub, "hub.example.org"), (pki.node("site-a"), "site-a")]:
        for name in ("localhost", extra):
            verifier = (
                PolicyBuilder().store(_store(pki.ca.cert)).build_server_verifier(x509.DNSName(name))
            )
            verifier.verify(_cert(pair.cert), [])
        for ip in ("127.0.0.1", "::1"):
            verifier = (
                PolicyBuilder()
                .store(_store(pki.ca.cert))
                .build_server_verifier(x509.IPAddress(ipaddress.ip_address(ip)))
            )
            verifier.verify(_cert(pair.cert), [])
    hub_names = tls.certificate_names(_cert(pki.hub.cert))
    assert "10.0.0.7" in hub_names
    assert "hub.example.org" in hub_names


def test_only_the_hub_client_certificate_chains_to_the_client_ca(pki: tls.Layout) -> None:
    verifier = PolicyBuilder().store(_store(pki.client_ca.cert)).build_client_verifier()
    verified = verifier.verify(_cert(pki.hub_client.cert), [])
    assert tls.HUB_CLIENT_NAME in tls.certificate_names(verified.chain[0])
    for pair in (pki.hub, pki.node("site-a")):  # server certificates: another CA
        with pytest.raises(x509.verification.VerificationError):
            verifier.verify(_cert(pair.cert), [])
    server = (
        PolicyBuilder().store(_store(pki.ca.cert)).build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(x509.verification.VerificationError):
        server.verify(_cert(pki.hub_client.cert), [])


def test_refuses_to_overwrite_and_leaves_everything_as_it_was(pki: tls.Layout) -> None:
    before = {p.name: p.read_bytes() for p in pki.directory.iterdir()}
    with pytest.raises(ConfigurationError, match=r"already exists.*--force"):
        tls.init_pki(pki.directory, nodes=["site-c"])
    assert {p.name: p.read_bytes() for p in pki.directory.iterdir()} == before


def test_force_replaces_the_material(tmp_path: Path) -> None:
    tls.init_pki(tmp_path, days=2)
    first = (tmp_path / "ca.pem").read_bytes()
    tls.init_pki(tmp_path, days=2, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != first


@pytest.mark.parametrize("bad", [{"days": 0}, {"days": 99999}, {"nodes": ["a/b"]}])
def test_bad_arguments_are_configuration_errors(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        tls.init_pki(tmp_path, **bad)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# -- contexts: a real handshake in memory --------------------------------------------------


def _settings(**values: object) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Run a TLS handshake between two contexts over memory BIOs; the server side."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side, out, peer_in in (
            ("client", client_side, c_out, s_in),
            ("server", server_side, s_out, c_in),
        ):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            # TLS 1.3: the client's certificate reaches the server with its last flight.
            with pytest.raises(ssl.SSLWantReadError):
                server_side.read()
            return server_side
    raise AssertionError("the handshake did not finish")


def test_mutual_tls_contexts_agree(pki: tls.Layout) -> None:
    node = _settings(
        tls_cert_file=pki.node("site-a").cert,
        tls_key_file=pki.node("site-a").key,
        tls_client_ca_file=pki.client_ca.cert,
    )
    hub = _settings(
        tls_ca_file=pki.ca.cert,
        tls_client_cert_file=pki.hub_client.cert,
        tls_client_key_file=pki.hub_client.key,
    )
    server = tls.server_context(node)
    assert server is not None
    assert server.verify_mode == ssl.CERT_OPTIONAL
    identified = tls.client_context(hub, identify=True)
    assert identified is not None
    seen = _handshake(server, identified)
    extension = tls_extension(seen)  # type: ignore[arg-type]
    assert extension is not None
    assert extension["client_cert_chain"]
    require_hub_certificate({"extensions": {"tls": extension}}, "ca", [tls.HUB_CLIENT_NAME])
    # Without identify: the handshake works, and there is no client certificate.
    anonymous = tls.client_context(hub)
    assert anonymous is not None
    bare = tls_extension(_handshake(tls.server_context(node), anonymous))  # type: ignore[arg-type]
    assert bare is not None
    assert bare["client_cert_chain"] == []
    with pytest.raises(Forbidden, match="no client certificate"):
        require_hub_certificate({"extensions": {"tls": bare}}, "ca", [])
    with pytest.raises(Forbidden, match="not the hub's"):
        require_hub_certificate({"extensions": {"tls": extension}}, "ca", ["someone-else"])


def test_no_trust_settings_means_library_defaults() -> None:
    assert tls.client_context(_settings()) is None
    assert tls.httpx_verify(_settings()) is True
    assert tls.server_context(_settings()) is None


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="EXCHANGE_TLS_CA_FILE"):
        tls.client_context(_settings(tls_ca_file=tmp_path / "nope.pem"))


def test_mutual_tls_is_not_required_without_a_client_ca() -> None:
    require_hub_certificate({}, None, [])


def test_public_url_defaults_to_https_with_a_certificate(pki: tls.Layout) -> None:
    settings = _settings(tls_cert_file=pki.hub.cert, tls_key_file=pki.hub.key, port=8443)
    assert settings.base_url() == "https://127.0.0.1:8443"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"tls_cert_file": "x.pem"}, "tls_cert_file and tls_key_file"),
        ({"tls_client_cert_file": "x.pem"}, "tls_client_cert_file and tls_client_key_file"),
        ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file"),
    ],
)
def test_settings_refuse_half_configurations(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        load_settings(**values)


# -- production: plain HTTP refused at start-up --------------------------------------------


def _production(pki: tls.Layout, role: str, **values: object) -> Settings:
    own = pki.hub if role == "hub" else pki.node("site-a")
    base: dict[str, object] = {"tls_cert_file": own.cert, "tls_key_file": own.key}
    if role == "hub":
        base |= {
            "tls_client_cert_file": pki.hub_client.cert,
            "tls_client_key_file": pki.hub_client.key,
        }
    else:
        base |= {"tls_client_ca_file": pki.client_ca.cert, "hub_url": "https://hub.example.org"}
    return _settings(**(base | values))


@pytest.mark.parametrize("role", ["hub", "node"])
def test_production_with_everything_https_starts(pki: tls.Layout, role: str) -> None:
    tls.require_secure_transport(_production(pki, role), role)


@pytest.mark.parametrize(
    ("role", "values", "named"),
    [
        ("hub", {"tls_cert_file": None, "tls_key_file": None}, "EXCHANGE_TLS_CERT_FILE is not set"),
        ("hub", {"public_url": "http://hub.example.org"}, "EXCHANGE_PUBLIC_URL: http://"),
        (
            "hub",
            {"issuers": [{"issuer": "http://idp.example.org"}]},
            "EXCHANGE_ISSUERS (0: issuer)",
        ),
        (
            "hub",
            {"tls_client_cert_file": None, "tls_client_key_file": None},
            "EXCHANGE_TLS_CLIENT_CERT_FILE is not set",
        ),
        ("node", {"hub_url": "http://hub.example.org"}, "EXCHANGE_HUB_URL: http://"),
        ("node", {"tls_client_ca_file": None}, "EXCHANGE_TLS_CLIENT_CA_FILE is not set"),
    ],
)
def test_production_refuses_plain_http(
    pki: tls.Layout, role: str, values: dict[str, object], named: str
) -> None:
    settings = _production(pki, role, **values)
    with pytest.raises(ConfigurationError) as refused:
        tls.require_secure_transport(settings, role)
    assert named in refused.value.message
    assert "\n" not in refused.value.message
    tls.require_secure_transport(settings.model_copy(update={"dev_mode": True}), role)


# -- the command line ---------------------------------------------------------------------


def test_certs_init_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "pki"
    assert main(["certs", "init", "--dir", str(target), "--node", "site-a", "--days", "30"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target / 'node-site-a.key'}" in out
    assert "EXCHANGE_TLS_CLIENT_CA_FILE" in out
    assert main(["certs", "init", "--dir", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--force" in err
    assert main(["certs", "show", str(target / "hub.pem")]) == 0
    shown = capsys.readouterr().out
    assert "127.0.0.1" in shown
    assert "serverAuth" in shown
    assert main(["certs", "show", str(target / "hub.key")]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err
