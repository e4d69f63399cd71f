"""Schema migrations (Alembic), one environment per service database.

The hub and a node keep different tables, so each has its own migration
history (``exchange/migrations/hub``, ``exchange/migrations/node``) and its own
version table (``alembic_version_hub``, ``alembic_version_node``): the two can
even share one database. ``ensure_schema`` is what services (and stores built on
a fresh engine in tests) call before touching their tables: it brings the schema
to head, or, when automatic upgrades are off, refuses to go on with a message
telling the operator to run ``exchange db upgrade``. Upgrades are serialised
between processes (a PostgreSQL advisory lock, or a lock file beside a SQLite
database), so several hub processes starting at once do not race.

Databases created before migrations existed (tables made by ``create_all``, no
version table) are recognised and stamped at the baseline, then upgraded.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import logging
import threading
import weakref
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from sqlalchemy import Connection, Engine, MetaData, column, inspect, select, table, text
from sqlalchemy.exc import SQLAlchemyError

from exchange.errors import ConfigurationError

if TYPE_CHECKING:  # Alembic is imported only to change a schema: ~0.4 s saved per start-up
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

Role = Literal["hub", "node"]
ROLES: tuple[Role, ...] = get_args(Role)
#: The first revision of each history: exactly the schema ``create_all`` used to make.
BASELINE = "0001"
#: The newest revision of each history (a test checks it against the scripts): a database
#: already there is recognised without loading Alembic.
HEADS: dict[Role, str] = {"hub": "0001", "node": "0001"}

_HERE = Path(__file__).resolve().parent

#: Which tables each service's database holds (a test checks that every model is here).
TABLES: dict[Role, tuple[str, ...]] = {
    "hub": (
        "fhir_resource",
        "fhir_history",
        "fhir_idx_token",
        "fhir_idx_string",
        "fhir_idx_date",
        "fhir_idx_ref",
        "mpi_review",
        "audit_head",
        "audit_chain",
        "audit_checkpoint",
        "access_code",
        "access_code_address",
    ),
    "node": ("instance", "outbox", "api_key"),
}
#: The modules defining those tables; imported only to compare or autogenerate.
_MODELS: dict[Role, tuple[str, ...]] = {
    "hub": (
        "exchange.fhir.repository",
        "exchange.fhir.mpi",
        "exchange.audit.log",
        "exchange.hub.accesscodes",
    ),
    "node": ("exchange.node.catalog", "exchange.node.credentials"),
}
#: First key of the PostgreSQL advisory lock pair that serialises upgrades.
_LOCK_CLASS = 0x45584348  # "EXCH"

#: Engines whose schema is known to be at head, per role (checked once per engine).
_ready: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()
_ready_lock = threading.Lock()


def _role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigurationError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


def version_table(role: str) -> str:
    return f"alembic_version_{_role(role)}"


def alembic_config(role: str, url: str | None = None) -> Config:
    """An Alembic configuration for ``role`` without an ini file (the scripts ship
    inside the package)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_HERE / _role(role)))
    config.set_main_option("exchange_role", role)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@cache
def _scripts(role: Role) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(role))


def head(role: str) -> str:
    """The newest revision this version of Exchange knows for ``role``."""
    return HEADS[_role(role)]


def script_head(role: str) -> str | None:
    """The newest revision among the migration scripts (what ``HEADS`` must say)."""
    return _scripts(_role(role)).get_current_head()


def role_metadata(role: str) -> MetaData:
    """The SQLModel tables of ``role``'s database, as their own ``MetaData``."""
    known = _role(role)
    for module in _MODELS[known]:
        importlib.import_module(module)
    from sqlmodel import SQLModel

    metadata = MetaData()
    for name in TABLES[known]:
        SQLModel.metadata.tables[name].to_metadata(metadata)
    return metadata


def current(connection: Connection, role: str) -> str | None:
    """The revision ``connection``'s database is at for ``role`` (None: never migrated)."""
    name = version_table(role)
    if not inspect(connection).has_table(name):
        return None
    versions = table(name, column("version_num"))
    found = connection.execute(select(versions.c.version_num)).scalars().all()
    if len(found) > 1:  # branches: none of ours has any
        raise ConfigurationError(f"the {role} database has several schema heads: {found}")
    return str(found[0]) if found else None


def differences(engine: Engine, role: str) -> list[Any]:
    """What differs between the database and the models (Alembic's ``compare_metadata``);
    empty when the schema is exactly what the code expects."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    metadata = role_metadata(role)
    names = set(TABLES[_role(role)])

    def include(name: str | None, kind: str, _parent: Any) -> bool:
        return kind != "table" or name in names

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "include_name": include, "target_metadata": metadata},
        )
        return list(compare_metadata(context, metadata))


# -- locking -----------------------------------------------------------------------------


@contextlib.contextmanager
def _sqlite_lock(engine: Engine) -> Iterator[None]:
    """A lock file beside the database: SQLite DDL is not transactional here, so two
    processes must not migrate at once."""
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    path = Path(database).with_name(Path(database).name + ".migrate.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked(engine: Engine, role: Role) -> Iterator[Connection]:
    """A connection in a transaction that holds ``role``'s migration lock until commit."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:a, :b)"),
                {"a": _LOCK_CLASS, "b": zlib.crc32(role.encode()) & 0x7FFFFFFF},
            )
            yield connection
        return
    with _sqlite_lock(engine), engine.begin() as connection:
        yield connection


# -- upgrading ---------------------------------------------------------------------------


def _run(connection: Connection, role: Role, verb: str, target: str) -> None:
    from alembic import command

    quiet = logging.getLogger("alembic")
    if quiet.level == logging.NOTSET:  # its plugin chatter at info; we log what changed
        quiet.setLevel(logging.WARNING)
    config = alembic_config(role)
    config.attributes["connection"] = connection
    if verb == "stamp":
        command.stamp(config, target)
    else:
        command.upgrade(config, target)


def _is_legacy(connection: Connection, role: Role) -> bool:
    """Every baseline table is there but no version table: made by ``create_all``."""
    existing = set(inspect(connection).get_table_names())
    return set(TABLES[role]) <= existing


def _check_known(role: Role, revision: str | None) -> None:
    known = {script.revision for script in _scripts(role).walk_revisions()}
    if revision is not None and revision not in known:
        raise ConfigurationError(
            f"the {role} database is at schema revision {revision}, which this version of "
            "Exchange does not know: it was upgraded by a newer version; run that version"
        )


def upgrade(engine: Engine, role: str, target: str = "head") -> tuple[str | None, str | None]:
    """Bring ``role``'s schema to ``target`` under the migration lock; (before, after)."""
    known = _role(role)
    with _locked(engine, known) as connection:
        before, after = _upgrade_locked(connection, known, target)
    if after == head(known):
        _mark_ready(engine, known)
    return before, after


def _upgrade_locked(
    connection: Connection, role: Role, target: str = "head"
) -> tuple[str | None, str | None]:
    before = current(connection, role)
    _check_known(role, before)
    if before is None and _is_legacy(connection, role):
        log.info(
            "database created before migrations: stamping the baseline",
            extra={"role": role, "revision": BASELINE},
        )
        _run(connection, role, "stamp", BASELINE)
    _run(connection, role, "upgrade", target)
    return before, current(connection, role)


def upgrade_sql(role: str, url: str, target: str = "head", start: str | None = None) -> str:
    """The SQL an upgrade would run (Alembic offline mode), for a DBA to review or apply."""
    from alembic import command
    from alembic.util import CommandError

    known = _role(role)
    config = alembic_config(known, url)
    buffer = io.StringIO()
    config.output_buffer = buffer
    try:
        command.upgrade(config, f"{start}:{target}" if start else target, sql=True)
    except CommandError as exc:  # e.g. an unknown --from revision
        raise ConfigurationError(f"cannot write the {known} upgrade SQL: {exc}") from None
    return buffer.getvalue()


def status(engine: Engine, role: str) -> tuple[str | None, str]:
    """(the database's revision, this code's head) for ``role``."""
    known = _role(role)
    with engine.connect() as connection:
        return current(connection, known), head(known)


def _mark_ready(engine: Engine, role: Role) -> None:
    with _ready_lock:
        _ready.setdefault(engine, set()).add(role)


def ensure_schema(engine: Engine, role: str, *, auto_upgrade: bool | None = None) -> None:
    """Make sure ``role``'s schema is at head before it is used; checked once per engine.

    ``auto_upgrade`` True (a service starting with ``database_auto_upgrade``): upgrade.
    False: a schema that is behind is a ``ConfigurationError`` naming the command to run.
    None (stores, and so every other command): create the schema in an empty database
    (a first run, a test's fresh engine), but leave upgrading an existing one to the
    services and ``exchange db upgrade``."""
    known = _role(role)
    with _ready_lock:
        if known in _ready.get(engine, ()):
            return
    wanted = head(known)
    try:
        with engine.connect() as connection:
            found = current(connection, known)
        if found != wanted and auto_upgrade is not False:
            # Decided under the lock: another process may be half-way through creating it.
            with _locked(engine, known) as connection:
                found = current(connection, known)
                empty = found is None and not _has_any_table(connection, known)
                if found != wanted and (auto_upgrade or empty):
                    before, found = _upgrade_locked(connection, known)
                    log.info(
                        "database schema upgraded",
                        extra={"role": known, "from": before or "(empty)", "to": found},
                    )
    except SQLAlchemyError as exc:
        original = getattr(exc, "orig", None) or exc
        first = (str(original).strip().splitlines() or [type(original).__name__])[0]
        raise ConfigurationError(
            f"the {known} database cannot be checked or upgraded: {first}"
        ) from None
    if found != wanted:
        _check_known(known, found)
        raise ConfigurationError(
            f"the {known} database schema is at revision {found or '(none)'} but this version "
            f"needs {wanted}: run `exchange db upgrade --role {known}`"
            + (" (or set EXCHANGE_DATABASE_AUTO_UPGRADE=true)" if auto_upgrade is False else "")
        )
    _mark_ready(engine, known)


def _has_any_table(connection: Connection, role: Role) -> bool:
    existing = set(inspect(connection).get_table_names())
    return bool(existing & set(TABLES[role]))
