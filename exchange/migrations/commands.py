"""``exchange db …``: an operator's view of the schema (upgrade, current, offline SQL)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from exchange.config import Settings
from exchange.database import make_engine
from exchange.errors import ConfigurationError, ExchangeError
from exchange.migrations import BASELINE, head, status, upgrade, upgrade_sql

EXIT_OK = 0
EXIT_BEHIND = 1


def role_of(settings: Settings, role: str | None) -> str:
    """``--role``, else a node when the settings name tenants (a hub has none)."""
    if role is not None:
        return role
    return "node" if settings.tenants else "hub"


def database_url(settings: Settings, role: str) -> str:
    if role == "hub":
        return settings.database("hub")
    from exchange.node.storage import service_name

    return settings.database(service_name(settings))


def _sqlite_file(url: str) -> Path | None:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///"))
    return None


def _engine(url: str) -> Engine:
    return make_engine(url)


def _failed(role: str, exc: SQLAlchemyError) -> ExchangeError:
    original = getattr(exc, "orig", None) or exc
    first = (str(original).strip().splitlines() or [type(original).__name__])[0]
    return ExchangeError(f"the {role} database cannot be reached or changed: {first}")


def upgrade_command(
    settings: Settings, role: str | None, *, sql: bool = False, start: str | None = None
) -> int:
    """Bring the schema to head (or print the SQL that would, with ``sql``)."""
    chosen = role_of(settings, role)
    url = database_url(settings, chosen)
    if sql:
        print(upgrade_sql(chosen, url, start=start), end="")
        return EXIT_OK
    if start is not None:
        raise ConfigurationError(
            "--from goes with --sql (online upgrades start where the database is)"
        )
    engine = _engine(url)
    try:
        before, after = upgrade(engine, chosen)
    except SQLAlchemyError as exc:
        raise _failed(chosen, exc) from None
    finally:
        engine.dispose()
    if before == after:
        print(f"{chosen} database: already at revision {after} (head)")
    else:
        print(f"{chosen} database: upgraded from {before or '(empty)'} to {after} (head)")
    return EXIT_OK


def current_command(settings: Settings, role: str | None) -> int:
    """Print the database's revision; exit 1 when it is behind this version's head."""
    chosen = role_of(settings, role)
    url = database_url(settings, chosen)
    path = _sqlite_file(url)
    if path is not None and not path.is_file():
        raise ConfigurationError(f"no {chosen} database at {path}")
    engine = _engine(url)
    try:
        found, wanted = status(engine, chosen)
    except SQLAlchemyError as exc:
        raise _failed(chosen, exc) from None
    finally:
        engine.dispose()
    if found == wanted:
        print(f"{chosen} database: revision {found} (head)")
        return EXIT_OK
    shown = found or "(none: empty, or created before migrations; baseline is " + BASELINE + ")"
    print(
        f"{chosen} database: revision {shown}; this version needs {head(chosen)}: "
        f"run `exchange db upgrade --role {chosen}`"
    )
    return EXIT_BEHIND
