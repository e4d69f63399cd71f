"""``exchange backup``: a consistent online snapshot of a running hub or node.

Order matters for consistency and for never leaving a half-written backup:

1. the database is dumped in one read transaction (``dump.snapshot``), encrypted with
   the backup key into a scratch directory; the node's blob list comes from the same
   snapshot, so the backup holds exactly the blobs its rows name;
2. blobs go to ``blobs/<sha256>``: one already there (this or an earlier backup) is
   reused, not copied; a blob's checksum is taken from the previous manifest when the
   same blob (blobs are written once, under a random name, never changed) is listed
   there, so unchanged blobs are not even read;
3. the dump files, then the key bundle (elsewhere), then the manifest, last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from exchange import __version__
from exchange.backup import dump, manifest
from exchange.backup.crypto import BackupKey, sha256_file
from exchange.backup.errors import BackupError
from exchange.backup.layout import BLOB_DIR, KEY_DIRS, Service
from exchange.backup.manifest import BlobEntry, FileEntry, Manifest
from exchange.backup.progress import Progress
from exchange.backup.targets import DirectoryTarget, Target
from exchange.database import make_engine

SCHEMA_FILE = "schema.json.enc"


def dump_aad(snapshot_id: str, name: str) -> bytes:
    """Binds a dump file to its snapshot and name: swapped files fail to decrypt."""
    return f"exchange-backup:v1:{snapshot_id}:db/{name}".encode()


class _Hashing:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._raw.write(data)


@dataclass
class BackupReport:
    manifest: Manifest
    destination: str
    keys_location: str | None
    copied_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        m = self.manifest
        lines = [
            f"backed up {m.service} to {self.destination} as snapshot {m.id}",
            f"  database ({m.database['dialect']}): {len(m.database['tables'])} tables, "
            f"{sum(m.database['tables'].values())} rows"
            + (f", schema revision {m.database['revision']}" if m.database.get("revision") else ""),
        ]
        if m.role == "node":
            lines.append(
                f"  blobs: {len(m.blobs)} ({m.blob_bytes:,} bytes): "
                f"{m.incremental.get('copied', 0)} copied ({self.copied_bytes:,} bytes), "
                f"{m.incremental.get('reused', 0)} reused"
            )
        if m.keys is not None:
            lines.append(
                f"  keys: {len(m.keys['contents'])} files wrapped with backup key "
                f"{m.keys['key_id']} to {self.keys_location}"
            )
        else:
            lines.append("  keys: not exported (--no-keys)")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  took {self.seconds:.1f} s")
        return lines


def key_files(service: Service) -> dict[str, bytes]:
    """The key material of the data directory, by path relative to it."""
    files: dict[str, bytes] = {}
    for name in KEY_DIRS[service.role]:
        root = service.data_dir / name
        if not root.is_dir():
            continue
        for directory, _dirs, names in os.walk(root):
            for file in names:
                if file.startswith("."):  # a write in progress (write_atomic's temp files)
                    continue
                path = Path(directory) / file
                files[path.relative_to(service.data_dir).as_posix()] = path.read_bytes()
    return files


def backup(
    service: Service,
    target: Target,
    keys_target: Target | None,
    key: BackupKey,
    progress: Progress,
) -> BackupReport:
    started = datetime.now(UTC)
    database = service.sqlite_path
    if database is not None and not database.is_file():
        raise BackupError(
            f"no {service.role} database at {database}: is this the right --role, --config "
            "or --data-dir?"
        )
    snapshot_id = manifest.new_id(service.name, started)
    previous = manifest.latest(target, service.name)
    scratch = target.scratch()
    try:
        report = _backup(
            service, target, keys_target, key, progress, snapshot_id, previous, scratch, started
        )
    except BaseException:
        if isinstance(target, DirectoryTarget):  # an incomplete snapshot: nothing to keep
            shutil.rmtree(target.root / manifest.SNAPSHOTS / snapshot_id, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = (datetime.now(UTC) - started).total_seconds()
    return report


def _backup(
    service: Service,
    target: Target,
    keys_target: Target | None,
    key: BackupKey,
    progress: Progress,
    snapshot_id: str,
    previous: Manifest | None,
    scratch: Path,
    started: datetime,
) -> BackupReport:
    written: list[tuple[str, Path, str, int]] = []

    def write_table(name: str, chunks: Iterable[bytes]) -> None:
        path = scratch / name
        with path.open("wb") as raw:
            out = _Hashing(raw)
            key.encrypt(chunks, out, dump_aad(snapshot_id, name))  # type: ignore[arg-type]
            raw.flush()
            os.fsync(raw.fileno())
        written.append((name, path, out.digest.hexdigest(), out.size))

    engine = make_engine(service.database_url)
    try:
        with progress.task("database", None) as advance, dump.snapshot(engine) as conn:
            result = dump.dump(conn, write_table, advance)
    finally:
        engine.dispose()
    schema = {
        "format": dump.FORMAT,
        "dialect": result.dialect,
        "revision": result.revision,
        "tables": [{**t.schema, "file": t.file, "rows": t.rows} for t in result.tables],
    }
    write_table(SCHEMA_FILE, [json.dumps(schema, sort_keys=True).encode()])

    blobs, copied, copied_bytes = _copy_blobs(service, target, previous, result.blobs, progress)
    files = []
    for name, path, sha, size in written:
        file_key = manifest.snapshot_key(snapshot_id, f"db/{name}")
        target.put_file(file_key, path)
        files.append(FileEntry(file_key, size, sha))

    keys_entry = None
    if keys_target is not None:
        keys_entry = _export_keys(service, keys_target, key, snapshot_id, started)
    record = Manifest(
        id=snapshot_id,
        role=service.role,
        service=service.name,
        node_id=service.node_id,
        created=started.isoformat(),
        exchange_version=__version__,
        database={
            "dialect": result.dialect,
            "revision": result.revision,
            "tables": {t.name: t.rows for t in result.tables},
        },
        counts={**result.counts, "blobs": len(blobs)} if service.role == "node" else result.counts,
        files=files,
        blobs=blobs,
        keys=keys_entry,
        incremental={"copied": copied, "reused": len(blobs) - copied},
        tenants=list(service.tenants),
    )
    target.put_bytes(manifest.snapshot_key(snapshot_id, manifest.MANIFEST), record.to_bytes())
    report = BackupReport(
        record, target.description, keys_target.description if keys_target else None
    )
    report.copied_bytes = copied_bytes
    if service.master_key_in_environment:
        report.notes.append(
            "the master key comes from EXCHANGE_MASTER_KEY and is not in the bundle: "
            "keep it safe, a restore needs the same one"
        )
    return report


def _copy_blobs(
    service: Service,
    target: Target,
    previous: Manifest | None,
    referenced: list[str],
    progress: Progress,
) -> tuple[list[BlobEntry], int, int]:
    """Each referenced blob stored by content; (entries, how many copied, bytes copied)."""
    if not referenced:
        return [], 0, 0
    known = {b.blob: b for b in previous.blobs} if previous else {}
    present = target.list("blobs/")
    entries: list[BlobEntry] = []
    copied = copied_bytes = 0
    root = service.data_dir / BLOB_DIR
    with progress.task("blobs", len(referenced)) as advance:
        for blob in referenced:
            path = root / blob
            try:
                size = path.stat().st_size
                earlier = known.get(blob)
                if earlier is not None and earlier.size == size:
                    sha = earlier.sha256
                else:
                    sha, size = sha256_file(path)
                entry = BlobEntry(blob, size, sha)
                if present.get(entry.key) != size:
                    target.put_file(entry.key, path)
                    present[entry.key] = size
                    copied += 1
                    copied_bytes += size
            except FileNotFoundError:
                raise BackupError(
                    f"blob {blob} was removed while the backup ran (its study was deleted or "
                    "replaced meanwhile); nothing was recorded: run the backup again"
                ) from None
            entries.append(entry)
            advance(1)
    return entries, copied, copied_bytes


def _export_keys(
    service: Service, keys_target: Target, key: BackupKey, snapshot_id: str, started: datetime
) -> dict[str, Any]:
    files = key_files(service)
    node_master = service.role == "node" and not service.master_key_in_environment
    if node_master and "keys/master.key" not in files:
        raise BackupError(
            f"the node's master key is missing ({service.data_dir}/keys/master.key) and "
            "EXCHANGE_MASTER_KEY is not set: its data could not be restored"
        )
    bundle = key.wrap_bundle(
        {"snapshot": snapshot_id, "service": service.name, "created": started.isoformat()},
        files,
    )
    name = f"{snapshot_id}.keys"
    keys_target.put_bytes(name, bundle)
    master = "environment" if service.master_key_in_environment else "file"
    return {
        "file": name,
        "size": len(bundle),
        "sha256": hashlib.sha256(bundle).hexdigest(),
        "key_id": key.key_id,
        "contents": sorted(files),
        "master_key": master if service.role == "node" else None,
    }
