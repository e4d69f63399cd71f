"""Opening a node's keys and instance store from its settings.

Kept apart from ``services`` (which pulls in the web stack) so that
``exchange import`` starts quickly, and so that the node and the importer open
the store the one same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine

from exchange.config import Settings
from exchange.errors import ReadOnlyStorage
from exchange.node.store import InstanceStore
from exchange.security.keystore import FileKeyStore, master_key


def service_name(settings: Settings) -> str:
    return f"node-{settings.node_id}"


def data_dir(settings: Settings) -> Path:
    """The node's data directory, created if need be; refused at once if read-only, so
    the node says why instead of failing later at its database or first instance."""
    path = settings.data_path(service_name(settings))
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):  # EROFS also for root, whom permission bits let by
        raise ReadOnlyStorage(
            f"the node's data directory {path} is read-only or not writable; "
            "the node stores its database, keys and instances there"
        )
    return path


def open_keys(settings: Settings, directory: Path) -> FileKeyStore:
    secret = settings.master_key.get_secret_value() if settings.master_key else None
    master = master_key(secret, directory / "keys" / "master.key")
    return FileKeyStore(directory / "keys" / "tenants", master, list(settings.tenants))


def open_store(
    settings: Settings, directory: Path, engine: Engine, keys: FileKeyStore
) -> InstanceStore:
    replace = [t for t, c in settings.tenants.items() if c.on_conflict == "replace"]
    return InstanceStore(
        engine, directory / "blobs", keys, settings.max_upload_bytes, replace_on_conflict=replace
    )
