"""Transport security: a development PKI, TLS contexts from the settings, start-up checks.

``exchange certs init`` writes two certificate authorities, because the two trust
decisions differ: the *server CA* signs the hub's and the nodes' HTTPS certificates
(what every client checks), the *client CA* signs only the hub's client certificate
(what a node checks before it answers a hub grant). A node's server certificate can
therefore never pass as the hub's client certificate, and an operator may replace the
server CA with the organisation's own while keeping a private client CA.

Keys are ECDSA P-256, written 0600 and atomically; nothing is ever overwritten
unless asked. All cryptography is ``cryptography``'s; contexts are the ``ssl``
module's with its defaults (TLS 1.2+, hostname checking).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exchange.errors import ConfigurationError
from exchange.files import write_atomic

if TYPE_CHECKING:
    from exchange.config import Settings

#: Names every server certificate carries, so loopback deployments and tests just work.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Common name (and DNS SAN) of the hub's client certificate; nodes may pin it.
HUB_CLIENT_NAME = "exchange-hub"
DEFAULT_DAYS = 365
MAX_DAYS = 3650
#: Leaves start a little in the past: a node whose clock lags must still accept them.
BACKDATE = dt.timedelta(minutes=5)
KEY_MODE = 0o600
CERT_MODE = 0o644


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Layout:
    """Where ``certs init`` puts everything in its directory (the federation reads it too)."""

    directory: Path

    @property
    def ca(self) -> Pair:
        return self._pair("ca")

    @property
    def client_ca(self) -> Pair:
        return self._pair("client-ca")

    @property
    def hub(self) -> Pair:
        return self._pair("hub")

    @property
    def hub_client(self) -> Pair:
        return self._pair("hub-client")

    def node(self, node_id: str) -> Pair:
        return self._pair(f"node-{node_id}")

    def _pair(self, stem: str) -> Pair:
        return Pair(self.directory / f"{stem}.pem", self.directory / f"{stem}.key")


# -- the development PKI ------------------------------------------------------------------


@dataclass(frozen=True)
class _Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Exchange development PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _authority(common_name: str, days: int, now: dt.datetime) -> _Authority:
    key = _new_key()
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Authority(cert, key)


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    found: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            found.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            found.append(x509.DNSName(name))
    return found


def _leaf(
    issuer: _Authority,
    common_name: str,
    names: Sequence[str],
    usage: x509.ObjectIdentifier,
    days: int,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    public = key.public_key()
    issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), issuer.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return cert, key


def _check_name(kind: str, value: str) -> str:
    value = value.strip()
    if not value or any(c.isspace() or c in "/\\" for c in value) or len(value) > 253:
        raise ConfigurationError(f"{kind} {value!r} is not a valid name")
    return value


def init_pki(
    directory: Path,
    *,
    hub_hosts: Sequence[str] = (),
    nodes: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Write a development PKI into ``directory``; the files written, in order.

    Refuses (``ConfigurationError``, nothing written) when any file it would write
    exists, unless ``force``: silently replacing a CA would strand every certificate
    issued from it.
    """
    if not 1 <= days <= MAX_DAYS:
        raise ConfigurationError(f"--days must be between 1 and {MAX_DAYS} (got {days})")
    hosts = [_check_name("host name", h) for h in hub_hosts]
    node_ids = [_check_name("node id", n) for n in nodes]
    layout = Layout(directory)
    now = dt.datetime.now(dt.UTC)
    ca = _authority("Exchange development server CA", days, now)
    client_ca = _authority("Exchange development client CA", days, now)
    leaves: list[tuple[Pair, x509.Certificate, ec.EllipticCurvePrivateKey]] = []
    server = ExtendedKeyUsageOID.SERVER_AUTH
    cert, key = _leaf(ca, "exchange hub", [*LOOPBACK_NAMES, *hosts], server, days, now)
    leaves.append((layout.hub, cert, key))
    cert, key = _leaf(
        client_ca, HUB_CLIENT_NAME, [HUB_CLIENT_NAME], ExtendedKeyUsageOID.CLIENT_AUTH, days, now
    )
    leaves.append((layout.hub_client, cert, key))
    for node_id in dict.fromkeys(node_ids):
        cert, key = _leaf(
            ca, f"exchange node {node_id}", [*LOOPBACK_NAMES, node_id], server, days, now
        )
        leaves.append((layout.node(node_id), cert, key))

    items = [(layout.ca, ca.cert, ca.key), (layout.client_ca, client_ca.cert, client_ca.key)]
    items += leaves
    targets = [path for pair, _, _ in items for path in (pair.cert, pair.key)]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            raise ConfigurationError(
                f"{existing[0]} already exists; refusing to overwrite certificates and keys "
                "(pass --force to replace them all)"
            )
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for pair, cert, key in items:
        # The key first: a certificate on disk always has its key beside it.
        write_atomic(pair.key, _key_pem(key), mode=KEY_MODE)
        write_atomic(pair.cert, _cert_pem(cert), mode=CERT_MODE)
        written += [pair.cert, pair.key]
    return written


def issue_client_certificate(
    ca: Pair, common_name: str, out: Pair, *, days: int = DEFAULT_DAYS, force: bool = False
) -> None:
    """Sign a further client certificate with an existing CA (a site system's, or a test's).

    Nodes accept it for hub grants only if ``tls_client_names`` is empty or names it.
    """
    if not force and (out.cert.exists() or out.key.exists()):
        raise ConfigurationError(f"{out.cert} already exists; refusing to overwrite it")
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except ValueError:
        raise ConfigurationError(f"{ca.cert} and {ca.key} are not a PEM CA and its key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{ca.key} is not an ECDSA key made by certs init")
    now = dt.datetime.now(dt.UTC)
    leaf, leaf_key = _leaf(
        _Authority(cert, key),
        _check_name("name", common_name),
        [common_name],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days,
        now,
    )
    write_atomic(out.key, _key_pem(leaf_key), mode=KEY_MODE)
    write_atomic(out.cert, _cert_pem(leaf), mode=CERT_MODE)


def describe(path: Path) -> list[str]:
    """A certificate file in a few lines: subject, issuer, validity, names, usage."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ConfigurationError(f"{path} is not a PEM certificate file") from None
    lines: list[str] = []
    for cert in certs:
        lines.append(f"subject:   {cert.subject.rfc4514_string()}")
        lines.append(f"issuer:    {cert.issuer.rfc4514_string()}")
        lines.append(
            f"valid:     {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        lines.append(f"CA:        {'yes' if ca else 'no'}")
        names = certificate_names(cert, include_subject=False)
        if names:
            lines.append(f"names:     {', '.join(names)}")
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            lines.append(
                f"usage:     {', '.join(getattr(u, '_name', u.dotted_string) for u in usages)}"
            )
        except x509.ExtensionNotFound:
            pass
        fingerprint = cert.fingerprint(hashes.SHA256()).hex(":")
        lines.append(f"sha256:    {fingerprint}")
    return lines


def certificate_names(cert: x509.Certificate, *, include_subject: bool = True) -> list[str]:
    """The subject common name and the DNS/IP/URI alternative names of ``cert``."""
    names: list[str] = []
    if include_subject:
        names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    names += san.get_values_for_type(x509.DNSName)
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    names += san.get_values_for_type(x509.UniformResourceIdentifier)
    return names


# -- contexts from the settings ------------------------------------------------------------


def _readable(setting: str, path: Path) -> str:
    if not path.is_file():
        raise ConfigurationError(f"EXCHANGE_{setting.upper()}: {path} does not exist")
    return str(path)


def client_context(settings: Settings, *, identify: bool = False) -> ssl.SSLContext | None:
    """The context for outgoing HTTPS calls (hub to node, node to hub, JWKS, registry).

    Trust is ``tls_ca_file`` when set, *instead of* the public CAs (an explicit trust
    anchor; concatenate bundles to trust both). With ``identify`` the context presents
    ``tls_client_cert_file``: only the hub's calls to nodes do. None when neither
    applies: the HTTP libraries' own defaults (public CAs), and no ~30-100 ms spent
    loading the public bundle at start-up for nothing.
    """
    presents = identify and settings.tls_client_cert_file is not None
    if settings.tls_ca_file is None and not presents:
        return None
    if settings.tls_ca_file is not None:
        context = ssl.create_default_context(cafile=_readable("tls_ca_file", settings.tls_ca_file))
    else:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    if presents:
        assert settings.tls_client_cert_file is not None
        assert settings.tls_client_key_file is not None  # the settings validate the pair
        try:
            context.load_cert_chain(
                _readable("tls_client_cert_file", settings.tls_client_cert_file),
                _readable("tls_client_key_file", settings.tls_client_key_file),
            )
        except ssl.SSLError as exc:
            raise ConfigurationError(
                "EXCHANGE_TLS_CLIENT_CERT_FILE / EXCHANGE_TLS_CLIENT_KEY_FILE: "
                f"not a certificate and its key ({exc.reason or exc})"
            ) from None
    return context


def httpx_verify(settings: Settings, *, identify: bool = False) -> ssl.SSLContext | bool:
    """``verify=`` for httpx: ``client_context``, or True for httpx's defaults."""
    context = client_context(settings, identify=identify)
    return True if context is None else context


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context the service listens with, or None for plain HTTP (development only).

    With ``tls_client_ca_file`` the server *asks* for a client certificate and verifies
    any that is offered against that CA during the handshake (a certificate from another
    CA fails the handshake), but lets clients without one in: which routes demand the
    hub's certificate is decided per request (see ``exchange.web.peer``).
    """
    if settings.tls_cert_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(
            _readable("tls_cert_file", settings.tls_cert_file),
            _readable("tls_key_file", settings.tls_key_file or settings.tls_cert_file),
        )
    except ssl.SSLError as exc:
        raise ConfigurationError(
            "EXCHANGE_TLS_CERT_FILE / EXCHANGE_TLS_KEY_FILE: "
            f"not a certificate and its key ({exc.reason or exc})"
        ) from None
    if settings.tls_client_ca_file is not None:
        try:
            context.load_verify_locations(
                _readable("tls_client_ca_file", settings.tls_client_ca_file)
            )
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"EXCHANGE_TLS_CLIENT_CA_FILE: not a PEM CA certificate ({exc.reason or exc})"
            ) from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class HttpsOnlyTransport(httpx.AsyncBaseTransport):
    """Refuses plain-HTTP requests: outside development mode no grant travels in clear,
    whatever address a site's Endpoint names."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise httpx.UnsupportedProtocol(
                "plain HTTP to a node is refused outside development mode", request=request
            )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def node_transport(settings: Settings, **options: Any) -> httpx.AsyncBaseTransport:
    """The hub's transport to nodes: its trust, its client certificate (mutual TLS), and
    HTTPS only outside development mode. ``options`` go to ``httpx.AsyncHTTPTransport``."""
    transport = httpx.AsyncHTTPTransport(verify=httpx_verify(settings, identify=True), **options)
    return transport if settings.dev_mode else HttpsOnlyTransport(transport)


def requests_verify(settings: Settings) -> str | bool:
    """``verify=`` for ``requests`` (which takes paths, not contexts)."""
    return str(settings.tls_ca_file) if settings.tls_ca_file is not None else True


# -- production start-up check ----------------------------------------------------------


def require_secure_transport(settings: Settings, role: str) -> None:
    """Outside development mode, refuse to start without HTTPS end to end.

    One ``ConfigurationError`` naming the first offending setting: a service that
    would serve, or call a party, over plain HTTP does not start at all.
    """
    if settings.dev_mode:
        return
    later = "(or EXCHANGE_DEV_MODE=true, for development only)"
    if settings.tls_cert_file is None:
        raise ConfigurationError(
            f"EXCHANGE_TLS_CERT_FILE is not set: outside development mode the {role} serves "
            f"HTTPS only; set EXCHANGE_TLS_CERT_FILE and EXCHANGE_TLS_KEY_FILE {later}"
        )
    urls: list[tuple[str, str | None]] = [
        ("EXCHANGE_PUBLIC_URL", settings.public_url),
        ("EXCHANGE_HUB_URL", settings.hub_url),
        ("EXCHANGE_HUB_TOKEN_URL", settings.hub_token_url),
        ("EXCHANGE_CONSENT_REGISTRY_URL", settings.consent_registry_url),
    ]
    for i, trusted in enumerate(settings.issuers):
        urls.append((f"EXCHANGE_ISSUERS ({i}: issuer)", trusted.issuer))
        urls.append((f"EXCHANGE_ISSUERS ({i}: jwks_uri)", trusted.jwks_uri))
    for name, url in urls:
        if url is not None and not url.lower().startswith("https://"):
            raise ConfigurationError(
                f"{name}: {url} is plain HTTP; outside development mode every URL must be "
                f"https:// {later}"
            )
    if role == "node" and settings.hub_url and settings.tls_client_ca_file is None:
        raise ConfigurationError(
            "EXCHANGE_TLS_CLIENT_CA_FILE is not set: outside development mode a node answers "
            f"hub grants only over mutual TLS; set it to the CA of the hub's client certificate "
            f"{later}"
        )
    if role == "hub" and settings.tls_client_cert_file is None:
        raise ConfigurationError(
            "EXCHANGE_TLS_CLIENT_CERT_FILE is not set: outside development mode the hub calls "
            "nodes with mutual TLS; set EXCHANGE_TLS_CLIENT_CERT_FILE and "
            f"EXCHANGE_TLS_CLIENT_KEY_FILE {later}"
        )


# -- the command line ---------------------------------------------------------------------


def init_command(
    directory: Path, hub_hosts: Sequence[str], nodes: Sequence[str], days: int, force: bool
) -> int:
    """``exchange certs init``: write the PKI and say what each file is for."""
    written = init_pki(directory, hub_hosts=hub_hosts, nodes=nodes, days=days, force=force)
    layout = Layout(directory)
    roles = {
        layout.ca.cert: "server CA: clients trust it (EXCHANGE_TLS_CA_FILE)",
        layout.ca.key: "server CA key: keep offline",
        layout.client_ca.cert: "client CA: nodes require it (EXCHANGE_TLS_CLIENT_CA_FILE)",
        layout.client_ca.key: "client CA key: keep offline",
        layout.hub.cert: "hub HTTPS certificate (EXCHANGE_TLS_CERT_FILE)",
        layout.hub.key: "hub HTTPS key (EXCHANGE_TLS_KEY_FILE)",
        layout.hub_client.cert: "hub client certificate (EXCHANGE_TLS_CLIENT_CERT_FILE)",
        layout.hub_client.key: "hub client key (EXCHANGE_TLS_CLIENT_KEY_FILE)",
    }
    for node_id in nodes:
        pair = layout.node(node_id)
        roles[pair.cert] = f"node {node_id} HTTPS certificate (EXCHANGE_TLS_CERT_FILE)"
        roles[pair.key] = f"node {node_id} HTTPS key (EXCHANGE_TLS_KEY_FILE)"
    width = max(len(str(p)) for p in written)
    for path in written:
        print(f"wrote {path!s:<{width}}  {roles.get(path, '')}".rstrip())
    print(f"valid for {days} days; development use only: private keys are not encrypted")
    return 0


def show_command(path: Path) -> int:
    """``exchange certs show``: what a certificate file says."""
    if not path.is_file():
        raise ConfigurationError(f"{path} does not exist")
    print("\n".join(describe(path)))
    return 0
