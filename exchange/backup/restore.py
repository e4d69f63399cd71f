"""``exchange restore``: rebuild a hub or a node from a backup.

Never a half-restored target:

1. everything is fetched into a staging directory beside the data directory and
   checked against the manifest (size, SHA-256) as it arrives; the key bundle is
   opened and the node's tenant keys are opened with the master key. Any problem
   stops here: the target was not touched.
2. the database is rebuilt: SQLite inside the data directory in the staging copy;
   SQLite elsewhere in a temp file beside it; PostgreSQL in ONE transaction (with
   ``--force``, dropping the old tables in the same transaction).
3. the staging directory is swapped in for the data directory (two renames in one
   directory), and the old one removed.

A non-empty target (data directory, or database with tables) is refused unless
``--force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exchange.backup import dump, manifest
from exchange.backup.crypto import BackupKey
from exchange.backup.errors import BackupError
from exchange.backup.layout import BLOB_DIR, Service
from exchange.backup.manifest import Manifest
from exchange.backup.progress import Progress
from exchange.backup.snapshot import SCHEMA_FILE, dump_aad
from exchange.backup.targets import CHUNK, Target
from exchange.database import make_engine
from exchange.errors import ConfigurationError

_WORK = ".restore"


@dataclass
class RestoreReport:
    manifest: Manifest
    service: Service
    rows: int = 0
    key_files: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        m = self.manifest
        where = self.service.data_dir
        lines = [
            f"restored {m.service} from snapshot {m.id} (taken {m.created}) into {where}",
            f"  database: {len(m.database['tables'])} tables, {self.rows} rows "
            f"-> {_safe_url(self.service.database_url)}",
        ]
        if m.role == "node":
            lines.append(f"  blobs: {len(m.blobs)} ({m.blob_bytes:,} bytes), checksums verified")
        lines.append(f"  keys: {self.key_files} files restored")
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def choose(target: Target, snapshot_id: str | None, service: Service) -> Manifest:
    chosen = manifest.select(target, snapshot_id, service.name)[0]
    if chosen.service != service.name:
        raise ConfigurationError(
            f"snapshot {chosen.id} is of {chosen.service}, but the configuration describes "
            f"{service.name} (check --role, --node-id, --config)"
        )
    return chosen


def refuse_non_empty(service: Service, force: bool) -> list[str]:
    """What the restore would replace; raises unless ``force``."""
    occupied = []
    if service.data_dir.is_dir() and any(service.data_dir.iterdir()):
        occupied.append(f"data directory {service.data_dir} is not empty")
    sqlite = service.sqlite_path
    if sqlite is not None and service.sqlite_in_data_dir is None and sqlite.exists():
        occupied.append(f"database {sqlite} exists")
    if sqlite is None:
        engine = make_engine(service.database_url)
        try:
            tables = dump.tables_in(engine)
        except Exception as exc:
            raise BackupError(
                f"cannot reach the database {_safe_url(service.database_url)}: {type(exc).__name__}"
            ) from None
        finally:
            engine.dispose()
        if tables:
            occupied.append(f"database {_safe_url(service.database_url)} has {len(tables)} tables")
    if occupied and not force:
        raise ConfigurationError(
            f"restore refuses to overwrite: {'; '.join(occupied)} "
            "(stop the service, then pass --force to replace it)"
        )
    return occupied


def restore(
    service: Service,
    target: Target,
    chosen: Manifest,
    bundle: bytes | None,
    key: BackupKey,
    force: bool,
    progress: Progress,
    master_secret: str | None = None,
) -> RestoreReport:
    """``master_secret``: the node's EXCHANGE_MASTER_KEY, when it comes from there."""
    report = RestoreReport(chosen, service)
    replaced = refuse_non_empty(service, force)
    if chosen.keys is not None and bundle is None:
        raise ConfigurationError(
            f"snapshot {chosen.id} exported its keys apart: pass --keys-from with the location "
            f"of {chosen.keys['file']}"
        )
    if chosen.keys is not None and bundle is not None:
        digest = hashlib.sha256(bundle).hexdigest()
        if digest != chosen.keys["sha256"]:
            raise BackupError(
                f"the key bundle is not the one of snapshot {chosen.id} ({chosen.keys['file']}:"
                " SHA-256 differs from the manifest)"
            )
    files = key.unwrap_bundle(bundle)[1] if bundle is not None else {}
    if bundle is None:
        report.notes.append("the backup holds no keys: the node's data needs its original keys")

    parent = service.data_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{service.data_dir.name}.restore-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        _fetch_all(target, chosen, staging, progress)
        _write_keys(staging, files)
        report.key_files = len(files)
        if service.role == "node":
            _check_node_keys(service, staging, chosen, master_secret)
        report.rows = _restore_database(service, staging, chosen, key, bool(replaced), progress)
        shutil.rmtree(staging / _WORK)
        os.sync()
        _swap(staging, service.data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if service.master_key_in_environment or (chosen.keys or {}).get("master_key") == "environment":
        report.notes.append("the node's master key comes from EXCHANGE_MASTER_KEY")
    return report


def _fetch(target: Target, key: str, destination: Path, size: int, sha256: str) -> None:
    """Copy one file of the backup to ``destination``, checking it on the way."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    seen = 0
    with target.open(key) as source, destination.open("xb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            seen += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(destination, 0o600)
    if seen != size or digest.hexdigest() != sha256:
        raise BackupError(
            f"{key} in {target.description} is corrupted (it does not match the manifest); "
            "nothing was restored"
        )


def _fetch_all(target: Target, chosen: Manifest, staging: Path, progress: Progress) -> None:
    work = staging / _WORK
    with progress.task("fetching", len(chosen.files) + len(chosen.blobs)) as advance:
        for entry in chosen.files:
            name = entry.path.rsplit("/", 1)[-1]
            _fetch(target, entry.path, work / name, entry.size, entry.sha256)
            advance(1)
        blobs = staging / BLOB_DIR
        for blob in chosen.blobs:
            relative = Path(blob.blob)
            if relative.is_absolute() or ".." in relative.parts:
                raise BackupError(f"the manifest names an unsafe blob path {blob.blob!r}")
            _fetch(target, blob.key, blobs / relative, blob.size, blob.sha256)
            advance(1)


def _write_keys(staging: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise BackupError(f"the key bundle names an unsafe path {name!r}")
        path = staging / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())


def _check_node_keys(
    service: Service, staging: Path, chosen: Manifest, master_secret: str | None
) -> None:
    """The tenant keys open with the master key the node will use (before any swap)."""
    from exchange.security.keystore import FileKeyStore, master_key

    tenants_dir = staging / "keys" / "tenants"
    tenants = sorted(p.stem for p in tenants_dir.glob("*.key")) if tenants_dir.is_dir() else []
    master_file = staging / "keys" / "master.key"
    if not tenants:
        return
    if not service.master_key_in_environment and not master_file.is_file():
        raise ConfigurationError(
            "the node's tenant keys need its master key: it is not in the backup "
            f"(snapshot {chosen.id} was taken with EXCHANGE_MASTER_KEY); set the same "
            "EXCHANGE_MASTER_KEY"
        )
    try:
        FileKeyStore(tenants_dir, master_key(master_secret, master_file), tenants)
    except ConfigurationError as exc:
        raise ConfigurationError(f"restored keys do not open: {exc.message}") from None


def _restore_database(
    service: Service,
    staging: Path,
    chosen: Manifest,
    key: BackupKey,
    replace: bool,
    progress: Progress,
) -> int:
    work = staging / _WORK
    schema = json.loads(b"".join(_decrypt(key, work / SCHEMA_FILE, chosen.id, SCHEMA_FILE)))
    if schema.get("format") != dump.FORMAT:
        raise BackupError(f"the dump of snapshot {chosen.id} is of an unknown format")

    def read_table(file: str) -> Iterator[bytes]:
        return _decrypt(key, work / file, chosen.id, file)

    sqlite = service.sqlite_path
    inside = service.sqlite_in_data_dir
    total = sum(int(t["rows"]) for t in schema["tables"])
    if sqlite is not None:
        database = staging / inside if inside is not None else _beside(sqlite)
        database.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{database}"
    else:
        url = service.database_url
    engine = make_engine(url)
    try:
        with progress.task("database", total) as advance:
            rows = dump.restore(
                engine,
                schema["tables"],
                read_table,
                replace=replace and sqlite is None,
                on_rows=advance,
            )
    except BaseException:
        if sqlite is not None and inside is None:
            _remove_sqlite(database)
        raise
    finally:
        engine.dispose()
    if sqlite is not None and inside is None:
        _remove_sqlite(sqlite, keep_main=True)
        os.replace(database, sqlite)
    return rows


def _decrypt(key: BackupKey, path: Path, snapshot_id: str, name: str) -> Iterator[bytes]:
    with path.open("rb") as raw:
        yield from key.decrypt(raw, dump_aad(snapshot_id, name))


def _beside(path: Path) -> Path:
    return path.parent / f".{path.name}.restore-{secrets.token_hex(4)}"


def _remove_sqlite(path: Path, *, keep_main: bool = False) -> None:
    for suffix in ("-wal", "-shm", "-journal", *(() if keep_main else ("",))):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


def _swap(staging: Path, data_dir: Path) -> None:
    if not data_dir.exists():
        os.replace(staging, data_dir)
        return
    old = data_dir.parent / f".{data_dir.name}.replaced-{secrets.token_hex(4)}"
    os.replace(data_dir, old)
    try:
        os.replace(staging, data_dir)
    except BaseException:
        os.replace(old, data_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_bundle(keys_target: Target | None, location: str | None, chosen: Manifest) -> bytes | None:
    """The key bundle of ``chosen``: ``location`` is the bundle file or where it lies."""
    if chosen.keys is None or location is None:
        return None
    path = Path(location).expanduser()
    if not location.startswith("s3://") and path.is_file():
        return path.read_bytes()
    if keys_target is None:
        return None
    return keys_target.get_bytes(str(chosen.keys["file"]))
