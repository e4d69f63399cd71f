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
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Engine
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
from exchange.node.catalog import InstanceRow, TenantSeal, dicom_json
from exchange.security import envelope
from exchange.security.keystore import KeyStore

CHUNK = 1024 * 1024
#: Above this, a decrypted instance spooled for pixel decoding spills to an anonymous temp file.
SPOOL_IN_MEMORY = 64 * 1024 * 1024


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
        blob_dir.mkdir(parents=True, exist_ok=True)
        SQLModel.metadata.create_all(engine, tables=[InstanceRow.__table__])  # type: ignore[attr-defined]

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

    # -- intake ------------------------------------------------------------
    def store(self, tenant: str, source: BinaryIO) -> StoreResult:
        """Validate and store one Part 10 instance read from a seekable ``source``."""
        seal = self.seal(tenant)
        source.seek(0, os.SEEK_END)
        size = source.tell()
        if size > self._max:
            raise InvalidInstance(
                f"instance of {size} bytes exceeds the limit of {self._max}", REASON_TOO_LARGE
            )
        source.seek(0)
        header = read_header(source)
        sop_key = seal.blind("sop", header.sop_uid)
        digest = self._digest(source)
        existing = self._row(tenant, sop_key)
        if existing is not None and (existing.sha256 == digest or tenant not in self._replace):
            return self._existing(existing, digest, tenant, header)
        name = uuid.uuid4().hex
        relative = Path(tenant) / name[:2] / f"{name}.enc"
        target = self._blob_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._encrypt_to(target, source, tenant, associated_data(tenant, header.sop_uid))
        attributes = dicom_json(header.dataset)
        attributes["00020010"] = {"vr": "UI", "Value": [header.transfer_syntax_uid]}
        row = InstanceRow(
            tenant=tenant,
            study_key=seal.blind("study", header.study_uid),
            series_key=seal.blind("series", header.series_uid),
            sop_key=sop_key,
            patient_key=seal.blind("patient", header.patient_id),
            accession_key=seal.blind("accession", str(header.dataset.get("AccessionNumber")))
            if header.dataset.get("AccessionNumber")
            else None,
            study_date=header.study_date[:8] if header.study_date else None,
            modality=header.modality,
            series_number=header.series_number,
            instance_number=header.instance_number,
            transfer_syntax_uid=header.transfer_syntax_uid,
            size=size,
            sha256=digest,
            blob=str(relative),
            preamble_sanitised=not header.preamble_was_clean,
            stored_at=datetime.now(UTC),
            attributes=seal.seal(attributes, sop_key),
        )
        try:
            with Session(self._engine) as session:
                if existing is not None:  # the tenant's policy says replace
                    session.delete(session.merge(existing))
                    session.flush()
                session.add(row)
                session.commit()
        except IntegrityError:
            # The same SOP instance was stored concurrently: the first one stands.
            target.unlink(missing_ok=True)
            winner = self._row(tenant, sop_key)
            if winner is None:
                raise
            return self._existing(winner, digest, tenant, header)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        if existing is not None:
            (self._blob_dir / existing.blob).unlink(missing_ok=True)
            return self._result(Outcome.REPLACED, tenant, header)
        return self._result(Outcome.STORED, tenant, header)

    def _existing(
        self, row: InstanceRow, digest: str, tenant: str, header: InstanceHeader
    ) -> StoreResult:
        if row.sha256 == digest:
            return self._result(Outcome.ALREADY_PRESENT, tenant, header)
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

    def _encrypt_to(self, target: Path, source: BinaryIO, tenant: str, aad: bytes) -> None:
        """Temp file, fsync, rename: the blob is durable before anything refers to it."""
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw:
                envelope.encrypt(self._sanitised_chunks(source), raw, self._keys, tenant, aad)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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
