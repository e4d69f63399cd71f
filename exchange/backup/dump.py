"""A portable, consistent logical dump of the database, and its restore.

Why logical rather than SQLite's backup API plus ``pg_dump``: one code path for both
databases; a dump restores into either (move a hub from SQLite to PostgreSQL by
restoring); no server tools whose version must match the server; and the node's
blob list comes from the very same snapshot as the rows.

Consistency: every table is read in ONE read-only transaction. On SQLite (WAL) an
explicit ``BEGIN`` pins one snapshot at its first read while writers carry on (the
driver would otherwise run each SELECT in its own transaction); on PostgreSQL it is a
``REPEATABLE READ READ ONLY`` transaction. The service keeps writing meanwhile.

Format: the schema (``schema.json``: columns with generic types, keys, unique
constraints, indexes, foreign keys, as reflected) and one NDJSON file per table, each
line a JSON array of the row's values in column order (bytes base64, times ISO 8601).
Every table is included, ``alembic_version`` too when present, so the dump says which
schema revision it holds.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Engine,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    Time,
    UniqueConstraint,
    Uuid,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeEngine

from exchange.backup.errors import BackupError

FORMAT = "exchange-dump/1"
BATCH = 1000
#: Tables whose rows name a node's encrypted blobs (column ``blob``).
BLOB_TABLE = "instance"

_KINDS: list[tuple[type[TypeEngine[Any]], str]] = [
    (Boolean, "boolean"),
    (BigInteger, "biginteger"),
    (SmallInteger, "smallinteger"),
    (Integer, "integer"),
    (DateTime, "datetime"),
    (Date, "date"),
    (Time, "time"),
    (Float, "float"),
    (Numeric, "numeric"),
    (LargeBinary, "binary"),
    (JSON, "json"),
    (Uuid, "uuid"),
    (Text, "text"),
    (String, "string"),
]


def _kind(column_type: TypeEngine[Any]) -> dict[str, Any]:
    """A portable description of a reflected column type (fails closed on unknown ones)."""
    candidates: list[TypeEngine[Any]] = [column_type]
    with contextlib.suppress(NotImplementedError):
        candidates.insert(0, column_type.as_generic())
    for candidate in candidates:
        for cls, kind in _KINDS:
            if isinstance(candidate, cls):
                described: dict[str, Any] = {"type": kind}
                if kind == "string" and getattr(candidate, "length", None):
                    described["length"] = candidate.length  # type: ignore[attr-defined]
                if kind == "datetime" and getattr(candidate, "timezone", False):
                    described["timezone"] = True
                if kind == "numeric":
                    described["precision"] = getattr(candidate, "precision", None)
                    described["scale"] = getattr(candidate, "scale", None)
                return described
    raise BackupError(f"column type {column_type!r} cannot be dumped portably")


def _type(described: dict[str, Any]) -> TypeEngine[Any]:
    kind = described["type"]
    simple: dict[str, TypeEngine[Any]] = {
        "boolean": Boolean(),
        "biginteger": BigInteger(),
        "smallinteger": SmallInteger(),
        "integer": Integer(),
        "date": Date(),
        "time": Time(),
        "float": Float(),
        "binary": LargeBinary(),
        "json": JSON(),
        "uuid": Uuid(),
        "text": Text(),
    }
    if kind in simple:
        return simple[kind]
    if kind == "string":
        return String(described.get("length"))
    if kind == "datetime":
        return DateTime(timezone=bool(described.get("timezone")))
    if kind == "numeric":
        return Numeric(described.get("precision"), described.get("scale"))
    raise BackupError(f"the dump names an unknown column type {kind!r}")


def _encoder(kind: str) -> Callable[[Any], Any]:
    if kind in ("datetime", "date", "time"):
        return lambda v: v.isoformat() if hasattr(v, "isoformat") else v
    if kind == "binary":
        return lambda v: base64.b64encode(bytes(v)).decode()
    if kind in ("numeric", "uuid"):
        return str
    return lambda v: v


def _decoder(kind: str) -> Callable[[Any], Any]:
    parse: dict[str, Callable[[Any], Any]] = {
        "datetime": dt.datetime.fromisoformat,
        "date": dt.date.fromisoformat,
        "time": dt.time.fromisoformat,
        "binary": base64.b64decode,
        "numeric": decimal.Decimal,
        "uuid": uuid.UUID,
    }
    return parse.get(kind, lambda v: v)


@dataclass
class TableDump:
    name: str
    file: str
    rows: int
    schema: dict[str, Any]


@dataclass
class DumpResult:
    dialect: str
    tables: list[TableDump] = field(default_factory=list)
    #: Relative paths of the node blobs the dumped rows reference.
    blobs: list[str] = field(default_factory=list)
    #: Schema revision (Alembic), when the database has one.
    revision: str | None = None
    #: Role-specific counts (FHIR resources by type, studies, audit records).
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one consistent state of the database."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            try:
                yield conn
            finally:
                conn.rollback()
        return
    with engine.connect() as conn:
        # pysqlite runs each SELECT in autocommit mode: an explicit BEGIN holds one snapshot,
        # taken by the first read below.
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()
        try:
            yield conn
        finally:
            conn.rollback()


def _reflect(conn: Connection) -> list[tuple[Table, dict[str, Any]]]:
    inspector = inspect(conn)
    metadata = MetaData()
    metadata.reflect(conn)
    described = []
    for table in metadata.sorted_tables:
        name = table.name
        columns = []
        for column in table.columns:
            entry = {"name": column.name, "nullable": bool(column.nullable), **_kind(column.type)}
            if column.primary_key and column.autoincrement is False:
                entry["autoincrement"] = False
            columns.append(entry)
        schema = {
            "name": name,
            "columns": columns,
            "primary_key": [c.name for c in table.primary_key.columns],
            "primary_key_name": table.primary_key.name,
            "unique": [
                {"name": u.get("name"), "columns": u["column_names"]}
                for u in inspector.get_unique_constraints(name)
            ],
            "indexes": [
                {"name": i["name"], "columns": i["column_names"], "unique": bool(i["unique"])}
                for i in inspector.get_indexes(name)
                # PostgreSQL also lists the index behind each unique constraint
                if i.get("name") and all(i["column_names"]) and "duplicates_constraint" not in i
            ],
            "foreign_keys": [
                {
                    "name": f.get("name"),
                    "columns": f["constrained_columns"],
                    "referred_table": f["referred_table"],
                    "referred_columns": f["referred_columns"],
                }
                for f in inspector.get_foreign_keys(name)
            ],
        }
        described.append((table, schema))
    return described


def _file_name(index: int, table: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", table)[:60]
    return f"{index:04d}-{safe}.ndjson.enc"


def dump(
    conn: Connection,
    write_table: Callable[[str, Iterable[bytes]], None],
    on_rows: Callable[[int], None] | None = None,
) -> DumpResult:
    """Dump every table read through ``conn`` (a ``snapshot``).

    ``write_table(file, chunks)`` stores one table's NDJSON bytes (the caller encrypts
    and hashes them on the way).
    """
    result = DumpResult(dialect=conn.dialect.name)
    try:
        tables = _reflect(conn)
        for index, (table, schema) in enumerate(tables, start=1):
            file = _file_name(index, table.name)
            counter = [0]
            blobs = result.blobs if table.name == BLOB_TABLE and "blob" in table.c else None
            write_table(file, _ndjson(conn, table, schema, counter, blobs, on_rows))
            result.tables.append(TableDump(table.name, file, counter[0], schema))
        names = {t.name for t in result.tables}
        result.revision = _revision(conn, names)
        result.counts = _counts(conn, names)
    except SQLAlchemyError as exc:
        raise BackupError(f"reading the database failed: {type(exc).__name__}: {exc}") from None
    return result


def _ndjson(
    conn: Connection,
    table: Table,
    schema: dict[str, Any],
    counter: list[int],
    blobs: list[str] | None,
    on_rows: Callable[[int], None] | None,
) -> Iterator[bytes]:
    encoders = [_encoder(c["type"]) for c in schema["columns"]]
    blob_index = list(table.c.keys()).index("blob") if blobs is not None else -1
    statement = select(table).order_by(*table.primary_key.columns)
    rows = conn.execution_options(stream_results=True, yield_per=BATCH).execute(statement)
    lines: list[bytes] = []
    for row in rows:
        values = [None if v is None else enc(v) for enc, v in zip(encoders, row, strict=True)]
        if blobs is not None and row[blob_index]:
            blobs.append(str(row[blob_index]))
        lines.append(json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode())
        counter[0] += 1
        if len(lines) >= BATCH:
            yield b"\n".join(lines) + b"\n"
            if on_rows is not None:
                on_rows(len(lines))
            lines = []
    if lines:
        yield b"\n".join(lines) + b"\n"
        if on_rows is not None:
            on_rows(len(lines))


def _revision(conn: Connection, tables: set[str]) -> str | None:
    """Alembic's revision(s): ``alembic_version`` or a per-service ``alembic_version_*``."""
    found = []
    for name in sorted(t for t in tables if t.startswith("alembic_version")):
        table = Table(name, MetaData(), autoload_with=conn)
        if "version_num" in table.c:
            found += [str(v) for v in conn.execute(select(table.c.version_num)).scalars()]
    return ",".join(sorted(found)) or None


def _counts(conn: Connection, tables: set[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    if "fhir_resource" in tables:
        for rtype, count in conn.execute(
            text("SELECT rtype, count(*) FROM fhir_resource GROUP BY rtype")
        ):
            counts[f"resources.{rtype}"] = int(count)
    if "audit_head" in tables:
        seq = conn.execute(text("SELECT max(seq) FROM audit_head")).scalar()
        counts["audit_records"] = int(seq or 0)
    if BLOB_TABLE in tables:
        counts["instances"] = int(conn.execute(text("SELECT count(*) FROM instance")).scalar() or 0)
        counts["studies"] = int(
            conn.execute(
                text("SELECT count(*) FROM (SELECT DISTINCT tenant, study_key FROM instance) s")
            ).scalar()
            or 0
        )
    return counts


# -- restore -----------------------------------------------------------------------


def build_metadata(schemas: list[dict[str, Any]]) -> MetaData:
    """The dumped tables as SQLAlchemy tables of generic types (any dialect)."""
    metadata = MetaData()
    for schema in schemas:
        primary = set(schema["primary_key"])
        columns: list[Any] = [
            Column(
                c["name"],
                _type(c),
                primary_key=c["name"] in primary,
                nullable=bool(c["nullable"]) and c["name"] not in primary,
                autoincrement=c.get("autoincrement", "auto"),
            )
            for c in schema["columns"]
        ]
        constraints: list[Any] = [
            UniqueConstraint(*u["columns"], name=u.get("name")) for u in schema["unique"]
        ]
        constraints += [
            ForeignKeyConstraint(
                f["columns"],
                [f"{f['referred_table']}.{c}" for c in f["referred_columns"]],
                name=f.get("name"),
            )
            for f in schema["foreign_keys"]
        ]
        table = Table(schema["name"], metadata, *columns, *constraints)
        if schema.get("primary_key_name"):
            table.primary_key.name = schema["primary_key_name"]
        for index in schema["indexes"]:
            Index(index["name"], *(table.c[c] for c in index["columns"]), unique=index["unique"])
    return metadata


def tables_in(engine: Engine) -> list[str]:
    """The tables a database holds (to refuse restoring over one without ``--force``)."""
    with engine.connect() as conn:
        return list(inspect(conn).get_table_names())


def restore(
    engine: Engine,
    schemas: list[dict[str, Any]],
    read_table: Callable[[str], Iterator[bytes]],
    *,
    replace: bool,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Create the dumped tables and load their rows in ONE transaction (all or nothing).

    ``replace``: drop the tables the database already has first (PostgreSQL rolls the
    drop back too if anything fails). ``read_table(file)`` yields a table's NDJSON.
    """
    metadata = build_metadata(schemas)
    total = 0
    try:
        with engine.begin() as conn:
            if replace:
                existing = MetaData()
                existing.reflect(conn)
                existing.drop_all(conn)
            metadata.create_all(conn)
            for schema in schemas:
                table = metadata.tables[schema["name"]]
                decoders = [_decoder(c["type"]) for c in schema["columns"]]
                names = [c["name"] for c in schema["columns"]]
                batch: list[dict[str, Any]] = []
                for line in _lines(read_table(schema["file"])):
                    values = json.loads(line)
                    batch.append(
                        {
                            n: None if v is None else dec(v)
                            for n, dec, v in zip(names, decoders, values, strict=True)
                        }
                    )
                    if len(batch) >= BATCH:
                        conn.execute(table.insert(), batch)
                        total += len(batch)
                        if on_rows is not None:
                            on_rows(len(batch))
                        batch = []
                if batch:
                    conn.execute(table.insert(), batch)
                    total += len(batch)
                    if on_rows is not None:
                        on_rows(len(batch))
            if conn.dialect.name == "postgresql":
                _reset_sequences(conn, metadata)
    except SQLAlchemyError as exc:
        raise BackupError(
            f"restoring the database failed, nothing was changed: {type(exc).__name__}: {exc}"
        ) from None
    return total


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        rest += chunk
        *complete, rest = rest.split(b"\n")
        yield from (line for line in complete if line)
    if rest:
        yield rest


def _reset_sequences(conn: Connection, metadata: MetaData) -> None:
    """Explicit ids were inserted: move each serial column's sequence past them."""
    for table in metadata.sorted_tables:
        column = table.autoincrement_column
        if column is None:
            continue
        sequence = conn.execute(
            text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": column.name}
        ).scalar()
        if sequence is None:
            continue
        highest = select(func.max(column)).scalar_subquery()
        conn.execute(select(func.setval(sequence, func.coalesce(highest, 1), highest.is_not(None))))
