"""The encrypted, multi-tenant instance store.

Each instance is validated, then a writer thread zeroes its preamble and streams it
through envelope encryption (hashing it on the way) into a new file, which is
fdatasynced and, at commit, renamed into place; only then is its index row
committed. A crash leaves at worst an unreferenced blob, never a half-written
instance or a row without its data. Every query takes the tenant, so one tenant's
rows are unreachable from another's, and nothing identifying is stored in clear
(see ``catalog``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import mmap
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
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
from sqlalchemy import Connection, Engine, Table, bindparam
from sqlalchemy import delete as sa_delete
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from exchange.dicom.part10 import (
    PREAMBLE_LENGTH,
    REASON_DUPLICATE,
    REASON_TOO_LARGE,
    ZERO_PREAMBLE,
    InstanceHeader,
    InvalidInstance,
    read_header,
)
from exchange.migrations import ensure_schema
from exchange.node import outbox
from exchange.node.catalog import InstanceRow, TenantSeal, dicom_json
from exchange.security import envelope
from exchange.security.keystore import KeyStore

CHUNK = 1024 * 1024
#: Above this, a decrypted instance spooled for pixel decoding spills to an anonymous temp file.
SPOOL_IN_MEMORY = 64 * 1024 * 1024
#: Threads that write blobs (read, hash, encrypt, write, fdatasync). SHA-256, AES-GCM and
#: the I/O release the GIL, so they run beside the parsing of the next instances.
WRITER_THREADS = 4
#: Blobs of one batch being written at once: bounds the memory their sources hold.
IN_FLIGHT = 4
_POOL_LOCK = threading.Lock()
_TABLE: Table = InstanceRow.__table__  # type: ignore[attr-defined]
#: Built once: compiling a statement per group cost more than running it.
_LOOKUP = sa_select(_TABLE.c.sop_key, _TABLE.c.id, _TABLE.c.sha256, _TABLE.c.blob).where(
    _TABLE.c.tenant == bindparam("tenant"),
    _TABLE.c.sop_key.in_(bindparam("sop_keys", expanding=True)),
)
#: Per writer thread: a plaintext and a ciphertext buffer, reused for every blob.
_BUFFERS = threading.local()
#: Direct I/O wants block-aligned memory, offsets and lengths: 4 KiB suits common devices.
_ALIGN = 4096
_DIRECT = getattr(os, "O_DIRECT", 0)
#: A blob's temp file: new, private, never through a symlink.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


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
        self._seals: dict[str, TenantSeal] = {}
        #: Called after a commit that put work in the outbox (wakes the publishing worker).
        self.on_outbox: Callable[[], None] | None = None
        blob_dir.mkdir(parents=True, exist_ok=True)
        ensure_schema(engine, "node")

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
        """The tenant's blind-index and sealing keys (derived once, then kept like its key)."""
        seal = self._seals.get(tenant)
        if seal is None:
            seal = self._seals[tenant] = TenantSeal.of(self._keys, tenant)
        return seal

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

    def _writers(self) -> ThreadPoolExecutor:
        with _POOL_LOCK:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="blob-writer")
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
        return self._lookup_many(tenant, [sop_key]).get(sop_key)

    def _lookup_many(self, tenant: str, sop_keys: list[str]) -> dict[str, _Existing]:
        """The index rows already holding any of ``sop_keys``, by key: one query."""
        if not sop_keys:
            return {}
        with self._engine.connect() as connection:
            found = connection.execute(_LOOKUP, {"tenant": tenant, "sop_keys": sop_keys})
            return {row[0]: _Existing(row[1], row[2], row[3]) for row in found}

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

    def chunks(self, view: InstanceView) -> Iterator[bytes]:
        """The stored (sanitised) instance of an index row, decrypted ~1 MiB at a time.

        For streaming many instances: no index query per instance, no copy through a
        file object. The blob's tag is checked after its last chunk (``DamagedBlob``),
        so a streaming caller must abort then.
        """
        tenant = view.row.tenant
        with (self._blob_dir / view.row.blob).open("rb", buffering=0) as raw:
            yield from envelope.decrypt_chunks(
                raw, self._keys, tenant, associated_data(tenant, view.sop_uid)
            )

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


def _buffers() -> tuple[memoryview, memoryview]:
    """This thread's plaintext and ciphertext buffers (fresh 1 MiB buffers per blob cost
    more in page faults than the AES-GCM itself). The ciphertext buffer is an anonymous
    mapping, so page-aligned as direct I/O wants."""
    pair: tuple[memoryview, memoryview] | None = getattr(_BUFFERS, "pair", None)
    if pair is None:
        cipher = mmap.mmap(-1, CHUNK + 4 * _ALIGN)
        pair = _BUFFERS.pair = (memoryview(bytearray(CHUNK)), memoryview(cipher))
    return pair


class _BlobFile:
    """A blob's bytes gathered in the writer's aligned buffer and written out with
    ``O_DIRECT`` where the file system allows it.

    The blob is fdatasynced before it counts anyway, so going through the page cache
    only added a copy of every byte (the largest single cost of a writer here) and a
    write-back. Direct I/O wants whole aligned blocks: the last one is padded with
    zeros, then the file is truncated to its true size. Where ``O_DIRECT`` is refused,
    it is plain buffered writes.
    """

    def __init__(self, fd: int, buffer: memoryview, direct: bool) -> None:
        self._fd = fd
        self._buffer = buffer
        self._used = 0
        self._size = 0
        self._direct = direct

    def room(self) -> memoryview:
        return self._buffer[self._used :]

    def advance(self, count: int) -> None:
        """``count`` bytes were put at the start of ``room()``: write out whole blocks."""
        self._used += count
        self._size += count
        if self._used >= _ALIGN:
            whole = self._used - self._used % _ALIGN if self._direct else self._used
            self._write(whole)
            rest = self._used - whole
            self._buffer[:rest] = self._buffer[whole : self._used]
            self._used = rest

    def put(self, data: bytes) -> None:
        self.room()[: len(data)] = data
        self.advance(len(data))

    def close(self) -> None:
        """Write what is left, cut the padding off, fdatasync."""
        if self._direct:
            padded = -(-self._used // _ALIGN) * _ALIGN
            self._buffer[self._used : padded] = bytes(padded - self._used)
            self._write(padded)
            os.ftruncate(self._fd, self._size)
        else:
            self._write(self._used)
        self._used = 0
        os.fdatasync(self._fd)

    def _write(self, length: int) -> None:
        view = self._buffer[:length]
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except OSError as exc:
                # Accepted at open, refused at the first write (some file systems): go buffered.
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                _disable_direct_io(self._fd)
                self._direct = False


def _create_temp(directory: Path) -> tuple[int, Path, str, bool]:
    """A new private temp file for a blob: its descriptor, path, random token (the blob's
    name once in place) and whether it was opened for direct I/O."""
    token = secrets.token_hex(16)
    path = directory / f".incoming-{token}.tmp"
    if _DIRECT:
        try:
            return os.open(path, _CREATE | _DIRECT, 0o600), path, token, True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                raise
    return os.open(path, _CREATE, 0o600), path, token, False


def _disable_direct_io(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)


def _sanitised(source: BinaryIO, view: memoryview) -> Iterator[memoryview]:
    """The instance in ``source`` with its preamble zeroed, read piece by piece into ``view``.

    Each piece is only valid until the next one is produced.
    """
    readinto = getattr(source, "readinto", None)
    source.seek(0)
    position = 0
    while True:
        if readinto is not None:
            count = readinto(view) or 0
        else:  # a file object without readinto: one copy more
            data = source.read(len(view))
            count = len(data)
            view[:count] = data
        if not count:
            return
        piece = view[:count]
        if position < PREAMBLE_LENGTH:
            end = min(count, PREAMBLE_LENGTH - position)
            piece[:end] = ZERO_PREAMBLE[position : position + end]
        position += count
        yield piece


def _hash(source: BinaryIO) -> str:
    """SHA-256 of the sanitised instance (a duplicate's check: rare, so its own buffer)."""
    digest = hashlib.sha256()
    for piece in _sanitised(source, memoryview(bytearray(CHUNK))):
        digest.update(piece)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Blob:
    """What a blob writer needs; everything random and every system call is done there.

    The thread that parses instances then never gives the GIL away (and waits to get
    it back from the writers) in the middle of an instance.
    """

    keys: KeyStore
    tenant: str
    seal: TenantSeal
    directory: Path
    sop_uid: str
    sop_key: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class _Written:
    """A blob written to its temp file and fdatasynced, not yet renamed into place."""

    tmp: Path
    name: str
    digest: str
    #: the index row's sealed attributes
    attributes: bytes


def _write_blob(source: BinaryIO, blob: _Blob) -> _Written:
    """Sanitise, hash and encrypt ``source`` into a new temp file in one pass, fdatasync it.

    Runs in a writer thread and closes ``source``; on failure the temp file is removed.
    """
    try:
        sealed = blob.seal.seal(blob.attributes, blob.sop_key)
        sealer = envelope.Sealer(blob.keys, blob.tenant, associated_data(blob.tenant, blob.sop_uid))
        fd, tmp, token, direct = _create_temp(blob.directory)
    except BaseException:
        source.close()
        raise
    try:
        plain, cipher = _buffers()
        out = _BlobFile(fd, cipher, direct)
        digest = hashlib.sha256()
        out.put(sealer.prefix)
        for piece in _sanitised(source, plain):
            digest.update(piece)
            out.advance(sealer.update_into(piece, out.room()))
        out.put(sealer.finalize())
        out.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        source.close()
    return _Written(tmp, f"{token}.enc", digest.hexdigest(), sealed)


@dataclass(frozen=True)
class _Existing:
    """The index row already holding a SOP instance (what a duplicate check needs)."""

    id: int
    sha256: str
    blob: str


@dataclass
class _Pending:
    """An instance of a batch whose blob is being written (or not needed), not yet indexed."""

    result: StoreResult
    sop_key: str
    #: SHA-256 of the sanitised instance, when known without its writer
    digest: str | None = None
    #: column values of its index row; None when nothing is to be inserted
    row: dict[str, Any] | None = None
    #: the tenant's blob directory, relative to the store and absolute
    relative_dir: Path | None = None
    directory: Path | None = None
    #: the blob writer, then what it wrote
    job: Future[_Written] | None = None
    written: _Written | None = None
    #: the blob once renamed into place
    target: Path | None = None
    #: the row it replaces (tenant policy "replace")
    replaces: _Existing | None = None
    #: an earlier instance of this batch with the same SOP Instance UID, resolved with it
    same_as: _Pending | None = None
    error: BaseException | None = None

    def wait(self) -> _Written:
        """What the writer wrote, waiting for it if need be (raises what it raised)."""
        if self.written is None:
            assert self.job is not None
            job, self.job = self.job, None
            self.written = job.result()
        return self.written

    def content_digest(self) -> str:
        return self.digest if self.digest is not None else self.wait().digest


class StoreBatch:
    """Instances stored together: per-instance validation, group durability.

    ``add`` validates one instance and hands it to a writer thread, which encrypts it
    into a temp file and fdatasyncs it while the caller goes on with the next one; a bad
    instance raises there and leaves nothing behind. ``commit`` waits for the writers,
    then checks the whole group against the index in one query (an instance stored
    before is "already present", or a conflict), renames the new blobs into place,
    fsyncs each touched directory once, inserts every index row in ONE transaction
    (itself durable, ``synchronous=FULL``) and only then returns the results: nothing
    is acknowledged before it is durable. If that transaction fails, the rows are
    retried one by one, so one instance never costs the others; blobs left without a
    row are removed.

    Checking the index at commit rather than per instance means an instance sent
    again is encrypted and written before it is found present (and its blob dropped):
    re-sending costs some I/O, first sending (the usual case) costs one query per group.
    """

    def __init__(self, store: InstanceStore, tenant: str) -> None:
        self._store = store
        self._tenant = tenant
        self._seal = store.seal(tenant)
        self._pending: list[_Pending] = []
        self._by_key: dict[str, _Pending] = {}
        self._touched: set[Path] = set()
        self._slots = threading.Semaphore(IN_FLIGHT)

    def __enter__(self) -> StoreBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def __len__(self) -> int:
        return len(self._pending)

    def ready(self) -> bool:
        """Whether ``add`` would start writing at once, without waiting for a writer
        (an event loop calls ``add`` itself only then)."""
        if not self._slots.acquire(blocking=False):
            return False
        self._slots.release()
        return True

    def add(self, source: BinaryIO, header: InstanceHeader | None = None) -> int:
        """Validate one instance and start writing it; its index in ``commit()``'s results.

        Raises ``InvalidInstance`` (or an unexpected error) for this instance only. The
        batch takes ``source`` over: a writer thread may read it after this returns, and
        it is closed once no longer needed (also when this raises).
        """
        handed_over = False
        try:
            index, handed_over = self._add(source, header)
            return index
        finally:
            if not handed_over:
                source.close()

    def _add(self, source: BinaryIO, header: InstanceHeader | None) -> tuple[int, bool]:
        """The instance's index, and whether a writer took ``source`` over."""
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
        outcome = Outcome.STORED
        earlier = self._by_key.get(sop_key)
        if earlier is not None:  # the same SOP instance twice in this batch (rare)
            known = earlier.content_digest()
            digest = _hash(source)
            if digest == known or tenant not in store._replace:
                outcome = store._existing(digest, known)
                pending = _Pending(
                    store._result(outcome, tenant, header), sop_key, digest, same_as=earlier
                )
                return self._append(pending, register=False), False
            # replace policy, different content: this one is stored instead of the earlier
            earlier.row = None
            if earlier.job is not None:
                _abandon(earlier.job)
                earlier.job = None
            elif earlier.written is not None:
                earlier.written.tmp.unlink(missing_ok=True)
            outcome = Outcome.REPLACED
        relative_dir, directory = store._blob_directory(tenant, self._touched)
        try:
            attributes = dicom_json(header.dataset)
        except Exception as exc:  # a value pydicom cannot decode is bad input, not our fault
            raise InvalidInstance(
                f"the DICOM data cannot be decoded ({type(exc).__name__})"
            ) from None
        attributes["00020010"] = {"vr": "UI", "Value": [header.transfer_syntax_uid]}
        accession = header.accession
        row = {
            "tenant": tenant,
            "study_key": seal.blind("study", header.study_uid),
            "series_key": seal.blind("series", header.series_uid),
            "sop_key": sop_key,
            "patient_key": seal.blind("patient", header.patient_id),
            "accession_key": seal.blind("accession", accession) if accession else None,
            "study_date": header.study_date[:8] if header.study_date else None,
            "modality": header.modality,
            "series_number": header.series_number,
            "instance_number": header.instance_number,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "size": size,
            "preamble_sanitised": not header.preamble_was_clean,
            "stored_at": datetime.now(UTC),
            # sha256, blob and attributes: from the writer, at commit
        }
        blob = _Blob(store._keys, tenant, seal, directory, header.sop_uid, sop_key, attributes)
        pending = _Pending(
            store._result(outcome, tenant, header),
            sop_key,
            row=row,
            relative_dir=relative_dir,
            directory=directory,
            job=self._start_writing(source, blob),
        )
        return self._append(pending, register=True), True

    def _start_writing(self, source: BinaryIO, blob: _Blob) -> Future[_Written]:
        """Hand ``source`` to a writer thread; waits while ``IN_FLIGHT`` of this batch's
        blobs are being written (bounds the memory their sources hold)."""
        self._slots.acquire()
        try:
            job = self._store._writers().submit(_write_blob, source, blob)
        except BaseException:
            self._slots.release()
            raise
        job.add_done_callback(lambda _job: self._slots.release())
        return job

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
            writing = self._make_blobs_durable(self._settle(writing))
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
            self._remove_blob(item)
        self._pending, self._by_key = [], {}

    # -- internals -------------------------------------------------------------
    def _settle(self, writing: list[_Pending]) -> list[_Pending]:
        """Wait for the writers, then sort out against the index what is already there.

        Same content stored before: "already present", its new blob dropped. Different
        content: a conflict, or a replacement under the tenant's "replace" policy.
        An instance whose blob could not be written fails alone; the others go on.
        """
        written = []
        for item in writing:
            try:
                item.wait()
            except Exception as exc:
                item.error = exc
                continue
            written.append(item)
        found = self._store._lookup_many(self._tenant, [item.sop_key for item in written])
        new = []
        for item in written:
            assert item.written is not None
            existing = found.get(item.sop_key)
            if existing is not None:
                try:
                    outcome = self._store._existing(item.written.digest, existing.sha256)
                except InvalidInstance as exc:
                    if self._tenant not in self._store._replace:
                        item.error = exc
                        self._remove_blob(item)
                        continue
                    item.replaces, outcome = existing, Outcome.REPLACED
                if outcome is Outcome.ALREADY_PRESENT:
                    item.result = replace(item.result, outcome=outcome)
                    self._remove_blob(item)
                    item.row = None
                    continue
                item.result = replace(item.result, outcome=outcome)
            new.append(item)
        return new

    def _make_blobs_durable(self, writing: list[_Pending]) -> list[_Pending]:
        """Rename the blobs into place, fsync each touched directory once (deepest first:
        a new directory's own entry is made durable after its contents)."""
        durable = []
        for item in writing:
            assert item.row is not None
            assert item.written is not None
            assert item.directory is not None
            assert item.relative_dir is not None
            target = item.directory / item.written.name
            try:
                os.replace(item.written.tmp, target)
            except Exception as exc:
                self._remove_blob(item)
                item.error = exc
                continue
            item.target = target
            item.row["sha256"] = item.written.digest
            item.row["blob"] = str(item.relative_dir / item.written.name)
            item.row["attributes"] = item.written.attributes
            self._touched.add(item.directory)
            durable.append(item)
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
                    outcome = self._store._existing(item.content_digest(), winner.sha256)
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
        """Remove the instance's blob wherever it is: being written, written, or in place."""
        if item.job is not None:
            written = _abandon(item.job)
            item.job = None
            if written is not None:
                item.written = written
        if item.written is not None and item.target is None:
            item.written.tmp.unlink(missing_ok=True)
        if item.target is not None:
            item.target.unlink(missing_ok=True)
            item.target = None


def _abandon(job: Future[_Written]) -> _Written | None:
    """Wait for a writer whose blob is not wanted; remove its temp file."""
    try:
        written = job.result()
    except Exception:
        return None  # the writer removed its temp file
    written.tmp.unlink(missing_ok=True)
    return written


def _durable_commits(connection: Connection) -> None:
    """SQLite in WAL mode with synchronous=NORMAL may lose the last commits on power loss."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA synchronous=FULL")
