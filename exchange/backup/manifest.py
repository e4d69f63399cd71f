"""The manifest: what one snapshot holds, and every file's size and SHA-256.

It is written last, so a snapshot without one is incomplete and is ignored. Blobs are
listed by their place in the node's store and stored by content (``blobs/<sha256>``),
which is what lets a later backup reuse them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from exchange.backup.errors import BackupError, MissingFile
from exchange.backup.targets import Target

FORMAT = "exchange-backup/1"
SNAPSHOTS = "snapshots/"
MANIFEST = "manifest.json"
_ID = re.compile(r"^\d{8}T\d{12}Z-[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def new_id(service: str, now: datetime | None = None) -> str:
    """Sortable by time: the latest snapshot of a service is the greatest id."""
    return f"{(now or datetime.now(UTC)).strftime('%Y%m%dT%H%M%S%fZ')}-{service}"


def service_of(snapshot_id: str) -> str:
    return snapshot_id.split("-", 1)[1]


def blob_key(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256}"


def snapshot_key(snapshot_id: str, name: str) -> str:
    return f"{SNAPSHOTS}{snapshot_id}/{name}"


@dataclass(frozen=True)
class FileEntry:
    #: Key relative to the backup location.
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BlobEntry:
    #: The blob's path in the node's store (``<data_dir>/blobs/<blob>``).
    blob: str
    size: int
    sha256: str

    @property
    def key(self) -> str:
        return blob_key(self.sha256)


@dataclass
class Manifest:
    id: str
    role: str
    service: str
    node_id: str | None
    created: str
    exchange_version: str
    #: dialect, revision (Alembic, if any), rows per table
    database: dict[str, Any]
    counts: dict[str, int]
    files: list[FileEntry]
    blobs: list[BlobEntry] = field(default_factory=list)
    #: The wrapped key bundle, stored apart: file name, size, sha256, key id, contents.
    keys: dict[str, Any] | None = None
    #: Blobs copied by this backup and reused from earlier ones.
    incremental: dict[str, int] = field(default_factory=dict)
    tenants: list[str] = field(default_factory=list)
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            raw["files"] = [FileEntry(**f) for f in raw["files"]]
            raw["blobs"] = [BlobEntry(**b) for b in raw["blobs"]]
            manifest = cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BackupError(f"{where} is damaged: {exc}") from None
        entries: list[FileEntry | BlobEntry] = [*manifest.files, *manifest.blobs]
        for entry in entries:
            if not _SHA256.match(entry.sha256) or entry.size < 0:
                raise BackupError(f"{where} is damaged: bad checksum or size")
        return manifest

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


def snapshot_ids(target: Target) -> list[str]:
    """Ids of the complete snapshots at ``target`` (those with a manifest), oldest first."""
    found = []
    for key in target.list(SNAPSHOTS):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST and _ID.match(parts[1]):
            found.append(parts[1])
    return sorted(found)


def load(target: Target, snapshot_id: str) -> Manifest:
    if not _ID.match(snapshot_id):
        raise BackupError(f"{snapshot_id!r} is not a snapshot id")
    key = snapshot_key(snapshot_id, MANIFEST)
    try:
        data = target.get_bytes(key)
    except MissingFile:
        raise BackupError(f"no snapshot {snapshot_id} at {target.description}") from None
    return Manifest.from_bytes(data, f"{target.description}/{key}")


def latest(target: Target, service: str | None = None) -> Manifest | None:
    """The newest complete snapshot (of ``service``), None if there is none."""
    ids = [i for i in snapshot_ids(target) if service is None or service_of(i) == service]
    return load(target, ids[-1]) if ids else None


def select(target: Target, snapshot_id: str | None, service: str | None) -> list[Manifest]:
    """The snapshot asked for, else the newest of ``service``, else the newest of each."""
    if snapshot_id is not None:
        return [load(target, snapshot_id)]
    ids = snapshot_ids(target)
    if service is not None:
        ids = [i for i in ids if service_of(i) == service]
    newest: dict[str, str] = {}
    for snapshot in ids:
        newest[service_of(snapshot)] = snapshot
    if not newest:
        what = f" of {service}" if service else ""
        raise BackupError(f"no complete backup{what} at {target.description}")
    return [load(target, i) for i in sorted(newest.values())]
