"""The encrypted, multi-tenant instance store.

Each instance is validated, its preamble zeroed, then streamed through the
tenant's cipher into a new file that is renamed into place only when complete;
its index row is written after. A crash leaves at worst an unreferenced blob,
never a half-written instance or an index row without its data. Every query
takes the tenant, so one tenant's rows are unreachable from another's.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine, UniqueConstraint
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from exchange.dicom.part10 import (
    PREAMBLE_LENGTH,
    REASON_DUPLICATE,
    REASON_TOO_LARGE,
    ZERO_PREAMBLE,
    InstanceHeader,
    InvalidInstance,
    read_header,
)
from exchange.security import envelope
from exchange.security.keystore import KeyStore

CHUNK = 1024 * 1024


class StoredInstance(SQLModel, table=True):
    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("tenant", "sop_uid"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(index=True, max_length=64)
    study_uid: str = Field(index=True, max_length=64)
    series_uid: str = Field(index=True, max_length=64)
    sop_uid: str = Field(max_length=64)
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax_uid: str = Field(max_length=64)
    patient_id: str = Field(index=True, max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    study_date: str | None = Field(default=None, max_length=8)
    series_number: int | None = None
    instance_number: int | None = None
    size: int
    sha256: str = Field(max_length=64)
    blob: str = Field(max_length=200)
    preamble_sanitised: bool = False
    stored_at: datetime


class Outcome(StrEnum):
    STORED = "stored"
    ALREADY_PRESENT = "already present"


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    tenant: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    preamble_sanitised: bool


def associated_data(tenant: str, sop_uid: str) -> bytes:
    """Binds a blob to its tenant and instance: moving it elsewhere breaks decryption."""
    return f"exchange:v1:{tenant}:{sop_uid}".encode()


class InstanceStore:
    def __init__(
        self, engine: Engine, blob_dir: Path, keys: KeyStore, max_instance_bytes: int
    ) -> None:
        self._engine = engine
        self._blob_dir = blob_dir
        self._keys = keys
        self._max = max_instance_bytes
        blob_dir.mkdir(parents=True, exist_ok=True)
        SQLModel.metadata.create_all(engine, tables=[StoredInstance.__table__])  # type: ignore[attr-defined]

    # -- intake ------------------------------------------------------------
    def store(self, tenant: str, source: BinaryIO) -> StoreResult:
        """Validate and store one Part 10 instance read from a seekable ``source``."""
        source.seek(0, os.SEEK_END)
        size = source.tell()
        if size > self._max:
            raise InvalidInstance(
                f"instance of {size} bytes exceeds the limit of {self._max}", REASON_TOO_LARGE
            )
        source.seek(0)
        header = read_header(source)
        existing = self._find(tenant, header.sop_uid)
        digest = self._digest(source)
        if existing is not None:
            if existing.sha256 == digest:
                return self._result(Outcome.ALREADY_PRESENT, tenant, header)
            raise InvalidInstance(
                "a different instance with this SOP Instance UID is already "
                "stored; it was kept unchanged",
                REASON_DUPLICATE,
            )
        relative = (
            Path(tenant) / header.study_uid[-2:].replace(".", "0") / f"{uuid.uuid4().hex}.enc"
        )
        target = self._blob_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._encrypt_to(target, source, tenant, associated_data(tenant, header.sop_uid))
        row = StoredInstance(
            tenant=tenant,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            patient_id=header.patient_id,
            modality=header.modality,
            study_date=header.study_date,
            series_number=header.series_number,
            instance_number=header.instance_number,
            size=size,
            sha256=digest,
            blob=str(relative),
            preamble_sanitised=not header.preamble_was_clean,
            stored_at=datetime.now(UTC),
        )
        try:
            with Session(self._engine) as session:
                session.add(row)
                session.commit()
        except IntegrityError:
            # Someone stored the same SOP instance concurrently: theirs stands.
            target.unlink(missing_ok=True)
            winner = self._find(tenant, header.sop_uid)
            if winner is not None and winner.sha256 == digest:
                return self._result(Outcome.ALREADY_PRESENT, tenant, header)
            raise InvalidInstance(
                "a different instance with this SOP Instance UID is already "
                "stored; it was kept unchanged",
                REASON_DUPLICATE,
            ) from None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return self._result(Outcome.STORED, tenant, header)

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
    def _find(self, tenant: str, sop_uid: str) -> StoredInstance | None:
        with Session(self._engine) as session:
            return session.exec(
                select(StoredInstance).where(
                    StoredInstance.tenant == tenant, StoredInstance.sop_uid == sop_uid
                )
            ).first()

    def instances(self, tenant: str, study_uid: str | None = None) -> list[StoredInstance]:
        with Session(self._engine) as session:
            statement = select(StoredInstance).where(StoredInstance.tenant == tenant)
            if study_uid is not None:
                statement = statement.where(StoredInstance.study_uid == study_uid)
            return list(
                session.exec(
                    statement.order_by(
                        col(StoredInstance.series_number),
                        col(StoredInstance.instance_number),
                        col(StoredInstance.sop_uid),
                    )
                )
            )

    @contextmanager
    def open(self, tenant: str, sop_uid: str) -> Iterator[BinaryIO]:
        """A decrypting, forward-only stream over the stored (sanitised) Part 10 bytes."""
        row = self._find(tenant, sop_uid)
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
