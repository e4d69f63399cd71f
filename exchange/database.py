"""SQL engines: SQLite (WAL) by default, PostgreSQL for scale."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import create_engine

from exchange.errors import ConfigurationError

log = logging.getLogger(__name__)


def make_engine(url: str, *, background_checkpoints: bool = False) -> Engine:
    """``background_checkpoints``: SQLite copies its WAL into the database from a
    background thread (``checkpoint_wal``) instead of inside whichever commit crosses 1,000 pages,
    so no request pays for it (the hub's audited reads commit on every request)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        if background_checkpoints:
            event.listen(engine, "connect", _no_autocheckpoint)
        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    raise ConfigurationError(
        f"EXCHANGE_DATABASE_URL: unsupported database {url.split(':', 1)[0]!r}"
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def checkpoint_wal(engine: Engine) -> None:
    """Copy a SQLite WAL into the database (PASSIVE: never blocks readers or writers); a
    no-op for other databases. A failure is logged: the next round tries again, meanwhile
    the WAL just grows."""
    if engine.dialect.name != "sqlite":
        return
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    except SQLAlchemyError as exc:
        log.warning("WAL checkpoint failed", extra={"error": type(exc).__name__})


def ping(engine: Engine) -> None:
    """Raise if the database does not answer a trivial query."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
