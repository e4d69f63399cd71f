"""Where a hub's or a node's state lives, as backup and restore see it.

The same places the services use (``hub.services``, ``node.storage``), named here so
that backing up does not load either web stack; a unit test keeps them in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exchange.config import Settings
from exchange.errors import ConfigurationError

Role = Literal["hub", "node"]
ROLES: tuple[Role, ...] = ("hub", "node")
HUB_SERVICE = "hub"
#: Directories of the data directory holding key material: exported wrapped, apart.
KEY_DIRS: dict[Role, tuple[str, ...]] = {
    # grant-signing.pem, access-code.key; the development IdP's key and clients
    "hub": ("keys", "idp"),
    # master.key (unless EXCHANGE_MASTER_KEY), tenants/<tenant>.key and .shredded marks
    "node": ("keys",),
}
#: A node's encrypted instance blobs, relative to its data directory.
BLOB_DIR = "blobs"


def node_service(node_id: str) -> str:
    return f"node-{node_id}"


@dataclass(frozen=True)
class Service:
    role: Role
    #: "hub" or "node-<id>": names the data directory and the snapshots
    name: str
    node_id: str | None
    data_dir: Path
    database_url: str
    tenants: tuple[str, ...]
    #: The node's master key comes from EXCHANGE_MASTER_KEY, not a file.
    master_key_in_environment: bool

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, None for PostgreSQL."""
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///")).resolve()
        return None

    @property
    def sqlite_in_data_dir(self) -> Path | None:
        """The SQLite file's path inside the data directory, if it lives there."""
        path = self.sqlite_path
        if path is not None and path.is_relative_to(self.data_dir):
            return path.relative_to(self.data_dir)
        return None


def service_for(settings: Settings, role: str | None) -> Service:
    """The hub or node the settings describe (a node when tenants are configured)."""
    chosen = role or ("node" if settings.tenants else "hub")
    if chosen not in ROLES:
        raise ConfigurationError(f"unknown role {chosen!r} (hub or node)")
    if chosen == "hub":
        name, node_id = HUB_SERVICE, None
    else:
        name, node_id = node_service(settings.node_id), settings.node_id
    url = settings.database(name)
    if not url.startswith(("sqlite:///", "postgresql")):
        raise ConfigurationError(f"EXCHANGE_DATABASE_URL: unsupported database {url.split(':')[0]}")
    return Service(
        role="hub" if chosen == "hub" else "node",
        name=name,
        node_id=node_id,
        data_dir=settings.data_path(name),
        database_url=url,
        tenants=tuple(sorted(settings.tenants)) if chosen == "node" else (),
        master_key_in_environment=chosen == "node" and settings.master_key is not None,
    )
