"""What the node's routes need, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio
from sqlalchemy import Engine

from exchange.config import Settings
from exchange.database import make_engine, ping
from exchange.security.keystore import FileKeyStore, master_key
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


def build(settings: Settings) -> NodeServices:
    data_dir = settings.data_path(service_name(settings))
    data_dir.mkdir(parents=True, exist_ok=True)
    return NodeServices(
        settings=settings,
        engine=make_engine(settings.database(service_name(settings))),
        keys=open_keys(settings, data_dir),
    )
