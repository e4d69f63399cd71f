"""What the hub's routes need, built once at start-up (lifespan) and closed at shutdown."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from sqlalchemy import Engine

from exchange.audit.log import AuditLog
from exchange.config import Settings
from exchange.database import checkpoint_wal, make_engine, ping
from exchange.fhir.mpi import PatientIndex
from exchange.fhir.repository import Repository, SqlRepository
from exchange.hub.access import FactsCache
from exchange.hub.accesscodes import AccessCodes, CodeKey, Limits, patient_access_issuer
from exchange.hub.accesscodes import key_path as access_code_key_path
from exchange.hub.consents import (
    ConsentSource,
    IndexConsentSource,
    RegistryConsentSource,
    index_identifiers,
)
from exchange.migrations import ensure_schema
from exchange.policy.engine import PolicyEngine, open_engine
from exchange.security import devidp, keys
from exchange.security.tls import client_context, requests_verify
from exchange.security.tokens import (
    JwtValidator,
    KeyResolver,
    PrincipalCache,
    issuer_resolver,
    static_resolver,
)
from exchange.web.health import Check

log = logging.getLogger(__name__)

SERVICE = "hub"
#: How often the audit chain's head is signed while records are being added.
AUDIT_CHECKPOINT_SECONDS = 60.0
#: How often the SQLite WAL is copied into the database.
WAL_CHECKPOINT_SECONDS = 1.0


@dataclass
class HubServices:
    settings: Settings
    engine: Engine
    resources: Repository
    patients: PatientIndex
    policy: PolicyEngine
    grant_key: keys.SigningKey
    tokens: JwtValidator
    idp: devidp.DevIdentityProvider | None
    #: Patients' Consents: the hub's index or the HIE's consent registry.
    consents: ConsentSource
    #: The hash-chained audit trail (AuditEvents in the index, signed checkpoints).
    audit: AuditLog
    #: Verified patient access codes (hashed, rate-limited) and their patient sessions.
    access_codes: AccessCodes
    #: Sites' Endpoints and patient links as decisions see them (seconds-long cache).
    facts: FactsCache = field(default_factory=FactsCache)
    #: Tokens already validated, until they expire.
    principals: PrincipalCache = field(default_factory=PrincipalCache)
    #: Background upkeep: SQLite WAL checkpoints, periodic signed audit checkpoints.
    upkeep: Upkeep | None = None

    def checks(self) -> list[Check]:
        async def database() -> None:
            await anyio.to_thread.run_sync(ping, self.engine)

        async def signing_keys() -> None:
            self.grant_key.public_jwk()

        async def policy_engine() -> None:
            await anyio.to_thread.run_sync(self.policy.check)

        async def consents() -> None:
            await anyio.to_thread.run_sync(self.consents.check)

        async def audit() -> None:
            await anyio.to_thread.run_sync(self.audit.check)

        return [
            Check("database", database),
            Check("keys", signing_keys),
            Check("policy", policy_engine),
            Check("consents", consents),
            Check("audit", audit),
        ]

    def start(self) -> HubServices:
        if self.upkeep is None:
            self.upkeep = Upkeep(self.engine, self.audit).start()
        return self

    def close(self) -> None:
        if self.upkeep is not None:
            self.upkeep.stop()
            self.upkeep = None
        try:  # sign the head at shutdown, so the newest records are vouched for too
            self.audit.checkpoint()
        except Exception as exc:  # shutting down regardless; verify reports what is unsigned
            log.warning("audit checkpoint at shutdown failed", extra={"error": type(exc).__name__})
        self.consents.close()
        self.engine.dispose()


class Upkeep:
    """The hub's background work, off every request's path, in one thread: the SQLite WAL
    is checkpointed every ``WAL_CHECKPOINT_SECONDS``, and the audit chain's head is signed
    every ``AUDIT_CHECKPOINT_SECONDS`` when records were added (besides every
    ``checkpoint_every`` records and at shutdown)."""

    def __init__(self, engine: Engine, audit: AuditLog) -> None:
        self._engine = engine
        self._audit = audit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-upkeep", daemon=True)

    def start(self) -> Upkeep:
        self._thread.start()
        return self

    def _run(self) -> None:
        signed = time.monotonic()
        while not self._stop.wait(WAL_CHECKPOINT_SECONDS):
            checkpoint_wal(self._engine)
            if time.monotonic() - signed < AUDIT_CHECKPOINT_SECONDS:
                continue
            signed = time.monotonic()
            try:
                self._audit.checkpoint()
            except Exception as exc:  # the next round tries again; verify shows what is unsigned
                log.warning("periodic audit checkpoint failed", extra={"error": type(exc).__name__})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        checkpoint_wal(self._engine)


def grant_key_path(settings: Settings) -> Path:
    """The hub's grant-signing key (it signs audit checkpoints too)."""
    return settings.data_path(SERVICE) / "keys" / "grant-signing.pem"


def idp_issuer(settings: Settings) -> str:
    return f"{settings.base_url()}/idp"


def _consent_source(
    settings: Settings, repository: Repository, outgoing: ssl.SSLContext | None
) -> ConsentSource:
    if settings.consent_source == "index":
        return IndexConsentSource(repository)
    assert settings.consent_registry_url is not None  # the settings validate this
    token = settings.consent_registry_token
    return RegistryConsentSource(
        settings.consent_registry_url,
        identifiers=index_identifiers(repository),
        token=token.get_secret_value() if token else None,
        cache_seconds=settings.consent_cache_seconds,
        max_staleness_seconds=settings.consent_max_staleness_seconds,
        timeout=settings.consent_timeout_seconds,
        verify=True if outgoing is None else outgoing,
    )


def build(settings: Settings) -> HubServices:
    data_dir = settings.data_path(SERVICE)
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database(SERVICE), background_checkpoints=True)
    ensure_schema(engine, "hub", auto_upgrade=settings.database_auto_upgrade)
    fhir_base = f"{settings.base_url()}/fhir"
    repository = SqlRepository(engine, local_base=fhir_base)
    outgoing = client_context(settings)  # the hub's trust for IdPs and the consent registry
    resolvers: dict[str, KeyResolver] = {
        trusted.issuer: issuer_resolver(trusted.issuer, trusted.jwks_uri, outgoing)
        for trusted in settings.issuers
    }
    idp = None
    if settings.dev_idp:
        log.warning(devidp.WARNING)
        idp = devidp.DevIdentityProvider.open(data_dir, idp_issuer(settings), settings.audience)
        resolvers[idp.issuer] = static_resolver(idp.key.private.public_key())
    grant_key = keys.load_or_create(grant_key_path(settings))
    # Patient sessions opened with an access code are signed by the hub's own key.
    resolvers[patient_access_issuer(settings)] = static_resolver(grant_key.private.public_key())
    return HubServices(
        settings=settings,
        engine=engine,
        resources=repository,
        patients=PatientIndex(engine, repository, settings.hie_identifier_system, fhir_base),
        policy=open_engine(
            settings.policy_engine,
            settings.policy_dir,
            settings.opa_url,
            timeout=settings.opa_timeout_seconds,
            verify=requests_verify(settings),
        ),
        grant_key=grant_key,
        tokens=JwtValidator(resolvers, settings.audience),
        idp=idp,
        consents=_consent_source(settings, repository, outgoing),
        audit=AuditLog(engine, repository, grant_key, issuer=settings.base_url()),
        access_codes=AccessCodes(
            engine,
            CodeKey.load_or_create(access_code_key_path(data_dir)),
            Limits.from_settings(settings),
        ),
    )
