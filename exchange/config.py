"""All settings, in one place.

Sources, strongest first: explicit overrides (CLI flags), ``EXCHANGE_*``
environment variables, one TOML file (``--config`` or ``EXCHANGE_CONFIG``),
then the defaults below. Every default is the safe one: loopback only, the
development identity provider off, data under a per-service directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from exchange.errors import ConfigurationError

ENV_PREFIX = "EXCHANGE_"
MiB = 1024 * 1024

Port = Annotated[int, Field(ge=1, le=65535)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def _repo_policies() -> Path:
    return Path(__file__).resolve().parent.parent / "policies"


class TenantSettings(BaseModel):
    """A healthcare group hosted on a node; its data and key are its own."""

    model_config = {"extra": "forbid"}

    organization: Identifier
    name: str = ""
    #: Same SOP Instance UID, different bytes: refuse (default) or replace the stored one.
    on_conflict: Literal["reject", "replace"] = "reject"
    #: Identifier system of this group's Patient IDs (MRNs); default urn:exchange:<org>:mrn.
    mrn_system: str | None = None
    #: Identifier system of its accession numbers; default urn:exchange:<org>:accession.
    accession_system: str | None = None
    #: Site-system client at the HIE's IdP for this group's organisation, when the node
    #: hosts groups of several organisations (else the node's hub_client_id/secret).
    hub_client_id: str | None = None
    hub_client_secret: SecretStr | None = None


class IssuerSettings(BaseModel):
    """An OIDC issuer the hub trusts (the HIE's identity provider)."""

    model_config = {"extra": "forbid"}

    issuer: str
    #: Defaults to ``{issuer}/.well-known/jwks.json`` via OIDC discovery.
    jwks_uri: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # -- every service ---------------------------------------------------
    host: str = "127.0.0.1"
    port: Port = 8080
    #: Base URL others use to reach this service; defaults to http://host:port.
    public_url: str | None = None
    #: Where this service keeps its files; defaults to ./exchange-data/<service>.
    data_dir: Path | None = None
    #: SQLAlchemy URL; defaults to SQLite (WAL) inside data_dir.
    database_url: str | None = None
    #: Bring the database schema to this version at start-up (serialised between processes);
    #: off: start-up refuses a schema that is behind until ``exchange db upgrade`` has run.
    database_auto_upgrade: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    #: Development conveniences (plain HTTP off loopback, dev IdP). Never in production.
    dev_mode: bool = False
    #: Largest JSON/FHIR request body accepted.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 16 * MiB
    #: Largest STOW-RS upload accepted (streamed to disk, never held in memory).
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 4096 * MiB
    #: Serve HTTPS with this certificate (PEM, leaf first, then any intermediates) and key.
    #: Required outside dev_mode; public_url then defaults to https://host:port.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: CA bundle that outgoing HTTPS calls (hub to node, node to hub, JWKS, registry) trust,
    #: instead of the public CAs; unset: the public CAs.
    tls_ca_file: Path | None = None
    #: Node: answer hub grants only over connections presenting a client certificate that
    #: chains to this CA (mutual TLS); required outside dev_mode on a node with a hub.
    tls_client_ca_file: Path | None = None
    #: Node: ... and whose subject CN or DNS/URI name is one of these (empty: any from that CA).
    tls_client_names: list[str] = []
    #: Hub: client certificate and key presented to nodes; required outside dev_mode.
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    # Denial-of-service limits (docs/operations.md, "Limits").
    #: Requests a second one credential (bearer token, API key) may make; 0 turns rate
    #: limits off. A token bucket: ``rate_limit_burst`` may come at once.
    rate_limit_per_second: Annotated[float, Field(ge=0, le=1_000_000)] = 100.0
    rate_limit_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    #: Requests a second from one client address without an accepted credential (none
    #: yet, or ones never seen accepted): bounds floods of garbage tokens.
    rate_limit_address_per_second: Annotated[float, Field(ge=0, le=1_000_000)] = 400.0
    rate_limit_address_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    #: Clients (credentials, addresses) remembered; the least recently seen go first.
    rate_limit_max_clients: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    #: Client networks never rate limited (e.g. the hub's addresses, at a node).
    rate_limit_exempt_networks: list[str] = []
    #: Who may read ``/metrics``: loopback always; anyone presenting this bearer token.
    metrics_token: SecretStr | None = None
    #: Connections and requests at once before uvicorn answers 503.
    server_limit_concurrency: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    #: Connections waiting to be accepted (listen backlog).
    server_backlog: Annotated[int, Field(ge=1, le=65535)] = 2048
    #: Idle keep-alive connections are closed after this long.
    server_keep_alive_seconds: Annotated[int, Field(ge=1, le=3600)] = 5
    #: Addresses of reverse proxies whose X-Forwarded-For is believed (uvicorn's default).
    forwarded_allow_ips: list[str] = ["127.0.0.1", "::1"]
    #: Request line and headers: most bytes, most header fields (then 431), and how long
    #: they may take to arrive (then 408 and the connection is closed).
    max_header_bytes: Annotated[int, Field(ge=1024, le=16 * MiB)] = 64 * 1024
    max_header_count: Annotated[int, Field(ge=8, le=10_000)] = 100
    header_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    #: Request bodies: longest silence between two chunks, and the slowest average rate
    #: (bytes/s, after the first ``body_grace_seconds``) before 408.
    body_idle_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    body_min_bytes_per_second: Annotated[int, Field(ge=0, le=1_000_000_000)] = 1024
    body_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 10.0

    # -- hub ---------------------------------------------------------------
    #: Run the built-in development identity provider at {hub}/idp. Demo and tests only.
    dev_idp: bool = False
    #: OIDC issuers whose tokens the hub accepts (the HIE's identity provider).
    issuers: list[IssuerSettings] = []
    #: Audience the hub expects in access tokens.
    audience: str = "exchange"
    #: Lifetime of a hub-to-node grant; DESIGN.md caps it at 60 s.
    grant_ttl_seconds: Annotated[int, Field(ge=1, le=60)] = 30
    #: Identifier system of the HIE-wide patient identifier: same value = same person.
    hie_identifier_system: str | None = None
    policy_engine: Literal["embedded", "server"] = "embedded"
    policy_dir: Path = Field(default_factory=_repo_policies)
    #: OPA server base URL, used when policy_engine = "server".
    opa_url: str | None = None
    #: How long to wait for the OPA server; no answer in time is a deny.
    opa_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 2.0
    #: Where patients' Consent resources come from: the hub's own index, or the HIE's
    #: consent registry (any FHIR server) at consent_registry_url.
    consent_source: Literal["index", "registry"] = "index"
    #: FHIR base URL of the HIE's consent registry, used when consent_source = "registry".
    consent_registry_url: str | None = None
    #: Bearer token the hub presents to the consent registry.
    consent_registry_token: SecretStr | None = None
    #: How long a registry answer is used without asking again.
    consent_cache_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    #: How old a cached answer may be while the registry is unreachable; older: deny.
    consent_max_staleness_seconds: Annotated[float, Field(ge=0, le=86400)] = 300.0
    #: How long to wait for the consent registry.
    consent_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    #: Broker (``{hub}/dicomweb``): how long to wait for a site's node to accept a connection.
    broker_connect_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 3.0
    #: Broker: longest silence from a node (before its answer starts, or between two
    #: chunks of it); beyond it the caller gets 504 (or the stream is cut).
    broker_read_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    #: Broker: most connections to nodes at once (one shared keep-alive pool).
    broker_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 100
    #: Broker: how long an idle keep-alive connection to a node is kept open.
    broker_keepalive_seconds: Annotated[float, Field(ge=0, le=3600)] = 15.0
    #: Broker: node calls one cross-site QIDO-RS search makes at the same time.
    broker_max_streams: Annotated[int, Field(ge=1, le=256)] = 8
    #: Broker: node calls (and relayed answers) one caller may have open at once (then 429).
    broker_streams_per_caller: Annotated[int, Field(ge=1, le=10_000)] = 16
    #: Broker: calls open to one site's node at once (then 503).
    broker_streams_per_node: Annotated[int, Field(ge=1, le=10_000)] = 64
    #: Patient access codes: validity when the issuer names none, and the longest allowed.
    access_code_default_days: Annotated[float, Field(gt=0, le=365)] = 7.0
    access_code_max_days: Annotated[float, Field(gt=0, le=365)] = 30.0
    #: How the holding site may have verified the patient's identity (verification.method).
    access_code_verification_methods: list[str] = ["photo-id", "in-person", "video"]
    #: How long ago that verification may have been, when the code is issued.
    access_code_verification_max_age_days: Annotated[float, Field(gt=0, le=365)] = 30.0
    #: Wrong codes tried against one code before it is locked ...
    access_code_max_failures: Annotated[int, Field(ge=1, le=100)] = 5
    #: ... for this long, doubling with each further lock-out up to the maximum.
    access_code_lockout_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0
    access_code_lockout_max_seconds: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0
    #: Failed redemptions one client address may make per window (then 429).
    access_code_address_failures: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    access_code_address_window_seconds: Annotated[float, Field(gt=0, le=86400)] = 900.0
    #: Lifetime of the patient session a redeemed access code opens.
    patient_session_seconds: Annotated[int, Field(ge=1, le=3600)] = 900
    #: The viewer's SMART client id at the HIE's authorization server ({hub}/viewer).
    viewer_client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:~-]{0,127}$")] = (
        "exchange-viewer"
    )

    # -- node --------------------------------------------------------------
    node_id: Identifier = "node"
    #: The hub this node publishes to and takes grants from.
    hub_url: str | None = None
    tenants: dict[Identifier, TenantSettings] = {}
    #: Base64 of 32 bytes protecting the tenant keys; else <data_dir>/keys/master.key (0600).
    master_key: SecretStr | None = None
    #: The node publishes to the hub as a site system: OAuth2 client credentials at the
    #: token endpoint (hub_token_url, else found by OIDC discovery of the first issuer)...
    hub_client_id: str | None = None
    hub_client_secret: SecretStr | None = None
    hub_token_url: str | None = None
    #: ... or a static bearer token (tests, operators). Publishing is on when hub_url and
    #: a credential are set.
    hub_token: SecretStr | None = None
    #: How often the publishing worker looks for work it was not woken for (other processes).
    outbox_poll_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    #: Longest wait between retries while the hub is unreachable or failing.
    outbox_retry_max_seconds: Annotated[float, Field(ge=0.5, le=3600)] = 30.0

    # -- backup (exchange backup / restore) --------------------------------
    #: Base64 of 32 bytes encrypting database dumps and wrapping exported keys ...
    backup_key: SecretStr | None = None
    #: ... or a 0600 file holding it (``exchange backup key --out FILE`` makes one).
    backup_key_file: Path | None = None
    #: S3-compatible endpoint for s3:// backup locations (else boto3's: AWS or
    #: AWS_ENDPOINT_URL); credentials come from the usual AWS variables, never from here.
    backup_s3_endpoint_url: str | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("secrets_dir"):
            sources.append(file_secret_settings)  # EXCHANGE_SECRETS_DIR: compose secrets
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @field_validator("public_url", "hub_url", "opa_url", "consent_registry_url", "hub_token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.policy_engine == "server" and not self.opa_url:
            raise ValueError("policy_engine = 'server' needs opa_url")
        if self.consent_source == "registry" and not self.consent_registry_url:
            raise ValueError("consent_source = 'registry' needs consent_registry_url")
        if self.consent_max_staleness_seconds < self.consent_cache_seconds:
            raise ValueError("consent_max_staleness_seconds must be at least consent_cache_seconds")
        if self.access_code_default_days > self.access_code_max_days:
            raise ValueError("access_code_default_days must be at most access_code_max_days")
        if self.access_code_lockout_max_seconds < self.access_code_lockout_seconds:
            raise ValueError(
                "access_code_lockout_max_seconds must be at least access_code_lockout_seconds"
            )
        for owner, client, secret in [
            ("", self.hub_client_id, self.hub_client_secret),
            *(
                (f"tenants.{t}.", c.hub_client_id, c.hub_client_secret)
                for t, c in self.tenants.items()
            ),
        ]:
            if (client is None) != (secret is None):
                raise ValueError(f"{owner}hub_client_id and {owner}hub_client_secret go together")
        for cert, key, pair in [
            (self.tls_cert_file, self.tls_key_file, "tls_cert_file and tls_key_file"),
            (
                self.tls_client_cert_file,
                self.tls_client_key_file,
                "tls_client_cert_file and tls_client_key_file",
            ),
        ]:
            if (cert is None) != (key is None):
                raise ValueError(f"{pair} go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file")
        if self.dev_idp and not self.dev_mode:
            raise ValueError(
                "dev_idp needs dev_mode = true (the development IdP is not for production)"
            )
        return self

    # -- derived -----------------------------------------------------------
    def base_url(self) -> str:
        scheme = "https" if self.tls_cert_file is not None else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"

    def data_path(self, service: str) -> Path:
        return (self.data_dir or Path.cwd() / "exchange-data" / service).resolve()

    def database(self, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path(service) / 'exchange.db'}"


def _setting_name(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "configuration"
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build validated settings or raise ``ConfigurationError`` naming the bad setting."""
    env_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
    path = config_file or (Path(env_file) if env_file else None)
    if path is not None and not path.is_file():
        raise ConfigurationError(f"configuration file {path} does not exist")
    # A directory of files named after settings (EXCHANGE_MASTER_KEY, ...), e.g. the
    # compose secrets in /run/secrets: secrets stay out of the environment and the image.
    secrets_env = os.environ.get(f"{ENV_PREFIX}SECRETS_DIR")
    secrets_dir = Path(secrets_env) if secrets_env else None
    if secrets_dir is not None and not secrets_dir.is_dir():
        raise ConfigurationError(f"{ENV_PREFIX}SECRETS_DIR: {secrets_dir} is not a directory")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path, secrets_dir=secrets_dir)

    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = _FileSettings(**clean)
    except ValidationError as exc:
        first = exc.errors()[0]
        got = first.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float) else ""
        raise ConfigurationError(f"{_setting_name(first['loc'])}: {first['msg']}{shown}") from None
    except ValueError as exc:  # e.g. TOML syntax or JSON in a complex env value
        raise ConfigurationError(f"invalid configuration: {exc}") from None
    return settings
