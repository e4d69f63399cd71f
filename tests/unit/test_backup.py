"""Backup pieces in-process: the dump's consistency and fidelity, keys, manifests, verify."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
)

from exchange.backup import dump, manifest
from exchange.backup.crypto import BackupKey, WrongBackupKey, create_key_file, sha256_file
from exchange.backup.errors import BackupError
from exchange.backup.layout import HUB_SERVICE, node_service, service_for
from exchange.backup.manifest import BlobEntry, FileEntry, Manifest
from exchange.backup.progress import Progress
from exchange.backup.targets import DirectoryTarget, open_target
from exchange.backup.verify import verify
from exchange.config import load_settings
from exchange.database import make_engine
from exchange.errors import ConfigurationError


def _sample_table(metadata: MetaData) -> Table:
    return Table(
        "sample",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), nullable=False, index=True, unique=True),
        Column("body", Text),
        Column("raw", LargeBinary),
        Column("flag", Boolean),
        Column("at", DateTime),
        Column("ratio", Float),
        Column("big", BigInteger),
        Column("doc", JSON),
    )


def _dump_to_memory(url: str) -> tuple[dump.DumpResult, dict[str, bytes]]:
    files: dict[str, bytes] = {}
    engine = make_engine(url)
    try:
        with dump.snapshot(engine) as conn:
            result = dump.dump(conn, lambda name, chunks: files.update({name: b"".join(chunks)}))
    finally:
        engine.dispose()
    return result, files


def test_dump_restores_every_type_and_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    engine = make_engine(url)
    table = _sample_table(MetaData())
    table.metadata.create_all(engine)
    when = dt.datetime(2026, 11, 1, 9, 30, 15, 123456)
    rows = [
        {"id": 1, "name": "é 中", "body": "x\ny", "raw": b"\x00\xff", "flag": True, "at": when,
         "ratio": 0.1, "big": 2**40, "doc": {"a": [1, None]}},
        {"id": 7, "name": "n", "body": None, "raw": None, "flag": False, "at": None,
         "ratio": None, "big": None, "doc": None},
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    engine.dispose()

    result, files = _dump_to_memory(url)
    assert [t.name for t in result.tables] == ["sample"]
    assert result.tables[0].rows == 2

    target = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    schemas = [{**t.schema, "file": t.file} for t in result.tables]
    assert dump.restore(target, schemas, lambda f: iter([files[f]]), replace=False) == 2
    with target.connect() as conn:
        restored = [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
    assert restored == rows
    with pytest.raises(BackupError, match="nothing was changed"):  # unique name violated
        dump.restore(target, schemas, lambda f: iter([files[f]]), replace=False)
    target.dispose()


def test_snapshot_does_not_see_later_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    engine = make_engine(url)
    table = _sample_table(MetaData())
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "name": "before"}])
    writer = make_engine(url)
    with dump.snapshot(engine) as conn:
        with writer.begin() as other:  # a writer carries on meanwhile (WAL)
            other.execute(insert(table), [{"id": 2, "name": "during"}])
        seen = conn.execute(select(table.c.name)).scalars().all()
    assert seen == ["before"]
    writer.dispose()
    engine.dispose()


def test_unknown_column_types_fail_closed() -> None:
    from sqlalchemy.types import NullType

    with pytest.raises(BackupError, match="cannot be dumped"):
        dump._kind(NullType())


def test_key_bundle_opens_only_with_its_key() -> None:
    key = BackupKey(b"k" * 32)
    bundle = key.wrap_bundle({"snapshot": "s"}, {"keys/master.key": b"secret-bytes"})
    assert b"secret-bytes" not in bundle
    assert base64.b64encode(b"secret-bytes") not in bundle
    header, files = key.unwrap_bundle(bundle)
    assert files == {"keys/master.key": b"secret-bytes"}
    assert header["snapshot"] == "s"
    with pytest.raises(WrongBackupKey):
        BackupKey(b"o" * 32).unwrap_bundle(bundle)
    tampered = json.loads(bundle)
    tampered["header"]["snapshot"] = "other"
    with pytest.raises(BackupError, match="fails authentication"):
        key.unwrap_bundle(json.dumps(tampered).encode())


def test_dump_files_are_bound_to_their_name() -> None:
    key = BackupKey(b"k" * 32)
    out = io.BytesIO()
    key.encrypt([b"row\n"], out, b"snap:db/a")
    assert b"".join(key.decrypt(io.BytesIO(out.getvalue()), b"snap:db/a")) == b"row\n"
    with pytest.raises(WrongBackupKey):
        b"".join(key.decrypt(io.BytesIO(out.getvalue()), b"snap:db/b"))


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "backup.key"
    create_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigurationError, match="never overwritten"):
        create_key_file(path)


def test_layout_matches_the_services(tmp_path: Path) -> None:
    from exchange.hub.services import SERVICE
    from exchange.node.storage import service_name

    settings = load_settings(data_dir=tmp_path, node_id="n1", tenants={"t": {"organization": "o"}})
    assert node_service("n1") == service_name(settings)
    assert HUB_SERVICE == SERVICE
    assert service_for(settings, None).role == "node"
    assert service_for(settings, "hub").name == "hub"
    with pytest.raises(ConfigurationError):
        service_for(settings, "proxy")


def _manifest(snapshot_id: str, files: list[FileEntry], blobs: list[BlobEntry]) -> Manifest:
    return Manifest(
        id=snapshot_id, role="node", service="node-n1", node_id="n1", created="now",
        exchange_version="0", database={"dialect": "sqlite", "tables": {}}, counts={},
        files=files, blobs=blobs,
    )  # fmt: skip


def test_verify_names_each_damaged_file(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    snapshot_id = manifest.new_id("node-n1")
    entries = []
    for name, data in [("a", b"alpha"), ("b", b"beta"), ("c", b"gamma")]:
        key = manifest.snapshot_key(snapshot_id, f"db/{name}")
        target.put_bytes(key, data)
        sha, size = sha256_file(tmp_path / key)
        entries.append(FileEntry(key, size, sha))
    target.put_bytes(
        manifest.snapshot_key(snapshot_id, manifest.MANIFEST),
        _manifest(snapshot_id, entries, []).to_bytes(),
    )
    (tmp_path / entries[1].path).write_bytes(b"BETA")
    (tmp_path / entries[2].path).unlink()
    chosen = manifest.select(target, None, None)
    report = verify(target, chosen, None, None, Progress(False))
    assert report.problems == [
        f"{entries[1].path}: corrupted (SHA-256 differs from the manifest)",
        f"{entries[2].path}: missing",
    ]


def test_incomplete_snapshots_are_ignored(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    target.put_bytes(manifest.snapshot_key(manifest.new_id("hub"), "db/x"), b"partial")
    assert manifest.latest(target, "hub") is None
    with pytest.raises(BackupError, match="no complete backup"):
        manifest.select(target, None, None)


def test_paths_cannot_escape_the_location(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    with pytest.raises(BackupError, match="invalid path"):
        target.put_bytes("../outside", b"x")
    with pytest.raises(BackupError, match="does not exist"):
        open_target(str(tmp_path / "nowhere"), load_settings())
