"""What the node's routes need, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio
from sqlalchemy import Engine

from exchange.config import Settings
from exchange.database import make_engine, ping
from exchange.node.credentials import Credentials
from exchange.node.store import InstanceStore
from exchange.security.grants import GrantVerifier
from exchange.security.keystore import FileKeyStore, master_key
from exchange.security.tokens import JwtValidator, KeyResolver, jwks_resolver
from exchange.web.health import Check

JWKS_PATH = "/.well-known/jwks.json"


@dataclass
class NodeServices:
    settings: Settings
    engine: Engine
    keys: FileKeyStore
    store: InstanceStore
    credentials: Credentials
    #: None when no hub is configured: grant-gated routes then refuse everything.
    grants: GrantVerifier | None

    def checks(self) -> list[Check]:
        async def database() -> None:
            await anyio.to_thread.run_sync(ping, self.engine)

        async def tenant_keys() -> None:
            missing = [t for t in self.settings.tenants if not self.keys.has(t)]
            if missing:
                raise LookupError(f"no key for {len(missing)} tenant(s)")

        return [Check("database", database), Check("keys", tenant_keys)]

    def close(self) -> None:
        self.engine.dispose()


def service_name(settings: Settings) -> str:
    return f"node-{settings.node_id}"


def open_keys(settings: Settings, data_dir: Path) -> FileKeyStore:
    secret = settings.master_key.get_secret_value() if settings.master_key else None
    master = master_key(secret, data_dir / "keys" / "master.key")
    return FileKeyStore(data_dir / "keys" / "tenants", master, list(settings.tenants))


def _issuer_resolver(issuer: str, jwks_uri: str | None) -> KeyResolver:
    # OIDC issuers publish their keys at a discovered URI; ours and the dev IdP's are fixed.
    return jwks_resolver(jwks_uri or f"{issuer}{JWKS_PATH}")


def build(settings: Settings) -> NodeServices:
    data_dir = settings.data_path(service_name(settings))
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database(service_name(settings)))
    keys = open_keys(settings, data_dir)
    tokens = None
    if settings.issuers:
        tokens = JwtValidator(
            {i.issuer: _issuer_resolver(i.issuer, i.jwks_uri) for i in settings.issuers},
            settings.audience,
        )
    grants = None
    if settings.hub_url:
        grants = GrantVerifier(
            settings.hub_url, settings.node_id, jwks_resolver(f"{settings.hub_url}{JWKS_PATH}")
        )
    return NodeServices(
        settings=settings,
        engine=engine,
        keys=keys,
        store=InstanceStore(
            engine,
            data_dir / "blobs",
            keys,
            settings.max_upload_bytes,
            replace_on_conflict=[
                t for t, c in settings.tenants.items() if c.on_conflict == "replace"
            ],
        ),
        credentials=Credentials(engine, settings, tokens),
        grants=grants,
    )
