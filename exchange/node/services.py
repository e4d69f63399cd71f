"""What the node's routes need, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from sqlalchemy import Engine

from exchange.config import Settings
from exchange.database import make_engine, ping
from exchange.security.keystore import FileKeyStore
from exchange.web.health import Check


@dataclass
class NodeServices:
    settings: Settings
    engine: Engine
    keys: FileKeyStore

    def checks(self) -> list[Check]:
        async def database() -> None:
            await anyio.to_thread.run_sync(ping, self.engine)

        async def tenant_keys() -> None:
            for tenant in self.settings.tenants:
                self.keys.cipher_for(tenant)

        return [Check("database", database), Check("keys", tenant_keys)]

    def close(self) -> None:
        self.engine.dispose()


def service_name(settings: Settings) -> str:
    return f"node-{settings.node_id}"


def build(settings: Settings) -> NodeServices:
    data_dir = settings.data_path(service_name(settings))
    data_dir.mkdir(parents=True, exist_ok=True)
    return NodeServices(
        settings=settings,
        engine=make_engine(settings.database(service_name(settings))),
        keys=FileKeyStore(data_dir / "keys", list(settings.tenants)),
    )
