"""Versioned FHIR storage with search-index tables, behind one ``Repository`` protocol.

Layout (SQLModel tables, SQLite or PostgreSQL):

- ``fhir_resource``: the current version of each resource (JSON body), a
  surrogate integer key the index tables point at, and the few *facts* an
  access decision needs (so a search can decide visibility without bodies).
- ``fhir_history``: every version ever written; a deletion is a version too.
- ``fhir_idx_token|string|date|ref``: one row per searchable value of the
  current version, each with a composite index led by (type, parameter).

A write replaces the current row, appends to history and rewrites the index
rows in one transaction: a failed write leaves the previous version whole.
Concurrent writers to one resource are caught by a version check on the
current row (409), never by lost updates.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, cast

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.selectable import FromClause
from sqlmodel import Field, SQLModel

from exchange.errors import BadRequest, Conflict, Gone, NotFound, PreconditionFailed
from exchange.fhir import searchparams as sp
from exchange.fhir.search import Criterion, Include, SearchQuery
from exchange.migrations import ensure_schema

_KEY = BigInteger().with_variant(Integer(), "sqlite")
#: Normalised strings compare byte-wise on both databases, so a prefix is a range scan.
_NORM = String(sp.STRING_INDEX_LENGTH).with_variant(
    String(sp.STRING_INDEX_LENGTH, collation="C"), "postgresql"
)
_PREFIX_END = "\U0010ffff"


class ResourceRow(SQLModel, table=True):
    __tablename__ = "fhir_resource"
    __table_args__ = (
        UniqueConstraint("rtype", "id", name="uq_fhir_resource_type_id"),
        Index("ix_fhir_resource_type_pk", "rtype", "pk"),
        Index("ix_fhir_resource_type_updated", "rtype", "updated_ms"),
    )

    pk: int | None = Field(default=None, sa_column=Column(_KEY, primary_key=True))
    rtype: str = Field(max_length=64)
    id: str = Field(max_length=64)
    version: int
    updated_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    deleted: bool = False
    body: str = Field(sa_column=Column(Text, nullable=False))
    facts: str = Field(sa_column=Column(Text, nullable=False))


class HistoryRow(SQLModel, table=True):
    __tablename__ = "fhir_history"

    rtype: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    version: int = Field(primary_key=True)
    updated_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    method: str = Field(max_length=8)
    deleted: bool = False
    body: str = Field(sa_column=Column(Text, nullable=False))


def _res_pk() -> Any:
    return Field(sa_column=Column(_KEY, ForeignKey("fhir_resource.pk"), nullable=False, index=True))


class TokenIndex(SQLModel, table=True):
    __tablename__ = "fhir_idx_token"
    __table_args__ = (
        Index("ix_fhir_idx_token_value", "rtype", "param", "system", "code", "res_pk"),
        Index("ix_fhir_idx_token_code", "rtype", "param", "code", "res_pk"),
    )

    row: int | None = Field(default=None, sa_column=Column(_KEY, primary_key=True))
    res_pk: int = _res_pk()
    rtype: str = Field(max_length=64)
    param: str = Field(max_length=64)
    system: str
    code: str


class StringIndex(SQLModel, table=True):
    __tablename__ = "fhir_idx_string"
    __table_args__ = (Index("ix_fhir_idx_string_value", "rtype", "param", "norm", "res_pk"),)

    row: int | None = Field(default=None, sa_column=Column(_KEY, primary_key=True))
    res_pk: int = _res_pk()
    rtype: str = Field(max_length=64)
    param: str = Field(max_length=64)
    norm: str = Field(sa_column=Column(_NORM, nullable=False))
    exact: str


class DateIndex(SQLModel, table=True):
    __tablename__ = "fhir_idx_date"
    __table_args__ = (
        Index("ix_fhir_idx_date_range", "rtype", "param", "start_ms", "end_ms", "res_pk"),
    )

    row: int | None = Field(default=None, sa_column=Column(_KEY, primary_key=True))
    res_pk: int = _res_pk()
    rtype: str = Field(max_length=64)
    param: str = Field(max_length=64)
    start_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    end_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class RefIndex(SQLModel, table=True):
    __tablename__ = "fhir_idx_ref"
    __table_args__ = (
        Index("ix_fhir_idx_ref_target", "rtype", "param", "target_type", "target_id", "res_pk"),
    )

    row: int | None = Field(default=None, sa_column=Column(_KEY, primary_key=True))
    res_pk: int = _res_pk()
    rtype: str = Field(max_length=64)
    param: str = Field(max_length=64)
    target_type: str = Field(max_length=64)
    target_id: str


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


RES = _table(ResourceRow)
HIST = _table(HistoryRow)
TOK = _table(TokenIndex)
STR = _table(StringIndex)
DATE = _table(DateIndex)
REF = _table(RefIndex)
TABLES = [RES, HIST, TOK, STR, DATE, REF]

_REFERENCING = (
    select(RES.c.body)
    .where(
        RES.c.pk.in_(
            select(REF.c.res_pk).where(
                REF.c.rtype == bindparam("rtype"),
                REF.c.param == bindparam("param"),
                REF.c.target_type == bindparam("target_type"),
                REF.c.target_id.in_(bindparam("ids", expanding=True)),
            )
        ),
        RES.c.deleted == false(),
    )
    .order_by(RES.c.pk)
)
#: Built once: parameters passed at execution keep the compiled-statement cache hot.
_INSERT_RES = insert(RES).returning(RES.c.pk)


# -- values handed out ---------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A search match before its body is loaded: enough to decide whether it is visible."""

    pk: int
    resource_type: str
    id: str
    facts: Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Stored:
    resource_type: str
    id: str
    version: int
    last_updated: datetime
    body: dict[str, Any]
    facts: Mapping[str, Sequence[str]] = field(default_factory=dict)
    pk: int = 0

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


WriteOutcome = Literal["created", "updated", "unchanged", "existing", "deleted", "gone"]


@dataclass(frozen=True)
class Written:
    """What a write did. ``unchanged``: same content, no new version; ``existing``: a
    conditional create found its match; ``gone``: deleting what was already deleted."""

    stored: Stored
    outcome: WriteOutcome


@dataclass(frozen=True)
class Version:
    """One entry of a resource's history (``body`` None for a deletion)."""

    version: int
    last_updated: datetime
    method: str
    body: dict[str, Any] | None


@dataclass(frozen=True)
class History:
    current: Candidate
    total: int
    versions: list[Version]


WriteHook = Callable[[dict[str, Any] | None, dict[str, Any] | None], dict[str, Any] | None]
"""Called inside the write's transaction with (current body or None, new body or None for a
delete); returns the body to write, or raises to refuse. Ownership checks and hub-managed
elements (``Patient.link``) live in hooks, so they cannot race with other writers."""


class Repository(Protocol):
    """What the REST layer needs from storage; SQL today, anything tomorrow."""

    def create(
        self,
        resource_type: str,
        body: dict[str, Any],
        if_none_exist: SearchQuery | None = None,
        hook: WriteHook | None = None,
    ) -> Written: ...

    def update(
        self,
        resource_type: str,
        rid: str,
        body: dict[str, Any],
        if_match: str | None = None,
        hook: WriteHook | None = None,
    ) -> Written: ...

    def conditional_update(
        self,
        resource_type: str,
        conditions: SearchQuery,
        body: dict[str, Any],
        hook: WriteHook | None = None,
    ) -> Written: ...

    def delete(
        self,
        resource_type: str,
        rid: str,
        if_match: str | None = None,
        hook: WriteHook | None = None,
    ) -> Written: ...

    def read(self, resource_type: str, rid: str) -> Stored: ...

    def vread(self, resource_type: str, rid: str, version: int) -> Stored: ...

    def history(self, resource_type: str, rid: str, offset: int, count: int) -> History: ...

    def candidate_batches(
        self, query: SearchQuery, size: int
    ) -> Generator[list[Candidate], None, None]: ...

    def load(self, pks: Sequence[int]) -> dict[int, Stored]: ...

    def include_candidates(
        self, matches: Sequence[Stored], includes: Sequence[Include], limit: int
    ) -> list[Candidate]: ...

    def referencing(
        self, resource_type: str, param: str, target_type: str, target_ids: Sequence[str]
    ) -> list[dict[str, Any]]: ...


def _hooked(
    hook: WriteHook, current: dict[str, Any] | None, body: dict[str, Any]
) -> dict[str, Any]:
    result = hook(current, body)
    return body if result is None else result


def parse_etag(value: str) -> int:
    stripped = value.strip().removeprefix("W/").strip('"')
    if not stripped.isdigit():
        raise PreconditionFailed(f'If-Match {value!r} is not a version ETag such as W/"1"')
    return int(stripped)


def _instant(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stamp(
    resource_type: str, body: dict[str, Any], rid: str, version: int, when: datetime
) -> dict[str, Any]:
    meta = {**(body.get("meta") or {}), "versionId": str(version), "lastUpdated": _instant(when)}
    rest = {k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")}
    return {"resourceType": resource_type, "id": rid, "meta": meta, **rest}


def _content(body: Mapping[str, Any]) -> dict[str, Any]:
    """A body without what the server writes (id, versionId, lastUpdated): for no-op updates."""
    meta = {
        k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")
    }
    rest = {k: v for k, v in body.items() if k not in ("id", "meta")}
    return {**rest, "meta": meta} if meta else rest


@dataclass(frozen=True)
class _Current:
    pk: int
    id: str
    version: int
    updated_ms: int
    deleted: bool
    body: str
    facts: str


class SqlRepository:
    """``Repository`` on SQLAlchemy: SQLite (WAL) or PostgreSQL."""

    def __init__(self, engine: Engine, local_base: str | None = None) -> None:
        self._engine = engine
        #: Our own ``{base}/fhir``: absolute references to it are indexed as relative ones.
        self._base = local_base
        ensure_schema(engine, "hub")

    # -- writes ----------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction for callers that keep their own rows beside a resource
        (the audit hash chain): committed on leaving, rolled back on an exception."""
        with self._engine.begin() as conn:
            yield conn

    def insert_new(self, conn: Connection, resource_type: str, body: dict[str, Any]) -> Stored:
        """Create ``body`` as a new resource (fresh uuid4 id, version 1) in ``conn``'s
        transaction; no hooks, no conditions."""
        return self._apply(conn, resource_type, str(uuid.uuid4()), body, None, "POST")

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise Conflict(
                f"{what} was changed by another request at the same time; read it and retry"
            ) from None

    def create(
        self,
        resource_type: str,
        body: dict[str, Any],
        if_none_exist: SearchQuery | None = None,
        hook: WriteHook | None = None,
    ) -> Written:
        with self._transaction(resource_type) as conn:
            if if_none_exist is not None:
                _serialise_conditional(conn, resource_type)
                found = self._match(conn, if_none_exist, 2)
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist matches more than one {resource_type}; be more specific"
                    )
                if found:
                    current = self._current(conn, resource_type, found[0])
                    assert current is not None
                    return Written(self._stored(resource_type, current), "existing")
            if hook is not None:
                body = _hooked(hook, None, body)
            stored = self._apply(conn, resource_type, str(uuid.uuid4()), body, None, "POST")
        return Written(stored, "created")

    def update(
        self,
        resource_type: str,
        rid: str,
        body: dict[str, Any],
        if_match: str | None = None,
        hook: WriteHook | None = None,
    ) -> Written:
        with self._transaction(f"{resource_type}/{rid}") as conn:
            current = self._current(conn, resource_type, rid, lock=True)
            _check_if_match(resource_type, rid, current, if_match)
            return self._put(conn, resource_type, rid, body, current, hook)

    def conditional_update(
        self,
        resource_type: str,
        conditions: SearchQuery,
        body: dict[str, Any],
        hook: WriteHook | None = None,
    ) -> Written:
        """0 matches: create; 1: update it (no new version if nothing changed); more: 412."""
        with self._transaction(resource_type) as conn:
            _serialise_conditional(conn, resource_type)
            found = self._match(conn, conditions, 2)
            if len(found) > 1:
                raise PreconditionFailed(
                    f"the conditions match more than one {resource_type}; be more specific"
                )
            given = body.get("id")
            if found and given not in (None, found[0]):
                raise BadRequest(
                    f"the body's id {given!r} is not the id of the matching {resource_type}"
                )
            rid = found[0] if found else str(given or uuid.uuid4())
            current = self._current(conn, resource_type, rid, lock=True)
            if not found and current is not None and not current.deleted:
                raise Conflict(f"{resource_type}/{rid} exists but does not match the conditions")
            return self._put(conn, resource_type, rid, body, current, hook)

    def delete(
        self,
        resource_type: str,
        rid: str,
        if_match: str | None = None,
        hook: WriteHook | None = None,
    ) -> Written:
        with self._transaction(f"{resource_type}/{rid}") as conn:
            current = self._current(conn, resource_type, rid, lock=True)
            if current is None:
                raise NotFound(f"{resource_type}/{rid} does not exist")
            _check_if_match(resource_type, rid, current, if_match)
            if current.deleted:
                return Written(self._stored(resource_type, current), "gone")
            if hook is not None:
                hook(json.loads(current.body), None)
            stored = self._apply(conn, resource_type, rid, None, current, "DELETE")
        return Written(stored, "deleted")

    def _put(
        self,
        conn: Connection,
        resource_type: str,
        rid: str,
        body: dict[str, Any],
        current: _Current | None,
        hook: WriteHook | None = None,
    ) -> Written:
        if hook is not None:
            live = current is not None and not current.deleted
            body = _hooked(hook, json.loads(current.body) if live and current else None, body)
        if (
            current is not None
            and not current.deleted
            and _content(json.loads(current.body)) == _content(body)
        ):
            return Written(self._stored(resource_type, current), "unchanged")
        stored = self._apply(conn, resource_type, rid, body, current, "PUT")
        created = current is None or current.deleted
        return Written(stored, "created" if created else "updated")

    def _apply(
        self,
        conn: Connection,
        resource_type: str,
        rid: str,
        body: dict[str, Any] | None,
        current: _Current | None,
        method: str,
    ) -> Stored:
        """Write one version: current row, history row and index rows, in ``conn``'s
        transaction."""
        now_ms = sp.now_ms()
        when = sp.from_ms(now_ms)
        version = current.version + 1 if current else 1
        if body is None:  # a deletion: no body, no index rows; facts stay for access checks
            stamped: dict[str, Any] = {}
            entries = sp.IndexEntries()
            facts = json.loads(current.facts) if current else {}
        else:
            stamped = _stamp(resource_type, body, rid, version, when)
            entries = sp.extract_index(resource_type, stamped, self._base)
            facts = sp.access_facts(resource_type, entries)
        text = json.dumps(stamped, separators=(",", ":"))
        values = {
            "version": version,
            "updated_ms": now_ms,
            "deleted": body is None,
            "body": text,
            "facts": json.dumps(facts, separators=(",", ":")),
        }
        if current is None:
            pk = conn.execute(
                _INSERT_RES, {"rtype": resource_type, "id": rid, **values}
            ).scalar_one()
        else:
            pk = current.pk
            changed = conn.execute(
                update(RES).where(RES.c.pk == pk, RES.c.version == current.version).values(**values)
            )
            if changed.rowcount != 1:
                raise Conflict(
                    f"{resource_type}/{rid} was changed by another request at the same time; "
                    "read it and retry"
                )
            for table in (TOK, STR, DATE, REF):
                conn.execute(delete(table).where(table.c.res_pk == pk))
        conn.execute(
            insert(HIST),
            {
                "rtype": resource_type,
                "id": rid,
                "version": version,
                "updated_ms": now_ms,
                "method": method,
                "deleted": body is None,
                "body": text if body is not None else "",
            },
        )
        self._insert_index(conn, pk, resource_type, entries)
        return Stored(resource_type, rid, version, when, stamped, facts, pk)

    @staticmethod
    def _insert_index(conn: Connection, pk: int, rtype: str, entries: sp.IndexEntries) -> None:
        common = {"res_pk": pk, "rtype": rtype}
        rows: list[tuple[Table, list[dict[str, Any]]]] = [
            (TOK, [{**common, "param": p, "system": s, "code": c} for p, s, c in entries.tokens]),
            (STR, [{**common, "param": p, "norm": n, "exact": e} for p, n, e in entries.strings]),
            (
                DATE,
                [{**common, "param": p, "start_ms": s, "end_ms": e} for p, s, e in entries.dates],
            ),
            (
                REF,
                [
                    {**common, "param": p, "target_type": t, "target_id": i}
                    for p, t, i in entries.refs
                ],
            ),
        ]
        for table, values in rows:
            if values:
                conn.execute(insert(table), values)

    # -- reads -----------------------------------------------------------------
    def _current(
        self, conn: Connection, resource_type: str, rid: str, lock: bool = False
    ) -> _Current | None:
        statement = select(
            RES.c.pk,
            RES.c.id,
            RES.c.version,
            RES.c.updated_ms,
            RES.c.deleted,
            RES.c.body,
            RES.c.facts,
        ).where(RES.c.rtype == resource_type, RES.c.id == rid)
        if lock:
            statement = statement.with_for_update()
        row = conn.execute(statement).first()
        return None if row is None else _Current(*row)

    @staticmethod
    def _stored(resource_type: str, current: _Current) -> Stored:
        return Stored(
            resource_type,
            current.id,
            current.version,
            sp.from_ms(current.updated_ms),
            json.loads(current.body) if current.body else {},
            json.loads(current.facts),
            current.pk,
        )

    def read(self, resource_type: str, rid: str) -> Stored:
        with self._engine.connect() as conn:
            current = self._current(conn, resource_type, rid)
        if current is None:
            raise NotFound(f"{resource_type}/{rid} does not exist")
        if current.deleted:
            raise Gone(f"{resource_type}/{rid} was deleted")
        return self._stored(resource_type, current)

    def vread(self, resource_type: str, rid: str, version: int) -> Stored:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(HIST.c.updated_ms, HIST.c.deleted, HIST.c.body).where(
                    HIST.c.rtype == resource_type, HIST.c.id == rid, HIST.c.version == version
                )
            ).first()
        if row is None:
            raise NotFound(f"{resource_type}/{rid} has no version {version}")
        if row.deleted:
            raise Gone(f"{resource_type}/{rid} version {version} is a deletion")
        body = json.loads(row.body)
        facts = sp.access_facts(resource_type, sp.extract_index(resource_type, body, self._base))
        return Stored(resource_type, rid, version, sp.from_ms(row.updated_ms), body, facts)

    def history(self, resource_type: str, rid: str, offset: int, count: int) -> History:
        with self._engine.connect() as conn:
            current = self._current(conn, resource_type, rid)
            if current is None:
                raise NotFound(f"{resource_type}/{rid} does not exist")
            rows = conn.execute(
                select(
                    HIST.c.version, HIST.c.updated_ms, HIST.c.method, HIST.c.deleted, HIST.c.body
                )
                .where(HIST.c.rtype == resource_type, HIST.c.id == rid)
                .order_by(HIST.c.version.desc())
                .offset(offset)
                .limit(count)
            ).all()
        versions = [
            Version(
                row.version,
                sp.from_ms(row.updated_ms),
                row.method,
                None if row.deleted else json.loads(row.body),
            )
            for row in rows
        ]
        ref = Candidate(current.pk, resource_type, rid, json.loads(current.facts))
        return History(ref, current.version, versions)

    def referencing(
        self, resource_type: str, param: str, target_type: str, target_ids: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Current bodies of ``resource_type`` whose reference ``param`` points at any of
        ``target_ids``: the decision point's one question per request (a patient's
        Consents), as one cached statement instead of the general search pipeline."""
        if not target_ids:
            return []
        with self._engine.connect() as conn:
            rows = conn.execute(
                _REFERENCING,
                {
                    "rtype": resource_type,
                    "param": param,
                    "target_type": target_type,
                    "ids": list(dict.fromkeys(target_ids)),
                },
            )
            return [json.loads(body) for (body,) in rows]

    def load(self, pks: Sequence[int]) -> dict[int, Stored]:
        if not pks:
            return {}
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(
                    RES.c.pk,
                    RES.c.rtype,
                    RES.c.id,
                    RES.c.version,
                    RES.c.updated_ms,
                    RES.c.body,
                    RES.c.facts,
                ).where(RES.c.pk.in_(list(pks)), RES.c.deleted == false())
            ).all()
        return {
            row.pk: Stored(
                row.rtype,
                row.id,
                row.version,
                sp.from_ms(row.updated_ms),
                json.loads(row.body),
                json.loads(row.facts),
                row.pk,
            )
            for row in rows
        }

    # -- search ----------------------------------------------------------------
    def candidate_batches(
        self, query: SearchQuery, size: int
    ) -> Generator[list[Candidate], None, None]:
        """Matches in the requested order, ``size`` at a time, without bodies."""
        r = RES.alias("r")
        now_ms = sp.now_ms()
        statement = (
            select(r.c.pk, r.c.id, r.c.facts)
            .where(
                r.c.rtype == query.resource_type,
                r.c.deleted == false(),
                *_where(query, r, now_ms),
            )
            .order_by(*_order(query, r))
        )
        rtype = query.resource_type
        with self._engine.connect() as conn:
            result = conn.execution_options(yield_per=size).execute(statement)
            for part in result.partitions(size):
                yield [Candidate(pk, rtype, rid, json.loads(facts)) for pk, rid, facts in part]

    def _match(self, conn: Connection, query: SearchQuery, limit: int) -> list[str]:
        """Ids matching a conditional create/update's conditions (no access filtering:
        a write must see what is stored)."""
        if not query.criteria:
            raise BadRequest("a conditional create or update needs search conditions")
        r = RES.alias("r")
        now_ms = sp.now_ms()
        statement = (
            select(r.c.id)
            .where(
                r.c.rtype == query.resource_type,
                r.c.deleted == false(),
                *_where(query, r, now_ms),
            )
            .order_by(r.c.pk)
            .limit(limit)
        )
        return list(conn.execute(statement).scalars())

    def include_candidates(
        self, matches: Sequence[Stored], includes: Sequence[Include], limit: int
    ) -> list[Candidate]:
        """Resources the matches point at (``_include``) or that point at them
        (``_revinclude``)."""
        if not matches or not includes:
            return []
        t = RES.alias("t")
        found: dict[int, Candidate] = {}
        with self._engine.connect() as conn:
            for include in includes:
                if include.reverse:
                    on = t.c.pk == REF.c.res_pk
                    where = [
                        REF.c.rtype == include.source_type,
                        REF.c.param == include.param.name,
                        REF.c.target_type == matches[0].resource_type,
                        REF.c.target_id.in_([m.id for m in matches]),
                    ]
                else:
                    on = and_(t.c.rtype == REF.c.target_type, t.c.id == REF.c.target_id)
                    where = [
                        REF.c.res_pk.in_([m.pk for m in matches]),
                        REF.c.param == include.param.name,
                    ]
                    if include.target_type:
                        where.append(REF.c.target_type == include.target_type)
                rows = conn.execute(
                    select(t.c.pk, t.c.rtype, t.c.id, t.c.facts)
                    .distinct()
                    .select_from(REF.join(t, on))
                    .where(t.c.deleted == false(), *where)
                    .order_by(t.c.pk)
                    .limit(limit)
                ).all()
                for pk, rtype, rid, facts in rows:
                    found.setdefault(pk, Candidate(pk, rtype, rid, json.loads(facts)))
        return list(found.values())[:limit]


#: First key of the advisory lock that serialises conditional writes of one resource type.
_CONDITIONAL_LOCK = 0x46484952  # "FHIR"


def _serialise_conditional(conn: Connection, resource_type: str) -> None:
    """Conditional writes of one type, one at a time until commit, on PostgreSQL: there two
    transactions (of one hub process or of several sharing the database) could otherwise
    both find no match and both create."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sql_text("SELECT pg_advisory_xact_lock(:a, :b)"),
            {"a": _CONDITIONAL_LOCK, "b": zlib.crc32(resource_type.encode()) & 0x7FFFFFFF},
        )


def _check_if_match(
    resource_type: str, rid: str, current: _Current | None, if_match: str | None
) -> None:
    if if_match is None:
        return
    expected = parse_etag(if_match)
    if current is None or current.version != expected:
        raise PreconditionFailed(
            f"{resource_type}/{rid} is not at version {expected}; read it again"
        )


# -- SQL for criteria ------------------------------------------------------------------


def _in_index(
    r: FromClause,
    table: Table,
    rtype: str,
    name: str,
    *conditions: ColumnElement[bool],
    drive: bool,
) -> ColumnElement[bool]:
    """Rows of one parameter's index that match ``conditions``.

    The driving criterion is ``r.pk IN (…)``: one range of the composite index yields
    the candidates. Every other criterion is a correlated ``EXISTS`` probe through the
    ``res_pk`` index, so an unselective one (``started=ge2020``) is checked per
    candidate instead of being materialised whole.
    """
    if drive:
        rows = select(table.c.res_pk).where(
            table.c.rtype == rtype, table.c.param == name, *conditions
        )
        return r.c.pk.in_(rows)
    return (
        select(table.c.res_pk)
        .where(table.c.res_pk == r.c.pk, table.c.param == name, *conditions)
        .exists()
    )


def _selectivity(c: Criterion) -> int:
    """A guess at how few rows a criterion matches (lower: fewer), to pick the driver."""
    spec = c.param
    if spec.column == "id":
        return 0
    if c.modifier in ("missing", "not", "contains"):
        return 9
    if c.chain is not None or spec.type == "reference" or c.modifier == "identifier":
        return 1
    if spec.type == "token":
        return 1 if all(v.code is not None for v in c.values) else 4
    if spec.type == "string":
        return 2 if c.modifier == "exact" else 3
    return 5


def _where(query: SearchQuery, r: FromClause, now_ms: int) -> list[ColumnElement[bool]]:
    ranked = sorted(query.criteria, key=_selectivity)
    return [
        _condition(c, query.resource_type, r, now_ms, drive=i == 0 and _selectivity(c) < 9)
        for i, c in enumerate(ranked)
    ]


def _token(table: Table, token: sp.Token) -> ColumnElement[bool]:
    parts = []
    if token.system is not None:
        parts.append(table.c.system == token.system)
    if token.code is not None:
        parts.append(table.c.code == token.code)
    return and_(*parts)


def _date(value: sp.DateValue, start: Any, end: Any, now_ms: int) -> ColumnElement[bool]:
    """FHIR date comparison between the search range [ps, pe) and the value's [start, end)."""
    ps, pe = value.start, value.end
    within = and_(start >= ps, end <= pe)
    match value.prefix:
        case "eq":
            return within
        case "ne":
            return or_(start < ps, end > pe)
        case "gt":
            return cast(ColumnElement[bool], end > pe)
        case "lt":
            return cast(ColumnElement[bool], start < ps)
        case "ge":
            return or_(end > pe, within)
        case "le":
            return or_(start < ps, within)
        case "sa":
            return cast(ColumnElement[bool], start >= pe)
        case "eb":
            return cast(ColumnElement[bool], end <= ps)
        case _:  # ap
            low, high = sp.approximate(value, now_ms)
            return and_(start < high, end > low)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _condition(
    c: Criterion, rtype: str, r: FromClause, now_ms: int, *, drive: bool
) -> ColumnElement[bool]:
    spec = c.param
    if spec.column == "id":
        return r.c.id.in_(list(c.values))
    if spec.column == "updated":
        col = r.c.updated_ms
        return or_(*(_date(v, col, col + 1, now_ms) for v in c.values))
    if c.chain is not None:
        return _chain(c, rtype, r, now_ms, drive)
    table = {"token": TOK, "string": STR, "date": DATE, "reference": REF}[spec.type]
    if c.modifier == "missing":
        present = _in_index(r, table, rtype, spec.name, drive=drive and not c.values[0])
        return ~present if c.values[0] else present
    if c.modifier == "identifier":
        return _in_index(
            r,
            TOK,
            rtype,
            f"{spec.name}:identifier",
            or_(*(_token(TOK, v) for v in c.values)),
            drive=drive,
        )
    if spec.type == "token":
        negated = c.modifier == "not"
        matched = _in_index(
            r,
            TOK,
            rtype,
            spec.name,
            or_(*(_token(TOK, v) for v in c.values)),
            drive=drive and not negated,
        )
        return ~matched if negated else matched
    if spec.type == "string":
        return _in_index(
            r, STR, rtype, spec.name, or_(*(_string(c.modifier, v) for v in c.values)), drive=drive
        )
    if spec.type == "date":
        return _in_index(
            r,
            DATE,
            rtype,
            spec.name,
            or_(*(_date(v, DATE.c.start_ms, DATE.c.end_ms, now_ms) for v in c.values)),
            drive=drive,
        )
    return _in_index(r, REF, rtype, spec.name, or_(*(_reference(v) for v in c.values)), drive=drive)


def _string(modifier: str | None, text: str) -> ColumnElement[bool]:
    norm = sp.normalise(text)
    if modifier == "exact":
        return and_(STR.c.norm == norm, STR.c.exact == text[: sp.STRING_INDEX_LENGTH])
    if modifier == "contains":
        return STR.c.norm.like(f"%{_like_escape(norm)}%", escape="\\")
    return and_(STR.c.norm >= norm, STR.c.norm < norm + _PREFIX_END)


def _reference(value: sp.RefValue) -> ColumnElement[bool]:
    if value.type is None:
        return REF.c.target_id == value.id
    return and_(REF.c.target_type == value.type, REF.c.target_id == value.id)


def _chain(
    c: Criterion, rtype: str, r: FromClause, now_ms: int, drive: bool
) -> ColumnElement[bool]:
    """``patient.identifier=…``: references to targets that match, or logical references
    (``Reference.identifier``) that match an identifier directly.

    Driving, the alternatives are one ``IN (… UNION ALL …)``: PostgreSQL cannot make a
    semi-join of ``pk IN (a) OR pk IN (b)`` and would scan every resource.
    """
    assert c.chain is not None
    options: list[tuple[Table, str, list[ColumnElement[bool]]]] = []
    for target_type in c.chain_types:
        t = RES.alias(f"chain_{target_type.lower()}")
        targets = select(t.c.id).where(
            t.c.rtype == target_type,
            t.c.deleted == false(),
            _condition(c.chain, target_type, t, now_ms, drive=True),
        )
        conditions = [REF.c.target_type == target_type, REF.c.target_id.in_(targets)]
        options.append((REF, c.param.name, conditions))
    inner = c.chain
    if inner.param.name == "identifier" and inner.modifier is None:
        logical = [or_(*(_token(TOK, v) for v in inner.values))]
        options.append((TOK, f"{c.param.name}:identifier", logical))
    if not drive:
        return or_(*(_in_index(r, t, rtype, n, *cs, drive=False) for t, n, cs in options))
    rows = [
        select(table.c.res_pk).where(table.c.rtype == rtype, table.c.param == name, *conditions)
        for table, name, conditions in options
    ]
    return r.c.pk.in_(union_all(*rows) if len(rows) > 1 else rows[0])


def _order(query: SearchQuery, r: FromClause) -> list[Any]:
    """``_sort`` keys (missing values last), then the id; insertion order by default."""
    if not query.sort:
        return [r.c.pk]
    order: list[Any] = []
    for key in query.sort:
        spec = key.param
        expr: Any
        if spec.column == "id":
            expr = r.c.id
        elif spec.column == "updated":
            expr = r.c.updated_ms
        elif spec.type == "date":
            pick = func.max(DATE.c.end_ms) if key.descending else func.min(DATE.c.start_ms)
            expr = (
                select(pick)
                .where(DATE.c.res_pk == r.c.pk, DATE.c.param == spec.name)
                .scalar_subquery()
            )
        else:
            pick = func.max(STR.c.norm) if key.descending else func.min(STR.c.norm)
            expr = (
                select(pick)
                .where(STR.c.res_pk == r.c.pk, STR.c.param == (spec.sort_by or spec.name))
                .scalar_subquery()
            )
        order.append(expr.desc().nulls_last() if key.descending else expr.asc().nulls_last())
    order.append(r.c.id)
    return order
