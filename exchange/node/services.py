"""What the node's routes need, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from sqlalchemy import Engine

from exchange.config import Settings
from exchange.database import make_engine, ping
from exchange.migrations import ensure_schema
from exchange.node.credentials import Credentials
from exchange.node.outbox import Outbox
from exchange.node.publisher import HubClient, Publisher, publishing_configured
from exchange.node.storage import data_dir, open_keys, open_store, service_name
from exchange.node.store import InstanceStore
from exchange.security.grants import GrantVerifier
from exchange.security.keystore import FileKeyStore
from exchange.security.tls import client_context
from exchange.security.tokens import JwtValidator, issuer_resolver, jwks_resolver
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
    outbox: Outbox
    #: None unless a hub and a site credential are configured; started by the app's lifespan.
    publisher: Publisher | None = None
    hub: HubClient | None = None

    def checks(self) -> list[Check]:
        async def database() -> None:
            await anyio.to_thread.run_sync(ping, self.engine)

        async def tenant_keys() -> None:
            missing = [t for t in self.settings.tenants if not self.keys.has(t)]
            if missing:
                raise LookupError(f"no key for {len(missing)} tenant(s)")

        return [Check("database", database), Check("keys", tenant_keys)]

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()
        if self.hub is not None:
            self.hub.close()
        self.engine.dispose()


def build(settings: Settings) -> NodeServices:
    directory = data_dir(settings)
    engine = make_engine(settings.database(service_name(settings)))
    ensure_schema(engine, "node", auto_upgrade=settings.database_auto_upgrade)
    keys = open_keys(settings, directory)
    outgoing = client_context(settings)  # the node's trust for the hub and the IdP
    tokens = None
    if settings.issuers:
        tokens = JwtValidator(
            {i.issuer: issuer_resolver(i.issuer, i.jwks_uri, outgoing) for i in settings.issuers},
            settings.audience,
        )
    grants = None
    if settings.hub_url:
        grants = GrantVerifier(
            settings.hub_url,
            settings.node_id,
            jwks_resolver(f"{settings.hub_url}{JWKS_PATH}", outgoing),
        )
    store = open_store(settings, directory, engine, keys)
    box = Outbox(engine)
    hub = publisher = None
    if publishing_configured(settings):
        hub = HubClient(settings)
        publisher = Publisher(settings, store, box, hub)
        store.on_outbox = publisher.wake
    return NodeServices(
        settings=settings,
        engine=engine,
        keys=keys,
        store=store,
        credentials=Credentials(engine, settings, tokens),
        grants=grants,
        outbox=box,
        publisher=publisher,
        hub=hub,
    )
