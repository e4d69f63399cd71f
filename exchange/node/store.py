"""The encrypted, multi-tenant instance store.

Each instance is validated, its preamble zeroed, then streamed through
envelope encryption into a new file that is fsynced and renamed into place;
only then is its index row committed. A crash leaves at worst an
unreferenced blob, never a half-written instance or a row without its data.
Every query takes the tenant, so one tenant's rows are unreachable from
another's, and nothing identifying is stored in clear (see ``catalog``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, Table
from sqlalchemy import delete as sa_delete
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from exchange.dicom.part10 import (
    PREAMBLE_LENGTH,
    REASON_DUPLICATE,
    REASON_TOO_LARGE,
    ZERO_PREAMBLE,
    InstanceHeader,
    InvalidInstance,
    read_header,
)
from exchange.node import outbox
from exchange.node.catalog import InstanceRow, TenantSeal, dicom_json
from exchange.security import envelope
from exchange.security.keystore import KeyStore

CHUNK = 1024 * 1024
#: Above this, a decrypted instance spooled for pixel decoding spills to an anonymous temp file.
SPOOL_IN_MEMORY = 64 * 1024 * 1024
#: Blob fdatasyncs run in this many threads, overlapping with the next instance's work.
FSYNC_THREADS = 4
_POOL_LOCK = threading.Lock()
_TABLE: Table = InstanceRow.__table__  # type: ignore[attr-defined]


class Outcome(StrEnum):
    STORED = "stored"
    ALREADY_PRESENT = "already present"
    REPLACED = "replaced"


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    tenant: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    preamble_sanitised: bool


@dataclass(frozen=True)
class InstanceView:
    """An index row with its attributes unsealed (DICOM JSON)."""

    row: InstanceRow
    attributes: dict[str, Any]

    def value(self, keyword_tag: str) -> Any:
        element = self.attributes.get(keyword_tag, {})
        values = element.get("Value") or [None]
        return values[0]

    @property
    def study_uid(self) -> str:
        return str(self.value("0020000D"))

    @property
    def series_uid(self) -> str:
        return str(self.value("0020000E"))

    @property
    def sop_uid(self) -> str:
        return str(self.value("00080018"))


def associated_data(tenant: str, sop_uid: str) -> bytes:
    """Binds a blob to its tenant and instance: moving it elsewhere breaks decryption."""
    return f"exchange:v1:{tenant}:{sop_uid}".encode()


class InstanceStore:
    def __init__(
        self,
        engine: Engine,
        blob_dir: Path,
        keys: KeyStore,
        max_instance_bytes: int,
        replace_on_conflict: Collection[str] = (),
    ) -> None:
        self._engine = engine
        self._replace = frozenset(replace_on_conflict)
        self._blob_dir = blob_dir
        self._keys = keys
        self._max = max_instance_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._known_dirs: set[Path] = set()
        #: Called after a commit that put work in the outbox (wakes the publishing worker).
        self.on_outbox: Callable[[], None] | None = None
        blob_dir.mkdir(parents=True, exist_ok=True)
        SQLModel.metadata.create_all(engine, tables=[_TABLE, outbox.TABLE])

    def discard_incomplete(self, older_than_seconds: float = 3600) -> int:
        """Remove blobs a crash left half-written (never referenced by the index).

        Only old ones: an ``exchange import`` running beside the node writes here too.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for partial in self._blob_dir.rglob(".incoming-*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
                    removed += 1
        return removed

    def seal(self, tenant: str) -> TenantSeal:
        return TenantSeal.of(self._keys, tenant)

    def _outbox_changed(self) -> None:
        if self.on_outbox is not None:
            self.on_outbox()

    # -- deletion ------------------------------------------------------------
    def delete_study(self, tenant: str, study_uid: str) -> int:
        """Remove a study's instances and have the hub forget it; how many were removed.

        The rows go in one transaction with the outbox's ``retract`` row, so the
        study disappears from the index and from the hub's view together; the
        encrypted blobs are unlinked after the commit (a crash in between leaves
        unreferenced ciphertext, never a row without its data).
        """
        seal = self.seal(tenant)
        key = seal.blind("study", study_uid)
        table = _TABLE
        with self._engine.begin() as connection:
            _durable_commits(connection)
            blobs = list(
                connection.execute(
                    sa_delete(table)
                    .where(table.c.tenant == tenant, table.c.study_key == key)
                    .returning(table.c.blob)
                ).scalars()
            )
            if blobs:
                sealed = outbox.seal_uid(seal, key, study_uid)
                outbox.stage(connection, tenant, {key: sealed}, outbox.RETRACT, delay=0.0)
        for blob in blobs:
            (self._blob_dir / blob).unlink(missing_ok=True)
        if blobs:
            self._outbox_changed()
        return len(blobs)

    # -- intake ------------------------------------------------------------
    def store(
        self, tenant: str, source: BinaryIO, header: InstanceHeader | None = None
    ) -> StoreResult:
        """Validate and store one Part 10 instance read from a seekable ``source``.

        ``header`` is ``read_header(source)`` when the caller has already read it.
        """
        with self.batch(tenant) as batch:
            batch.add(source, header)
            (result,) = batch.commit()
        if isinstance(result, BaseException):
            raise result
        return result

    def batch(self, tenant: str) -> StoreBatch:
        """Store several instances with one directory fsync and one index transaction."""
        return StoreBatch(self, tenant)

    def _fsync_pool(self) -> ThreadPoolExecutor:
        with _POOL_LOCK:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="blob-fsync")
            return self._pool

    def _blob_directory(self, tenant: str, touched: set[Path]) -> tuple[Path, Path]:
        """This hour's directory of ``tenant`` (relative, absolute), created durably if new.

        One directory per tenant and hour, so one directory fsync covers a whole batch.
        """
        relative = Path(tenant) / datetime.now(UTC).strftime("%Y%m%d%H")
        directory = self._blob_dir / relative
        if directory not in self._known_dirs:
            for level in (directory.parent, directory):
                if not level.is_dir():
                    level.mkdir(exist_ok=True)
                    touched.add(level.parent)  # the new entry must be durable too
            self._known_dirs.add(directory)
        return relative, directory

    def _lookup(self, tenant: str, sop_key: str) -> _Existing | None:
        table = _TABLE
        with self._engine.connect() as connection:
            found = connection.execute(
                sa_select(table.c.id, table.c.sha256, table.c.blob).where(
                    table.c.tenant == tenant, table.c.sop_key == sop_key
                )
            ).first()
        return None if found is None else _Existing(found[0], found[1], found[2])

    @staticmethod
    def _existing(digest: str, existing_digest: str) -> Outcome:
        if existing_digest == digest:
            return Outcome.ALREADY_PRESENT
        raise InvalidInstance(
            "a different instance with this SOP Instance UID is already "
            "stored; it was kept unchanged",
            REASON_DUPLICATE,
        )

    @staticmethod
    def _result(outcome: Outcome, tenant: str, header: InstanceHeader) -> StoreResult:
        return StoreResult(
            outcome,
            tenant,
            header.study_uid,
            header.series_uid,
            header.sop_uid,
            header.sop_class_uid,
            not header.preamble_was_clean,
        )

    @staticmethod
    def _sanitised_chunks(source: BinaryIO) -> Iterator[bytes]:
        source.seek(0)
        source.read(PREAMBLE_LENGTH)
        yield ZERO_PREAMBLE
        while chunk := source.read(CHUNK):
            yield chunk

    def _digest(self, source: BinaryIO) -> str:
        digest = hashlib.sha256()
        for chunk in self._sanitised_chunks(source):
            digest.update(chunk)
        return digest.hexdigest()

    def _encrypt_to_temp(
        self, directory: Path, source: BinaryIO, tenant: str, aad: bytes
    ) -> tuple[Path, str, Future[None]]:
        """Encrypt into a new temp file, hashing the plaintext on the way.

        Returns the temp file, the SHA-256 and the pending fdatasync of the file
        (done in a small pool, so the disk works while the next instance is prepared).
        """
        fd, name = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=".tmp")
        tmp = Path(name)
        digest = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for chunk in self._sanitised_chunks(source):
                digest.update(chunk)
                yield chunk

        try:
            raw = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        try:
            envelope.encrypt(hashed(), raw, self._keys, tenant, aad)
            raw.flush()
        except BaseException:
            raw.close()
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), self._fsync_pool().submit(_sync_and_close, raw)

    # -- reading -------------------------------------------------------------
    def _row(self, tenant: str, sop_key: str) -> InstanceRow | None:
        with Session(self._engine) as session:
            return session.exec(
                select(InstanceRow).where(
                    InstanceRow.tenant == tenant, InstanceRow.sop_key == sop_key
                )
            ).first()

    def rows(
        self,
        tenant: str,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[InstanceRow]:
        """Index rows of ``tenant``, narrowed by exact UIDs, in series/instance order."""
        seal = self.seal(tenant)
        statement = select(InstanceRow).where(InstanceRow.tenant == tenant)
        if study_uid is not None:
            statement = statement.where(InstanceRow.study_key == seal.blind("study", study_uid))
        if series_uid is not None:
            statement = statement.where(InstanceRow.series_key == seal.blind("series", series_uid))
        if sop_uid is not None:
            statement = statement.where(InstanceRow.sop_key == seal.blind("sop", sop_uid))
        statement = statement.order_by(
            col(InstanceRow.series_number), col(InstanceRow.instance_number), col(InstanceRow.id)
        )
        with Session(self._engine) as session:
            return list(session.exec(statement))

    def view(self, row: InstanceRow) -> InstanceView:
        return InstanceView(row, self.seal(row.tenant).unseal(row.attributes, row.sop_key))

    def instances(
        self,
        tenant: str,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[InstanceView]:
        return [
            self.view(row)
            for row in self.rows(
                tenant, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
            )
        ]

    def tenants_holding(self, study_uid: str, tenants: list[str]) -> list[str]:
        """Which of ``tenants`` hold ``study_uid`` (a UID may, rarely, exist in two)."""
        holding = []
        with Session(self._engine) as session:
            for tenant in tenants:
                key = self.seal(tenant).blind("study", study_uid)
                if session.exec(
                    select(InstanceRow.id).where(
                        InstanceRow.tenant == tenant, InstanceRow.study_key == key
                    )
                ).first():
                    holding.append(tenant)
        return holding

    @contextmanager
    def open(self, tenant: str, sop_uid: str) -> Iterator[BinaryIO]:
        """A decrypting, forward-only stream over the stored (sanitised) Part 10 bytes."""
        row = self._row(tenant, self.seal(tenant).blind("sop", sop_uid))
        if row is None:
            raise KeyError(sop_uid)
        with (self._blob_dir / row.blob).open("rb") as raw:
            chunks = envelope.decrypt_chunks(
                raw, self._keys, tenant, associated_data(tenant, sop_uid)
            )
            yield io.BufferedReader(envelope.DecryptingReader(chunks), CHUNK)

    def copy_out(self, tenant: str, sop_uid: str, destination: BinaryIO) -> None:
        with self.open(tenant, sop_uid) as plain:
            shutil.copyfileobj(plain, destination, CHUNK)

    def header(self, tenant: str, sop_uid: str) -> Dataset:
        """The stored data set without its pixel data, keeping only the header in memory.

        pydicom needs a seekable file, the decrypted stream is forward-only: what
        pydicom reads is kept so it can seek back, and the rest is then read and
        dropped so that the blob's authentication tag is still checked.
        """
        with self.open(tenant, sop_uid) as plain:
            reader = _Rewindable(plain)
            dataset = pydicom.dcmread(reader, stop_before_pixels=True)
            reader.drain()
        return dataset

    @contextmanager
    def spooled(self, tenant: str, sop_uid: str) -> Iterator[BinaryIO]:
        """The whole decrypted instance as a seekable file, authenticated before use.

        For pixel decoding, which seeks around the pixel data. Memory is bounded
        by ``SPOOL_IN_MEMORY``; beyond it the data spills to an unlinked temporary
        file in the data directory (beside STOW-RS's), not /tmp, which may be RAM.
        """
        spill = self._blob_dir.parent / "incoming"
        spill.mkdir(parents=True, exist_ok=True)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=str(spill)) as spool:
            self.copy_out(tenant, sop_uid, spool)  # type: ignore[arg-type]
            spool.seek(0)
            yield spool  # type: ignore[misc]


class _Rewindable(io.RawIOBase):
    """A seekable view of a forward-only stream that keeps what has been read."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._seen = io.BytesIO()
        self._size = 0
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def _fill(self, end: int) -> None:
        while self._size < end:
            chunk = self._source.read(max(end - self._size, 64 * 1024))
            if not chunk:
                return
            self._seen.seek(self._size)
            self._seen.write(chunk)
            self._size += len(chunk)

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        self._fill(self._position + len(target))
        self._seen.seek(self._position)
        count = self._seen.readinto(target)
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._fill(sys.maxsize)
            offset += self._size
        elif whence == io.SEEK_CUR:
            offset += self._position
        self._position = max(0, offset)
        return self._position

    def drain(self) -> None:
        while self._source.read(CHUNK):
            pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_and_close(raw: BinaryIO) -> None:
    try:
        os.fdatasync(raw.fileno())
    finally:
        raw.close()


@dataclass(frozen=True)
class _Existing:
    """The index row already holding a SOP instance (what a duplicate check needs)."""

    id: int
    sha256: str
    blob: str


@dataclass
class _Pending:
    """An instance of a batch whose blob is written (or not needed) but not yet indexed."""

    result: StoreResult
    sop_key: str
    digest: str
    #: column values of its index row; None when nothing is to be inserted
    row: dict[str, Any] | None = None
    tmp: Path | None = None
    target: Path | None = None
    synced: Future[None] | None = None
    #: the row it replaces (tenant policy "replace")
    replaces: _Existing | None = None
    #: an earlier instance of this batch with the same SOP Instance UID, resolved with it
    same_as: _Pending | None = None
    error: BaseException | None = None


class StoreBatch:
    """Instances stored together: per-instance validation, group durability.

    ``add`` validates one instance, encrypts it into a temp file and starts its
    fdatasync; a bad instance raises there and leaves nothing behind. ``commit``
    waits for the data fsyncs, renames the blobs into place, fsyncs each touched
    directory once, then inserts every index row in ONE transaction (itself durable,
    ``synchronous=FULL``) and only then returns the results: nothing is acknowledged
    before it is durable. If that transaction fails, the rows are retried one by
    one, so one instance never costs the others; blobs left without a row are removed.
    """

    def __init__(self, store: InstanceStore, tenant: str) -> None:
        self._store = store
        self._tenant = tenant
        self._seal = store.seal(tenant)
        self._pending: list[_Pending] = []
        self._by_key: dict[str, _Pending] = {}
        self._touched: set[Path] = set()

    def __enter__(self) -> StoreBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, source: BinaryIO, header: InstanceHeader | None = None) -> int:
        """Validate and prepare one instance; its index in ``commit()``'s results.

        Raises ``InvalidInstance`` (or an unexpected error) for this instance only.
        ``source`` is not used after this returns.
        """
        store, tenant, seal = self._store, self._tenant, self._seal
        source.seek(0, os.SEEK_END)
        size = source.tell()
        if size > store._max:
            raise InvalidInstance(
                f"instance of {size} bytes exceeds the limit of {store._max}", REASON_TOO_LARGE
            )
        source.seek(0)
        if header is None:
            header = read_header(source)
        sop_key = seal.blind("sop", header.sop_uid)
        earlier = self._by_key.get(sop_key)
        existing = None
        if earlier is None:
            existing = store._lookup(tenant, sop_key)
        replace = tenant in store._replace
        known_digest = earlier.digest if earlier is not None else None
        if known_digest is None and existing is not None:
            known_digest = existing.sha256
        if known_digest is not None:
            digest = store._digest(source)
            if digest == known_digest or not replace:
                outcome = store._existing(digest, known_digest)
                pending = _Pending(
                    store._result(outcome, tenant, header), sop_key, digest, same_as=earlier
                )
                return self._append(pending, register=False)
        relative_dir, directory = store._blob_directory(tenant, self._touched)
        tmp, digest, synced = store._encrypt_to_temp(
            directory, source, tenant, associated_data(tenant, header.sop_uid)
        )
        try:
            name = f"{uuid.uuid4().hex}.enc"
            attributes = dicom_json(header.dataset)
            attributes["00020010"] = {"vr": "UI", "Value": [header.transfer_syntax_uid]}
            accession = header.dataset.get("AccessionNumber")
            row = {
                "tenant": tenant,
                "study_key": seal.blind("study", header.study_uid),
                "series_key": seal.blind("series", header.series_uid),
                "sop_key": sop_key,
                "patient_key": seal.blind("patient", header.patient_id),
                "accession_key": seal.blind("accession", str(accession)) if accession else None,
                "study_date": header.study_date[:8] if header.study_date else None,
                "modality": header.modality,
                "series_number": header.series_number,
                "instance_number": header.instance_number,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "size": size,
                "sha256": digest,
                "blob": str(relative_dir / name),
                "preamble_sanitised": not header.preamble_was_clean,
                "stored_at": datetime.now(UTC),
                "attributes": seal.seal(attributes, sop_key),
            }
        except BaseException:
            _abandon(synced, tmp)
            raise
        outcome = Outcome.STORED
        replaces = None
        if earlier is not None:  # replace policy, different content, same batch
            earlier.row, earlier.replaces, replaces = None, None, earlier.replaces
            if earlier.synced is not None and earlier.tmp is not None:
                _abandon(earlier.synced, earlier.tmp)
                earlier.synced = earlier.tmp = None
            outcome = Outcome.REPLACED
        elif existing is not None:
            replaces, outcome = existing, Outcome.REPLACED
        pending = _Pending(
            store._result(outcome, tenant, header),
            sop_key,
            digest,
            row=row,
            tmp=tmp,
            target=directory / name,
            synced=synced,
            replaces=replaces,
        )
        return self._append(pending, register=True)

    def _append(self, pending: _Pending, *, register: bool) -> int:
        self._pending.append(pending)
        if register:
            self._by_key[pending.sop_key] = pending
        return len(self._pending) - 1

    def commit(self) -> list[StoreResult | BaseException]:
        """Make the batch durable and indexed; a result (or the error) per ``add``."""
        pending, self._pending, self._by_key = self._pending, [], {}
        writing = [p for p in pending if p.row is not None]
        try:
            writing = self._make_blobs_durable(writing)
            self._insert(writing)
        except BaseException as exc:
            for item in writing:
                self._remove_blob(item)
                item.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            self._touched.clear()
        results: list[StoreResult | BaseException] = []
        for item in pending:
            error = item.error or (item.same_as.error if item.same_as is not None else None)
            results.append(error if error is not None else item.result)
        return results

    def discard(self) -> None:
        """Drop what was added and not committed (their temp files are removed)."""
        for item in self._pending:
            if item.synced is not None and item.tmp is not None:
                _abandon(item.synced, item.tmp)
        self._pending, self._by_key = [], {}

    # -- internals -------------------------------------------------------------
    def _make_blobs_durable(self, writing: list[_Pending]) -> list[_Pending]:
        """Wait for the data fsyncs, rename, fsync each touched directory once.

        An instance whose blob could not be written fails alone; the others go on.
        """
        durable = []
        for item in writing:
            assert item.synced is not None
            assert item.tmp is not None
            assert item.target is not None
            try:
                item.synced.result()
                item.synced = None
                os.replace(item.tmp, item.target)
                item.tmp = None
            except Exception as exc:
                self._remove_blob(item)
                item.error = exc
                continue
            self._touched.add(item.target.parent)
            durable.append(item)
        # Deepest first: a new directory's own entry is made durable after its contents.
        for directory in sorted(self._touched, key=lambda d: len(d.parts), reverse=True):
            _fsync_dir(directory)
        return durable

    def _insert(self, writing: list[_Pending]) -> None:
        if not writing:
            return
        engine = self._store._engine
        try:
            with engine.begin() as connection:
                _durable_commits(connection)
                replaced = [p.replaces.id for p in writing if p.replaces is not None]
                if replaced:
                    connection.execute(sa_delete(_TABLE).where(_TABLE.c.id.in_(replaced)))
                connection.execute(sa_insert(_TABLE), [p.row for p in writing if p.row])
                # Same transaction: a study is never indexed without its publication pending.
                outbox.stage(connection, self._tenant, self._to_publish(writing), outbox.PUBLISH)
        except IntegrityError:
            # Another request stored one of these concurrently: settle them one by one.
            self._insert_one_by_one(writing)
            return
        self._store._outbox_changed()
        self._retire_replaced(writing)

    def _to_publish(self, items: list[_Pending]) -> dict[str, bytes]:
        """Study key -> sealed UID of the studies ``items`` change (one entry per study)."""
        studies: dict[str, bytes] = {}
        for item in items:
            assert item.row is not None
            key = item.row["study_key"]
            if key not in studies:
                studies[key] = outbox.seal_uid(self._seal, key, item.result.study_uid)
        return studies

    def _insert_one_by_one(self, writing: list[_Pending]) -> None:
        engine, tenant = self._store._engine, self._tenant
        for item in writing:
            assert item.row is not None
            try:
                with engine.begin() as connection:
                    _durable_commits(connection)
                    if item.replaces is not None:
                        connection.execute(sa_delete(_TABLE).where(_TABLE.c.id == item.replaces.id))
                    connection.execute(sa_insert(_TABLE), [item.row])
                    outbox.stage(connection, tenant, self._to_publish([item]), outbox.PUBLISH)
            except IntegrityError:
                self._remove_blob(item)
                winner = self._store._lookup(tenant, item.sop_key)
                if winner is None:
                    item.error = RuntimeError("the index refused the instance's row")
                    continue
                try:
                    outcome = self._store._existing(item.digest, winner.sha256)
                except InvalidInstance as exc:
                    item.error = exc
                    continue
                item.result = replace(item.result, outcome=outcome)
                item.replaces = None
            except Exception as exc:  # this instance fails, not the others
                self._remove_blob(item)
                item.error = exc
        self._store._outbox_changed()
        self._retire_replaced([p for p in writing if p.error is None])

    def _retire_replaced(self, stored: list[_Pending]) -> None:
        for item in stored:
            if item.replaces is not None:
                (self._store._blob_dir / item.replaces.blob).unlink(missing_ok=True)

    @staticmethod
    def _remove_blob(item: _Pending) -> None:
        if item.synced is not None and item.tmp is not None:
            _abandon(item.synced, item.tmp)
        for path in (item.tmp, item.target):
            if path is not None:
                path.unlink(missing_ok=True)
        item.synced = item.tmp = None


def _abandon(synced: Future[None], tmp: Path) -> None:
    with contextlib.suppress(Exception):
        synced.result()
    tmp.unlink(missing_ok=True)


def _durable_commits(connection: Connection) -> None:
    """SQLite in WAL mode with synchronous=NORMAL may lose the last commits on power loss."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA synchronous=FULL")
