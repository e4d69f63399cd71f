"""Versioned persistence of FHIR resources.

Every version is kept (``vread``, ``_history``); the current one is the row
with the highest version. Writes happen in one transaction, so a failed write
leaves the previous version untouched.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, select

from exchange.errors import Gone, NotFound, PreconditionFailed


class ResourceVersion(SQLModel, table=True):
    __tablename__ = "fhir_resource_version"

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    version: int = Field(primary_key=True)
    last_updated: datetime = Field(index=True)
    deleted: bool = False
    body: str


@dataclass(frozen=True)
class Stored:
    resource_type: str
    id: str
    version: int
    last_updated: datetime
    body: dict[str, Any]

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


def _stamp(body: dict[str, Any], rid: str, version: int, when: datetime) -> dict[str, Any]:
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {**body, "id": rid, "meta": meta}


def parse_etag(value: str) -> int:
    stripped = value.strip().removeprefix("W/").strip('"')
    if not stripped.isdigit():
        raise PreconditionFailed(f'If-Match {value!r} is not a version ETag such as W/"1"')
    return int(stripped)


class ResourceStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        SQLModel.metadata.create_all(engine, tables=[ResourceVersion.__table__])  # type: ignore[attr-defined]

    def _latest(self, session: Session, resource_type: str, rid: str) -> ResourceVersion | None:
        statement = (
            select(ResourceVersion)
            .where(ResourceVersion.resource_type == resource_type, ResourceVersion.id == rid)
            .order_by(ResourceVersion.version.desc())  # type: ignore[attr-defined]
            .limit(1)
        )
        return session.exec(statement).first()

    def create(self, resource_type: str, body: dict[str, Any]) -> Stored:
        return self._write(resource_type, str(uuid.uuid4()), body, if_match=None, create=True)

    def update(
        self, resource_type: str, rid: str, body: dict[str, Any], if_match: str | None = None
    ) -> tuple[Stored, bool]:
        """Update (or create with a client-chosen id). Returns (stored, created)."""
        stored = self._write(resource_type, rid, body, if_match=if_match, create=False)
        return stored, stored.version == 1

    def _write(
        self, resource_type: str, rid: str, body: dict[str, Any], if_match: str | None, create: bool
    ) -> Stored:
        now = datetime.now(UTC)
        with Session(self._engine) as session:
            latest = None if create else self._latest(session, resource_type, rid)
            if if_match is not None:
                expected = parse_etag(if_match)
                if latest is None or latest.version != expected:
                    raise PreconditionFailed(
                        f"{resource_type}/{rid} is not at version {expected}; read it again"
                    )
            version = (latest.version + 1) if latest else 1
            stamped = _stamp(body, rid, version, now)
            session.add(
                ResourceVersion(
                    resource_type=resource_type,
                    id=rid,
                    version=version,
                    last_updated=now,
                    body=json.dumps(stamped),
                )
            )
            session.commit()
        return Stored(resource_type, rid, version, now, stamped)

    def read(self, resource_type: str, rid: str) -> Stored:
        with Session(self._engine) as session:
            latest = self._latest(session, resource_type, rid)
        if latest is None:
            raise NotFound(f"{resource_type}/{rid} does not exist")
        if latest.deleted:
            raise Gone(f"{resource_type}/{rid} was deleted")
        return Stored(
            resource_type, rid, latest.version, latest.last_updated, json.loads(latest.body)
        )

    def vread(self, resource_type: str, rid: str, version: int) -> Stored:
        with Session(self._engine) as session:
            row = session.get(ResourceVersion, (resource_type, rid, version))
        if row is None:
            raise NotFound(f"{resource_type}/{rid} has no version {version}")
        if row.deleted:
            raise Gone(f"{resource_type}/{rid} version {version} is a deletion")
        return Stored(resource_type, rid, row.version, row.last_updated, json.loads(row.body))
